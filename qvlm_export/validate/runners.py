"""Polygraphy runners for validation: ORT sessions of a bundle graph, TensorRT engines, dtype adaptation."""

from __future__ import annotations

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
    """``inner`` (float interface ``dtype``, e.g. an fp16 engine) taking and returning float32; see CastRunner."""
    from ..runtime.graph_runner import CastRunner

    return CastRunner(inner, dtype)


def trt_graph_runner(engines: Path, graph: str, reference_dtype: np.dtype):
    """The TensorRT candidate for one graph (issue 7's runner), adapted to the reference's float dtype."""
    from ..engine.trt_runner import graph_runner
    from ..runtime.bundle import read_bundle

    info = read_bundle(Path(engines) / "bundle")
    runner = graph_runner(Path(engines), graph, name="tensorrt")
    return runner if info.float_dtype == reference_dtype else cast_runner(runner, info.float_dtype)
