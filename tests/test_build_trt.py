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
from _export_helpers import graph_file  # noqa: E402
from onnx import TensorProto

from qvlm_export.engine.environment import gpu_identity, require_tensorrt
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

    from qvlm_export.engine.builder import EngineSpec, compile_engine
    from qvlm_export.engine.profiles import BuildProfile
    from qvlm_export.engine.shapes import read_graph_inputs

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



def _feeds(info: dict, graph: str, rng) -> list[dict[str, np.ndarray]]:
    """Prefill and decode feeds for the decoder; one batch for vision and embed (fp16 bundles)."""
    model, f16 = info["model"], np.float16
    if graph == "vision":
        return [{"pixel_values": rng.standard_normal((2, 3, model["image_size"], model["image_size"])).astype(f16)}]
    if graph == "embed":
        return [{"input_ids": rng.integers(0, model["vocab_size"], (2, 9)).astype(np.int64)}]
    feeds = []
    for seq, past in ((9, 0), (1, 9)):
        step = {"inputs_embeds": rng.standard_normal((2, seq, model["hidden_size"])).astype(f16),
                "attention_mask": np.ones((2, past + seq), np.int64),
                "position_ids": np.tile(np.arange(past, past + seq), (2, 1)).astype(np.int64)}
        for i in range(model["num_layers"]):
            for kv in ("key", "value"):
                shape = (2, model["num_kv_heads"], past, model["head_dim"])
                step[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape).astype(f16)
        feeds.append(step)
    return feeds


@pytest.fixture(scope="module")
def g128_bundle(tmp_path_factory):
    """W4A16 at the production group size 128: hidden 128 and MLPs of 512/384 (whole groups), plus a
    200-wide vision MLP whose fc2 (K = 200) the exporter keeps in float (ragged_int4 default)."""
    from qvlm_export.export.api import export_bundle
    from qvlm_export.load.tiny import save_tiny_random_model
    from qvlm_export.quant.recipe import recipe_from_dict
    from qvlm_export.search.api import quantize

    root = tmp_path_factory.mktemp("g128")
    model = save_tiny_random_model(root / "model", vision="siglip", text="qwen2", vision_layers=1, text_layers=1,
                                   vision_mlp=200)
    recipe = recipe_from_dict({"method": "rtn", "setting": "w4a16", "calibration": {"samples": 2, "batch_size": 2}})
    assert recipe.weights.group_size == 128
    quant = quantize(model, recipe, out=root / "quant", progress=False)
    return export_bundle(model, quant, out=root / "bundle", dtype="fp16")


@pytest.mark.parametrize("setting", ["w8a8", "w4a16", "w4a16-g128"])
def test_exported_bundle_engines_match_ort(tiny_bundle, g128_bundle, tmp_path, setting):
    """Build edge-style engines from an exported fp16 bundle; every graph and phase matches ORT faithful."""
    import json

    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from qvlm_export.engine.builder import build_engines, read_engine_manifest
    from qvlm_export.engine.profiles import BuildProfile
    from qvlm_export.engine.trt_runner import TrtEngineSet, graph_runner

    bundle = g128_bundle if setting == "w4a16-g128" else tiny_bundle(setting, "fp16")
    profile = BuildProfile(name="test", max_batch=2, max_prompt=32, max_context=64, workspace_mib=512,
                           timing_cache=str(tmp_path / "timing.cache"))
    out = build_engines(bundle, profile, tmp_path / "engines")
    manifest = read_engine_manifest(out)
    assert manifest["gpu"]["compute_capability"] == GPU[1] and manifest["tensorrt"]["version"]
    info = json.loads((bundle / "bundle.json").read_text())
    rng = np.random.default_rng(0)
    with TrtEngineSet(out) as engines:
        # the decoder's two contexts hold memory for their own profile only
        assert [engines._runners[("decoder", p)].allocation_strategy for p in (0, 1)] == ["profile", "profile"]
        for graph in ("vision", "embed", "decoder"):
            results = Comparator.run([OnnxrtRunner(_ort_faithful(graph_file(bundle, graph))),
                                      graph_runner(engines, graph)], data_loader=_feeds(info, graph, rng))
            for ref, trt in zip(results[0][1], results[1][1], strict=True):
                for name in ref.keys():
                    expected, got = ref[name].astype(np.float32), trt[name].astype(np.float32)
                    if name == "logits":  # the engine's prefill returns the last position (decoder_logits: last)
                        assert got.shape[1] == 1
                        expected = expected[:, -1:]
                    span = float(expected.max() - expected.min()) if expected.size else 0.0
                    error = float(np.abs(expected - got).max()) if expected.size else 0.0
                    assert error <= 0.05 * span + 1e-3, f"{graph}/{name}: max error {error:.4g}, range {span:.4g}"


def test_engines_answer_like_ort_and_refuse_other_tensorrt(tiny_bundle, tmp_path):
    import json

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.engine.builder import build_engines
    from qvlm_export.engine.profiles import BuildProfile
    from qvlm_export.runtime.factory import answerer_for_bundle, answerer_for_engines

    bundle = tiny_bundle("w8a8", "fp16")
    out = build_engines(bundle, BuildProfile(name="test", max_batch=1, max_prompt=128, max_context=160), tmp_path / "e")
    samples = load_dataset("builtin:eval:8")
    trt_answers = answerer_for_engines(out)[0].answer(samples)  # batch 8 runs in chunks of max_batch 1
    ort_answers = answerer_for_bundle(bundle)[0].answer(samples)
    agree = sum(a == b for a, b in zip(trt_answers, ort_answers, strict=True)) / len(samples)
    assert agree >= 0.75, (trt_answers, ort_answers)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tensorrt"]["version"] = "9.0.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(QvlmError, match="built with TensorRT 9.0.0 but"):
        answerer_for_engines(out)[0].answer(samples[:1])


def test_corrupt_engine_file_is_one_line(tiny_bundle, tmp_path):
    """A real deserialization failure (Polygraphy raises; it never returns None) becomes one QvlmError line."""
    from qvlm_export.engine.builder import build_engines
    from qvlm_export.engine.profiles import BuildProfile
    from qvlm_export.engine.trt_runner import TrtEngineSet
    from qvlm_export.manifest import verification

    out = build_engines(tiny_bundle("w8a8", "fp16"), BuildProfile(name="t", max_prompt=32, max_context=64),
                        tmp_path / "e")
    (out / "embed.engine").write_bytes(b"not an engine")
    with verification(False), pytest.raises(QvlmError, match=r"could not load the embed engine \(.+\); rebuild"):
        TrtEngineSet(out).activate()
