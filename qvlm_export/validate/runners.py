"""Polygraphy runners for validation: ORT sessions of a bundle graph, TensorRT engines, dtype adaptation."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import BundleInfo


def ort_graph_runner(info: BundleInfo, graph: str, mode: str, threads: int | None = None,
                     int4_accuracy: int | None = None):
    """A Polygraphy ``OnnxrtRunner`` over one graph of a bundle in a runtime session mode (faithful | fast)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..runtime.ort_runner import make_session

    path = info.graph_path(graph)
    return OnnxrtRunner(lambda: make_session(path, mode, threads, int4_accuracy), name=mode)


def cast_runner(inner: Any, dtype: np.dtype):
    """Wrap a runner whose float interface is ``dtype`` (e.g. fp16 engines) so it takes and returns float32.

    Validation feeds every candidate the reference's float32 inputs and compares in float64,
    so an fp16 engine is judged on its arithmetic, not refused for its interface dtype.
    """
    from polygraphy.backend.base import BaseRunner

    class CastRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=inner.name, prefix="cast")

        def activate_impl(self):
            inner.activate()

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            from polygraphy.datatype import DataType

            meta = TensorMetadata()
            for name, (dt, shape) in inner.get_input_metadata().items():
                meta.add(name, dtype=DataType.FLOAT32 if dt in (DataType.FLOAT16, DataType.BFLOAT16) else dt,
                         shape=shape)
            return meta

        def infer_impl(self, feed_dict):
            feeds = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v) for k, v in feed_dict.items()}
            out = inner.infer(feeds)
            self.inference_time = inner.last_inference_time()
            return OrderedDict((k, np.asarray(v).astype(np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating)
                                else np.asarray(v)) for k, v in out.items())

        def deactivate_impl(self):
            inner.deactivate()

    return CastRunner()


def trt_graph_runner(engines: Path, graph: str, reference_dtype: np.dtype):
    """The TensorRT candidate for one graph (issue 7's runner), adapted to the reference's float dtype."""
    from ..engine.trt_runner import graph_runner
    from ..runtime.bundle import read_bundle

    info = read_bundle(Path(engines) / "bundle")
    runner = graph_runner(Path(engines), graph, name="tensorrt")
    return runner if info.float_dtype == reference_dtype else cast_runner(runner, info.float_dtype)
