"""check-trt, the build plan and the engine runner on bundles the real exporter writes.

Bundles come from the session-cached ``tiny_bundle`` fixture (conftest), shared with the
validate tests (fp32 W8A8). W4A16 fp32 is checked by test_export_bundle.py on the default
model; the fp16 variants, which TensorRT builds, are exported here.
"""

from __future__ import annotations

import json

import onnx
import pytest
from _export_helpers import graph_file  # noqa: E402
from onnx import TensorProto, numpy_helper

from qvlm_export.cli import main
from qvlm_export.engine.builder import build_engines, plan_build, read_engine_manifest
from qvlm_export.engine.check_trt import check_model, check_path
from qvlm_export.engine.environment import TrtEnvironment
from qvlm_export.engine.profiles import BuildProfile, load_profile

COMBOS = [("w8a8", "fp32"), ("w8a8", "fp16"), ("w4a16", "fp16")]


@pytest.mark.parametrize("setting, dtype", COMBOS, ids=[f"{s}-{d}" for s, d in COMBOS])
def test_exported_bundles_pass_check_trt(tiny_bundle, setting, dtype):
    bundle = tiny_bundle(setting, dtype)
    report = check_path(bundle)
    layers = json.loads((bundle / "bundle.json").read_text())["quant"]["layers"]
    quantized = "_int8" if setting == "w8a8" else ("_q4f16" if dtype == "fp16" else "_q4")
    embed = "_fp16" if dtype == "fp16" else ""
    assert report.violations == [] and report.graphs == [f"onnx/decoder_model_merged{quantized}.onnx",
                                                         f"onnx/embed_tokens{embed}.onnx",
                                                         f"onnx/vision_encoder{quantized}.onnx"]
    # W8A8: activation Q + DQ and a weight DQ per Linear; W4A16: one blocked int4 weight DQ per Linear
    assert layers > 0 and report.qdq_nodes == layers * (3 if setting == "w8a8" else 1)


def test_mutated_exported_graph_is_caught_by_node_name(tiny_bundle):
    path = graph_file(tiny_bundle("w8a8", "fp16"), "decoder")
    model = onnx.load(str(path))
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in {t.name for t in model.graph.initializer})
    scale = next(t for t in model.graph.initializer if t.name == weight_dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale).astype("float32"), scale.name))
    assert {(v.node, v.rule) for v in check_model(model).violations} == {(weight_dq.name, "scale-dtype")}
    assert check_model(model, compute_dtype=TensorProto.FLOAT).violations != []  # the other scales are fp16


def test_cli_check_trt_on_exported_bundle(tiny_bundle, capsys):
    assert main(["check-trt", str(tiny_bundle("w4a16", "fp16"))]) == 0
    assert "check-trt: OK (3 graphs" in capsys.readouterr().out


def test_build_plan_and_manifest_on_exported_fp16_bundle(tiny_bundle, tmp_path):
    """Every real decoder input gets a role; the prefill/decode shapes follow the bundle's cache geometry."""
    bundle = tiny_bundle("w8a8", "fp16")
    info = json.loads((bundle / "bundle.json").read_text())["model"]
    profile = load_profile("edge")
    plan = plan_build(bundle, profile)
    decoder = dict(plan.engines[2].profiles)
    past = f"past_key_values.{info['num_layers'] - 1}.value"
    kv, hd = info["num_kv_heads"], info["head_dim"]
    assert decoder["prefill"][past] == ((1, kv, 0, hd),) * 3
    assert decoder["decode"][past] == ((1, kv, 1, hd), (1, kv, 128, hd), (1, kv, 511, hd))
    assert decoder["decode"]["attention_mask"] == ((1, 2), (1, 129), (1, 512))
    vision = dict(plan.engines[0].profiles)["batch"]["pixel_values"]
    assert vision[2] == (1, 3, info["image_size"], info["image_size"])

    def fake_compiler(spec, profile, cache):
        return spec.graph.encode()

    env = TrtEnvironment("10.3.0", "NVIDIA L4", "8.9")
    out = build_engines(bundle, BuildProfile(name="t", max_prompt=32, max_context=64), tmp_path / "engines",
                        compiler=fake_compiler, environment=env)
    manifest = read_engine_manifest(out)
    assert manifest["check_trt"] == {"ok": True, "qdq_nodes": json.loads((bundle / "bundle.json").read_text())[
        "quant"]["layers"] * 3}
    assert manifest["engines"]["decoder"]["inputs"]["inputs_embeds"] == "float16"
    assert (out / "bundle" / "processor_config.json").is_file()
    from qvlm_export.runtime.bundle import read_bundle

    assert read_bundle(out / "bundle").load_processor() is not None  # engines stand alone for generation


def test_engine_directory_answers_like_the_bundle(tiny_bundle, tmp_path):
    """eval over an engine directory (ORT standing in for the deserialised engines) answers like the bundle.

    Exercises what runs unchanged on a GPU: the copied bundle.json and processor, the runtime's
    greedy generation over TrtEngineSet, prefill/decode phase choice and batch chunking
    (8 samples through max_batch 1).
    """
    from test_build_engines import H100, ort_backed_engine_set

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.factory import answerer_for_bundle
    from qvlm_export.runtime.generate import RunnerAnswerer
    from qvlm_export.runtime.runner import GraphSetRunner

    bundle = tiny_bundle("w8a8", "fp16")
    out = build_engines(bundle, BuildProfile(name="t", max_batch=1, max_prompt=128, max_context=160),
                        tmp_path / "engines", compiler=lambda spec, profile, cache: b"", environment=H100)
    samples = load_dataset("builtin:eval:8")
    engines = ort_backed_engine_set(out, bundle)
    answers = RunnerAnswerer(GraphSetRunner(engines, read_bundle(out / "bundle"), "tensorrt")).answer(samples)
    expected = answerer_for_bundle(bundle, mode="faithful")[0].answer(samples)
    assert answers == expected and len(set(answers)) > 1
    engines.deactivate()


def test_cli_eval_on_engines_without_tensorrt_is_one_line(tiny_bundle, tmp_path, monkeypatch, capsys):
    import sys

    out = build_engines(tiny_bundle("w8a8", "fp16"), BuildProfile(name="t", max_prompt=128, max_context=160),
                        tmp_path / "engines", compiler=lambda spec, profile, cache: b"",
                        environment=TrtEnvironment("10.3.0", "NVIDIA L4", "8.9"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["eval", "--engines", str(out), "--data", "builtin:eval:2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT is not installed") and err.count("\n") == 1
