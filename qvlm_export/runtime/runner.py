"""The runner contract every backend implements (ONNX Runtime here, TensorRT in ``engine``, the PyTorch
model in :mod:`.torch_runner`; Polygraphy's per-graph runners over the same graph sets in :mod:`.graph_runner`).

Polygraphy-style: a runner is built from a bundle description, does nothing until
:meth:`activate` (sessions/engines are created there, never at import or construction),
and releases everything in :meth:`deactivate`; use it as a context manager. Generation
(:mod:`qvlm_export.runtime.generate`) only talks to this interface, so greedy decoding,
the image-feature merge and batching are written once for every backend.

A backend has two ways in:

* implement :class:`VLMRunner` directly (three typed calls), or
* implement the smaller :class:`GraphSet` (``run(graph, feeds) -> outputs`` keyed by the
  ONNX graphs' own input/output names, like an ORT session or ``build.TrtEngineSet``) and
  wrap it in :class:`GraphSetRunner`, which maps the three calls onto the graph names.

Contract of the three calls (numpy in, numpy out; dtypes are the graph's interface dtype,
``bundle.float_dtype``: float32, or float16 for an fp16 bundle):

``vision(pixel_values[B, 3, H, W]) -> image_features[B, T_img, hidden]``
    vision tower + projector; ``T_img`` features replace the ``T_img`` image tokens of each prompt.
``embed(input_ids[B, S] int64) -> inputs_embeds[B, S, hidden]``
    token embeddings; image tokens get whatever the table holds (the runtime overwrites them).
``decode(inputs_embeds[B, S, hidden], attention_mask[B, P+S] int64, position_ids[B, S] int64,
past[2L] of [B, kv_heads, P, head_dim]) -> (logits[B, S, vocab], present[2L] of [B, kv_heads, P+S, head_dim])``
    one decoder step; ``past`` is ordered key0, value0, key1, value1, ...; the first step
    passes ``P = 0`` (zero-length past). ``attention_mask`` covers past and new tokens
    (0 on left padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import QvlmError
from .bundle import BundleInfo


@runtime_checkable
class VLMRunner(Protocol):
    """Runs one bundle's three graphs; see the module docstring for shapes and dtypes."""

    info: BundleInfo
    name: str

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def vision(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...


class GraphSet(Protocol):
    """Named graphs run by their ONNX input/output names (an ORT session set, a TensorRT engine set)."""

    def activate(self) -> Any: ...

    def deactivate(self) -> None: ...

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]: ...


class GraphSetRunner:
    """A :class:`VLMRunner` over any :class:`GraphSet`, using the graph I/O names of ``info``."""

    def __init__(self, graphs: GraphSet, info: BundleInfo, name: str):
        self.graphs = graphs
        self.info = info
        self.name = name
        self.active = False

    def activate(self) -> None:
        if not self.active:
            self.graphs.activate()
            self.active = True

    def deactivate(self) -> None:
        if self.active:
            self.graphs.deactivate()
            self.active = False

    def __enter__(self) -> GraphSetRunner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        if not self.active:
            raise QvlmError(f"runner {self.name!r} is not active; use it as a context manager or call activate()")
        return self.graphs.run(graph, feeds)

    def vision(self, pixel_values: np.ndarray) -> np.ndarray:
        io = self.info.graphs["vision"]
        feeds = {io.inputs[0]: np.ascontiguousarray(pixel_values, dtype=self.info.float_dtype)}
        return np.asarray(self._run("vision", feeds)[io.outputs[0]])

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        io = self.info.graphs["embed"]
        feeds = {io.inputs[0]: np.ascontiguousarray(input_ids, dtype=np.int64)}
        return np.asarray(self._run("embed", feeds)[io.outputs[0]])

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        names = self.info.past_names()
        if len(past) != len(names):
            raise QvlmError(f"decoder takes {len(names)} past tensors (key and value per layer), got {len(past)}")
        feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=self.info.float_dtype),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feeds.update({n: np.ascontiguousarray(p, dtype=self.info.float_dtype) for n, p in zip(names, past)})
        out = self._run("decoder", feeds)
        return np.asarray(out["logits"]), [np.asarray(out[n]) for n in self.info.present_names()]
