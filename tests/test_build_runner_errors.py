"""TensorRT failures become one line: engine load, shape refusal at run time, profile shapes at build time.

Polygraphy 0.53.6's real behaviour, read from its source: ``EngineFromPath()`` raises
``PolygraphyException`` ("Could not deserialize engine...") instead of returning None;
``TrtRunner.infer`` raises it when ``set_input_shape`` fails; TensorRT's
``IOptimizationProfile.set_shape`` raises ``ValueError`` while ``CreateConfig`` runs inside
``EngineBytesFromNetwork()``. Here those exceptions come from stand-ins, so the handling
runs on machines without TensorRT.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from polygraphy.exception import PolygraphyException
from test_build_engines import H100, PROFILE, RecordingCompiler, write_bundle

from qvlm_export.engine import environment
from qvlm_export.engine.builder import build_engines, compile_engine, plan_build
from qvlm_export.engine.trt_runner import TrtEngineSet
from qvlm_export.errors import QvlmError

POLY_DESERIALIZE = ("[E] 1: [runtime.cpp::deserializeCudaEngine] Error Code 1: Serialization (magic tag mismatch)\n"
                    "Could not deserialize engine. See log for details.")


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory):
    bundle = write_bundle(tmp_path_factory.mktemp("b") / "bundle")
    return build_engines(bundle, PROFILE, tmp_path_factory.mktemp("e") / "engines", compiler=RecordingCompiler(),
                         environment=H100)


def test_engine_that_does_not_deserialize_is_one_line(engines_dir, monkeypatch):
    import polygraphy.backend.trt as ptrt

    class FailingEngineFromPath:
        def __init__(self, path):
            self.path = path

        def __call__(self):
            raise PolygraphyException(POLY_DESERIALIZE)

    monkeypatch.setattr(ptrt, "EngineFromPath", FailingEngineFromPath)
    monkeypatch.setattr(environment, "require_tensorrt", lambda: None)
    with pytest.raises(QvlmError) as exc:
        TrtEngineSet(engines_dir, environment=H100).activate()
    # the manifest lists engines by name: the decoder is loaded first
    assert str(exc.value) == (f"{engines_dir / 'decoder.engine'}: TensorRT could not load the decoder engine (Could not "
                              "deserialize engine. See log for details.); rebuild it on this machine with "
                              "`qvlm-export build`")


def test_shape_failure_at_run_time_is_one_line(engines_dir):
    class Runner:
        def infer(self, feeds):
            raise PolygraphyException("For input: input_ids, failed to set shape to: (1, 9)")

        def deactivate(self):
            pass

    engines = TrtEngineSet(engines_dir, environment=H100)
    engines._runners = {("embed", 0): Runner()}
    with pytest.raises(QvlmError) as exc:
        engines.run("embed", {"input_ids": np.zeros((1, 9), np.int64)})
    assert str(exc.value) == (f"{engines_dir}: TensorRT could not run the embed engine on shapes {{'input_ids': [1, 9]}}"
                              " (For input: input_ids, failed to set shape to: (1, 9)); check the shapes against the "
                              "manifest's profiles")


def test_profile_shape_value_error_at_build_is_one_line(engines_dir, monkeypatch, tmp_path):
    import polygraphy.backend.trt as ptrt

    fake_trt = types.SimpleNamespace(__version__="10.3.0", MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
                                     HardwareCompatibilityLevel=types.SimpleNamespace())
    monkeypatch.setattr(environment, "require_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(ptrt, "CreateConfig", lambda **kwargs: kwargs)
    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", lambda path, strongly_typed: path)

    def engine_bytes(network, config, save_timing_cache):
        def build():
            raise ValueError("IOptimizationProfile::setDimensions: min dimensions exceed opt dimensions\n"
                             "Invalid shapes for input inputs_embeds")
        return build

    monkeypatch.setattr(ptrt, "EngineBytesFromNetwork", engine_bytes)
    spec = plan_build(write_bundle(tmp_path / "b"), PROFILE).engines[2]
    with pytest.raises(QvlmError) as exc:
        compile_engine(spec, PROFILE, None)
    assert str(exc.value) == ("TensorRT could not build the decoder engine from decoder.onnx: Invalid shapes for input "
                              "inputs_embeds; run `qvlm-export check-trt` on the bundle and see the TensorRT log above")
