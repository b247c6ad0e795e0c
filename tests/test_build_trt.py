"""Real TensorRT builds and TensorRT-vs-ONNX Runtime parity. Skips without tensorrt and an NVIDIA GPU.

These tests have never run on the machines this project was developed on (no GPU); see
docs/tensorrt.md. Thresholds: int8 QDQ engines vs ORT's exact QDQ arithmetic differ only
by fp16/fp32 accumulation order, so the bound is a few int8 quantization steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from qvlm_export.build.environment import gpu_identity, require_tensorrt
from qvlm_export.errors import QvlmError

try:
    require_tensorrt()
    GPU = gpu_identity()
except QvlmError as exc:
    pytest.skip(f"TensorRT tests need tensorrt and an NVIDIA GPU: {exc}", allow_module_level=True)

pytestmark = pytest.mark.trt


def _ort_faithful(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")  # exact QDQ arithmetic reference
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kwargs", [
    {"weights": "int8", "act": "int8", "dtype": TensorProto.FLOAT16},
    {"weights": "int4", "act": None, "dtype": TensorProto.FLOAT16, "k": 256, "n": 64, "block": 128},
], ids=["w8a8-fp16", "w4a16-fp16"])
def test_qdq_linear_engine_matches_ort(tmp_path, kwargs):
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from test_check_trt import linear_model

    from qvlm_export.build.builder import EngineSpec, compile_engine
    from qvlm_export.build.profiles import BuildProfile
    from qvlm_export.build.shapes import read_graph_inputs

    path = tmp_path / "linear.onnx"
    onnx.save(linear_model(**kwargs), path)
    k = kwargs.get("k", 16)
    spec = EngineSpec("vision", path, tuple(read_graph_inputs(path)), (("static", {"x": ((2, k), (2, k), (2, k))}),))
    engine = compile_engine(spec, BuildProfile(name="t", workspace_mib=256), tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0  # the cache was written for reuse
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, k)).astype(np.float16)} for i in range(3)]
    results = Comparator.run([OnnxrtRunner(_ort_faithful(path)), TrtRunner(EngineFromBytes(bytes(engine)))],
                             data_loader=feeds)
    assert bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=0.05, rtol=0.02)))

