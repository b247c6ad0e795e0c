"""One graph of any :class:`~.runner.GraphSet` as a Polygraphy runner (what validation's Comparator runs).

The runtime's two ways in (:mod:`.runner`) serve generation; graph-by-graph comparison needs
Polygraphy's ``BaseRunner``. :class:`GraphRunner` is that adapter, written once for every
graph set (TensorRT engines, ORT sessions, the PyTorch model), and :class:`CastRunner` adapts
any Polygraphy runner whose float interface is fp16 to the float32 feeds validation uses.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from polygraphy.backend.base import BaseRunner

from .runner import GraphSet


class GraphRunner(BaseRunner):
    """Runs ``graph`` of ``graphs``; ``metadata(graphs)`` gives the inputs' Polygraphy ``TensorMetadata``.

    ``owned``: the runner activates and deactivates the graph set itself; otherwise the set is
    shared by the runners of several graphs and its owner keeps it active.
    """

    def __init__(self, graphs: GraphSet, graph: str, metadata: Callable[[Any], Any], owned: bool = False,
                 name: str | None = None, prefix: str = "graph"):
        super().__init__(name=name, prefix=prefix)
        self.graphs = graphs
        self.graph = graph
        self.metadata = metadata
        self.owned = owned

    def activate_impl(self):
        if self.owned:
            self.graphs.activate()

    def get_input_metadata_impl(self):
        return self.metadata(self.graphs)

    def infer_impl(self, feed_dict):
        start = time.time()
        outputs = self.graphs.run(self.graph, dict(feed_dict))
        self.inference_time = time.time() - start
        return OrderedDict(outputs)

    def deactivate_impl(self):
        if self.owned:
            self.graphs.deactivate()


class CastRunner(BaseRunner):
    """Wrap a runner whose float interface is ``dtype`` (e.g. fp16 engines) so it takes and returns float32.

    Validation feeds every candidate the reference's float32 inputs and compares in float64,
    so an fp16 engine is judged on its arithmetic, not refused for its interface dtype.
    """

    def __init__(self, inner: Any, dtype: np.dtype):
        super().__init__(name=inner.name, prefix="cast")
        self.inner = inner
        self.dtype = dtype

    def activate_impl(self):
        self.inner.activate()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata
        from polygraphy.datatype import DataType

        meta = TensorMetadata()
        for name, (dt, shape) in self.inner.get_input_metadata().items():
            meta.add(name, dtype=DataType.FLOAT32 if dt in (DataType.FLOAT16, DataType.BFLOAT16) else dt, shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        feeds = {k: (v.astype(self.dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feed_dict.items()}
        out = self.inner.infer(feeds)
        self.inference_time = self.inner.last_inference_time()
        return OrderedDict((k, np.asarray(v).astype(np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                            else np.asarray(v)) for k, v in out.items())

    def deactivate_impl(self):
        self.inner.deactivate()
