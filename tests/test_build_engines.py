"""The engine build without TensorRT: planning, atomic output, the manifest, compatibility errors, CLI errors.

The TensorRT compile step is replaced by a recording fake (``compiler=``) and the GPU by a
fixed ``TrtEnvironment``; everything around them is the code that runs on the GPU machine.
Real TensorRT builds are in tests/test_build_trt.py (skipped without tensorrt and a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvlm_export.cli import main
from qvlm_export.engine.builder import build_engines, plan_build, read_engine_manifest
from qvlm_export.engine.environment import TrtEnvironment, check_engine_compatibility, require_tensorrt
from qvlm_export.engine.profiles import BuildProfile, load_profile
from qvlm_export.errors import QvlmError
from qvlm_export.manifest import sha256_file

H100 = TrtEnvironment(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
PROFILE = BuildProfile(name="test", max_batch=2, max_prompt=16, opt_prompt=8, max_context=32, opt_context=12,
                       timing_cache=None, graph_dtype="fp16")


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def tiny_bundle_graphs(dtype=TensorProto.FLOAT16, w_axis=1):
    """Minimal vision/embed/decoder graphs with the bundle's input names; the decoder has W8A8 Q/DQ."""
    fdt = helper.tensor_dtype_to_np_dtype(dtype)
    vi = helper.make_tensor_value_info
    vision = _model([helper.make_node("Flatten", ["pixel_values"], ["image_features"], name="flatten")],
                    [vi("pixel_values", dtype, ["batch", 3, 4, 4])], [vi("image_features", dtype, ["batch", 48])])
    embed = _model([helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"], name="gather")],
                   [vi("input_ids", TensorProto.INT64, ["batch", "seq"])],
                   [vi("inputs_embeds", dtype, ["batch", "seq", 8])],
                   [numpy_helper.from_array(np.ones((16, 8), fdt), "table")])
    past = [vi(f"past_key_values.0.{k}", dtype, ["batch", 2, "past", 4]) for k in ("key", "value")]
    inits = [numpy_helper.from_array(np.array(0.1, fdt), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((8, 16), np.int8), "w"),
             numpy_helper.from_array(np.full(16 if w_axis == 1 else 8, 0.01, fdt), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["inputs_embeds", "s", "z"], ["q"], name="act_q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="act_dq"),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wdq"], name="lm_head_w_dq", axis=w_axis),
             helper.make_node("MatMul", ["dq", "wdq"], ["logits"], name="lm_head"),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    decoder = _model(nodes, [vi("inputs_embeds", dtype, ["batch", "seq", 8]),
                             vi("attention_mask", TensorProto.INT64, ["batch", "total"]),
                             vi("position_ids", TensorProto.INT64, ["batch", "seq"]), *past],
                     [vi("logits", dtype, ["batch", "seq", 16]),
                      *[vi(f"present.0.{k}", dtype, ["batch", 2, "total", 4]) for k in ("key", "value")]], inits)
    return {"vision": vision, "embed": embed, "decoder": decoder}


def write_bundle(root, w_axis=1, dtype=TensorProto.FLOAT16, **spec_overrides):
    """A bundle directory as `qvlm-export export` lays it out, with the tiny graphs (keywords: ModelSpec overrides)."""
    from qvlm_export.runtime.bundle import BundleInfo, GraphIO, ModelSpec, write_bundle_json

    (root / "processor").mkdir(parents=True)
    graphs = {}
    for name, model in tiny_bundle_graphs(dtype, w_axis).items():
        onnx.save(model, root / f"{name}.onnx")
        graphs[name] = GraphIO(f"{name}.onnx", tuple(i.name for i in model.graph.input),
                               tuple(o.name for o in model.graph.output))
    spec = ModelSpec(image_token_id=3, eos_token_id=2, pad_token_id=0, num_layers=1, num_kv_heads=2, head_dim=4,
                     hidden_size=8, vocab_size=16, image_seq_length=6, image_size=4)
    spec = dataclasses.replace(spec, **spec_overrides)
    write_bundle_json(BundleInfo(root, "fp16" if dtype == TensorProto.FLOAT16 else "fp32", 21, graphs, spec,
                                 {"setting": "w8a8"}), root)
    (root / "processor" / "tokenizer.json").write_text("{}")
    from qvlm_export.manifest import build_manifest, write_manifest

    write_manifest(root, build_manifest("onnx-bundle", {}, {}, root))
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle"))


class RecordingCompiler:
    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, spec, profile, timing_cache):
        self.calls.append((spec.graph, spec.source.name, timing_cache))
        if spec.graph == self.fail_on:
            raise QvlmError(f"TensorRT could not build the {spec.graph} engine")
        return f"engine:{spec.graph}:{[p for p, _ in spec.profiles]}".encode()


def test_plan_reads_bundle_json_and_exact_shapes(bundle, tmp_path):
    plan = plan_build(bundle, PROFILE)
    assert [(s.graph, s.source.name) for s in plan.engines] == [
        ("vision", "vision.onnx"), ("embed", "embed.onnx"), ("decoder", "decoder.onnx")]
    decoder = dict(plan.engines[2].profiles)
    assert decoder["prefill"]["past_key_values.0.key"] == ((1, 2, 0, 4), (2, 2, 0, 4), (2, 2, 0, 4))
    assert decoder["decode"]["attention_mask"] == ((1, 2), (2, 13), (2, 32))
    fp32 = write_bundle(tmp_path / "fp32", dtype=TensorProto.FLOAT)
    with pytest.raises(QvlmError, match="has fp32 graphs but profile 'test' builds fp16 engines; export with --dtype"):
        plan_build(fp32, PROFILE)
    plan = plan_build(fp32, BuildProfile(name="t", max_prompt=16, max_context=32, graph_dtype="fp32"))
    assert plan.engines[0].source == fp32 / "vision.onnx"
    with pytest.raises(QvlmError, match="is not an ONNX bundle: no bundle.json"):
        plan_build(tmp_path / "fp32" / "processor", PROFILE)


def test_build_writes_engines_metadata_and_manifest(bundle, tmp_path):
    compiler = RecordingCompiler()
    out = build_engines(bundle, PROFILE, tmp_path / "engines", timing_cache=tmp_path / "t.cache",
                        compiler=compiler, environment=H100)
    assert [c[:2] for c in compiler.calls] == [("vision", "vision.onnx"), ("embed", "embed.onnx"),
                                               ("decoder", "decoder.onnx")]
    assert all(c[2] == tmp_path / "t.cache" for c in compiler.calls)
    assert (out / "decoder.engine").read_bytes() == b"engine:decoder:['prefill', 'decode']"
    assert (out / "bundle" / "bundle.json").read_text() == (bundle / "bundle.json").read_text()
    assert (out / "bundle" / "processor" / "tokenizer.json").is_file()
    assert not list((out / "bundle").rglob("*.onnx")) and not (out / "bundle" / "manifest.json").exists()
    m = read_engine_manifest(out)
    assert m["tensorrt"] == {"version": "10.3.0"}
    assert m["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert m["profile_hash"] == PROFILE.digest() and m["config"]["profile"]["max_context"] == 32
    assert m["config"]["strongly_typed"] is True and m["check_trt"] == {"ok": True, "qdq_nodes": 3}
    assert m["inputs"]["bundle/decoder.onnx"] == sha256_file(bundle / "decoder.onnx")
    assert m["outputs"]["decoder.engine"] == sha256_file(out / "decoder.engine")
    shapes = m["engines"]["decoder"]["optimization_profiles"][1]
    assert shapes["name"] == "decode" and shapes["shapes"]["inputs_embeds"] == {
        "min": [1, 1, 8], "opt": [2, 1, 8], "max": [2, 1, 8]}
    check_engine_compatibility(m, H100)  # the building environment accepts its own engines


def test_failed_build_leaves_no_directory(bundle, tmp_path):
    with pytest.raises(QvlmError, match="could not build the decoder engine"):
        build_engines(bundle, PROFILE, tmp_path / "engines", compiler=RecordingCompiler(fail_on="decoder"),
                      environment=H100)
    assert list(tmp_path.iterdir()) == []


def test_rule_violations_stop_the_build_before_tensorrt(tmp_path):
    broken = write_bundle(tmp_path / "broken", w_axis=0)
    compiler = RecordingCompiler()
    with pytest.raises(QvlmError, match=r"breaks 1 TensorRT Q/DQ rule.*lm_head_w_dq \[per-channel-weight-axis\]"):
        build_engines(broken, PROFILE, tmp_path / "e", compiler=compiler, environment=H100)
    assert compiler.calls == []
    build_engines(broken, PROFILE, tmp_path / "e", compiler=compiler, environment=H100, skip_check=True)
    assert read_engine_manifest(tmp_path / "e")["check_trt"] is None


@pytest.mark.parametrize("built, installed, version_compatible, error", [
    ("10.3.0", "10.7.0", False, "built with TensorRT 10.3.0 but 10.7.0 is installed"),
    ("10.3.0.26", "10.3.0", False, None),
    ("10.3.0", "10.7.0", True, None),
    ("10.3.0", "11.0.0", True, None),
    ("10.7.0", "10.3.0", True, "runs only on TensorRT 10.7.0 or a newer"),
    ("8.6.1", "11.0.0", True, "runs only on TensorRT 8.6.1 or a newer"),
])
def test_tensorrt_version_mismatch_error(built, installed, version_compatible, error):
    manifest = {"tensorrt": {"version": built}, "gpu": {"name": "H100", "compute_capability": "9.0"},
                "config": {"profile": {"version_compatible": version_compatible}}}
    env = TrtEnvironment(installed, "H100", "9.0")
    if error is None:
        check_engine_compatibility(manifest, env)
    else:
        with pytest.raises(QvlmError, match=error) as info:
            check_engine_compatibility(manifest, env, where="out/engines")
        assert "rebuild them here with `qvlm-export build`" in str(info.value)


@pytest.mark.parametrize("level, here, error", [
    ("none", "8.6", "built for H100 (compute capability 9.0) but this GPU is L4 (compute capability 8.6)"),
    ("ampere_plus", "8.6", None),
    ("ampere_plus", "7.5", "built for Ampere-or-newer GPUs"),
    ("same_compute_capability", "9.0", None),
])
def test_gpu_mismatch_error(level, here, error):
    manifest = {"tensorrt": {"version": "10.3.0"}, "gpu": {"name": "H100", "compute_capability": "9.0"},
                "config": {"profile": {"hardware_compatibility": level}}}
    env = TrtEnvironment("10.3.0", "L4", here)
    if error is None:
        check_engine_compatibility(manifest, env)
    else:
        with pytest.raises(QvlmError, match=error.replace("(", r"\(").replace(")", r"\)")):
            check_engine_compatibility(manifest, env)


def test_cli_build_without_tensorrt_is_one_line_exit_2(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT is installed
    with pytest.raises(QvlmError, match="TensorRT is not installed"):
        require_tensorrt()
    code = main(["build", "--bundle", str(bundle), "--profile", "edge", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "TensorRT is not installed" in err and "check-trt" in err
    assert not (tmp_path / "e").exists()


def test_cli_dry_run_prints_the_plan(bundle, capsys):
    assert main(["build", "--bundle", str(bundle), "--profile", "server", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    decode = plan["engines"]["decoder"]["optimization_profiles"][1]["shapes"]["past_key_values.0.key"]
    assert decode == {"min": [1, 2, 1, 4], "opt": [8, 2, 1024, 4], "max": [16, 2, 4095, 4]}
    assert plan["profile"] == load_profile("server").to_dict()


def test_cli_build_errors(bundle, tmp_path, capsys):
    assert main(["build", "--bundle", str(tmp_path / "nope"), "--profile", "edge", "--out", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["build", "--bundle", str(bundle), "--profile", "tiny-gpu", "--out", "x"]) == 2
    assert "build profile 'tiny-gpu' not found" in capsys.readouterr().err
    assert main(["build", "--bundle", str(bundle), "--profile", "edge"]) == 2
    assert "build needs --out DIR" in capsys.readouterr().err


def test_runner_phase_choice_and_shape_limits(bundle, tmp_path):
    from qvlm_export.engine.trt_runner import check_feed_shapes, choose_phase

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    m = read_engine_manifest(out)
    past0 = np.zeros((1, 2, 0, 4), np.float16)
    feeds = {"inputs_embeds": np.zeros((1, 5, 8), np.float16), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.zeros((1, 5), np.int64), "past_key_values.0.key": past0,
             "past_key_values.0.value": past0}
    assert choose_phase("decoder", feeds) == 0 and choose_phase("vision", {}) == 0
    check_feed_shapes(m, "decoder", 0, feeds)
    step = {**feeds, "inputs_embeds": np.zeros((1, 1, 8), np.float16), "position_ids": np.zeros((1, 1), np.int64),
            "attention_mask": np.ones((1, 32), np.int64), "past_key_values.0.key": np.zeros((1, 2, 31, 4)),
            "past_key_values.0.value": np.zeros((1, 2, 31, 4))}
    assert choose_phase("decoder", step) == 1
    check_feed_shapes(m, "decoder", 1, step)
    too_long = {**feeds, "inputs_embeds": np.zeros((1, 17, 8)), "position_ids": np.zeros((1, 17), np.int64),
                "attention_mask": np.ones((1, 17), np.int64)}
    with pytest.raises(QvlmError, match=r"'inputs_embeds' axis 1 is 17, outside the prefill profile's 1..16"):
        check_feed_shapes(m, "decoder", 0, too_long)
    with pytest.raises(QvlmError, match="needs input 'attention_mask'"):
        check_feed_shapes(m, "decoder", 0, {k: v for k, v in feeds.items() if k != "attention_mask"})


def test_runner_refuses_engines_from_another_tensorrt_before_loading(bundle, tmp_path):
    from qvlm_export.engine.trt_runner import TrtEngineSet

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    with pytest.raises(QvlmError, match="built with TensorRT 10.3.0 but 11.0.0 is installed"):
        TrtEngineSet(out, environment=TrtEnvironment("11.0.0", H100.gpu_name, "9.0")).activate()
    with pytest.raises(QvlmError, match="'onnx-bundle' artifact, expected 'engines'"):
        TrtEngineSet(bundle, environment=H100)
    from qvlm_export.engine.trt_runner import tensorrt_runner

    runner = tensorrt_runner(out, environment=TrtEnvironment("10.3.0", "NVIDIA L4", "8.9"))  # loads nothing yet
    assert runner.info.model.num_layers == 1 and runner.name == "tensorrt:e"
    with pytest.raises(QvlmError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\)"):
        runner.activate()


def ort_backed_engine_set(engine_dir, bundle):
    """A TrtEngineSet whose per-phase runners are ONNX Runtime sessions of the bundle's graphs.

    Everything but ``_load_runners`` (the TensorRT deserialisation) is the real class:
    environment check, phase choice, shape limits, output mapping.
    """
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from qvlm_export.engine.trt_runner import TrtEngineSet

    class OrtBackedEngineSet(TrtEngineSet):
        def _load_runners(self):
            runners = {}
            for graph, entry in self.manifest["engines"].items():
                session = ort.InferenceSession(str(bundle / entry["source"]), providers=["CPUExecutionProvider"])
                for phase in range(len(entry["optimization_profiles"])):
                    runners[(graph, phase)] = OnnxrtRunner(session).__enter__()
            return runners

    return OrtBackedEngineSet(engine_dir, environment=H100)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Polygraphy's mean over the empty prefill `present` tensors
def test_polygraphy_runner_adapter_in_comparator(bundle, tmp_path):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from qvlm_export.engine.trt_runner import graph_runner

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    engines = ort_backed_engine_set(out, bundle).activate()
    candidate = graph_runner(engines, "decoder")
    with candidate:
        meta = candidate.get_input_metadata(use_numpy_dtypes=False)
    assert meta["inputs_embeds"].shape == [None, None, 8] and meta["past_key_values.0.key"].shape == [None, 2, None, 4]
    rng = np.random.default_rng(0)
    steps = [{"inputs_embeds": rng.standard_normal((2, n, 8)).astype(np.float16),
              "attention_mask": np.ones((2, n + past), np.int64), "position_ids": np.zeros((2, n), np.int64),
              "past_key_values.0.key": np.zeros((2, 2, past, 4), np.float16),
              "past_key_values.0.value": np.zeros((2, 2, past, 4), np.float16)} for n, past in ((6, 0), (1, 9))]
    reference = OnnxrtRunner(ort.InferenceSession(str(bundle / "decoder.onnx"),
                                                  providers=["CPUExecutionProvider"]))
    results = Comparator.run([reference, candidate], data_loader=steps)
    assert [len(r) for _, r in results] == [2, 2]
    assert [tuple(it["logits"].shape) for it in results[1][1]] == [(2, 6, 16), (2, 1, 16)]
    assert bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=0, rtol=0)))
    too_long = [{**steps[0], "inputs_embeds": np.zeros((2, 17, 8), np.float16)}]
    with pytest.raises(QvlmError, match="outside the prefill profile's 1..16"):
        Comparator.run([candidate], data_loader=too_long)
    engines.deactivate()


def test_engine_dir_loads_verify_engines_and_the_bundle_copy(bundle, tmp_path):
    from qvlm_export.errors import ArtifactModified
    from qvlm_export.runtime.bundle import read_bundle

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    assert read_bundle(out / "bundle").dtype == "fp16"
    (out / "bundle" / "processor" / "tokenizer.json").write_text("{ }")
    with pytest.raises(ArtifactModified, match=r"engine directory .*: bundle/processor/tokenizer.json was modified "
                                               r"after build .*; rebuild it or pass --no-verify"):
        read_bundle(out / "bundle")
    assert read_bundle(out / "bundle", verify=False).dtype == "fp16"
    (out / "bundle" / "processor" / "tokenizer.json").write_text("{}")  # back to the built bytes
    (out / "decoder.engine").write_bytes(b"engine:decoder:tampered")
    with pytest.raises(ArtifactModified, match="decoder.engine was modified after build"):
        read_engine_manifest(out)
    assert read_engine_manifest(out, verify=False)["kind"] == "engines"


def test_engine_set_serves_the_runtime_runner_contract(bundle, tmp_path):
    import onnxruntime as ort

    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.runner import GraphSetRunner, VLMRunner

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    info = read_bundle(out / "bundle")
    runner = GraphSetRunner(ort_backed_engine_set(out, bundle), info, name="tensorrt")
    assert isinstance(runner, VLMRunner) and info.dtype == "fp16"
    direct = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    embeds = rng.standard_normal((2, 5, 8)).astype(np.float16)
    with runner:
        features = runner.vision(np.ones((2, 3, 4, 4), np.float32))  # cast to the bundle's fp16
        logits, present = runner.decode(embeds, np.ones((2, 5), np.int64), np.tile(np.arange(5), (2, 1)),
                                        info.empty_past(2))
        past = [rng.standard_normal((2, 2, 5, 4)).astype(np.float16) for _ in range(2)]
        step_logits, _ = runner.decode(embeds[:, :1], np.ones((2, 6), np.int64), np.full((2, 1), 5), past)
    assert features.shape == (2, 48) and features.dtype == np.float16
    expected = direct.run(["logits"], {"inputs_embeds": embeds, "attention_mask": np.ones((2, 5), np.int64),
                                       "position_ids": np.zeros((2, 5), np.int64),
                                       **dict(zip(info.past_names(), info.empty_past(2), strict=True))})[0]
    assert np.array_equal(logits, expected) and [p.shape for p in present] == [(2, 2, 0, 4)] * 2
    assert step_logits.shape == (2, 1, 16)


def test_batches_above_the_profile_run_in_chunks(bundle, tmp_path):
    import onnxruntime as ort

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=RecordingCompiler(), environment=H100)
    engines = ort_backed_engine_set(out, bundle).activate()
    rng = np.random.default_rng(2)
    feeds = {"inputs_embeds": rng.standard_normal((5, 1, 8)).astype(np.float16),  # PROFILE.max_batch is 2
             "attention_mask": np.ones((5, 5), np.int64), "position_ids": np.zeros((5, 1), np.int64),
             "past_key_values.0.key": rng.standard_normal((5, 2, 4, 4)).astype(np.float16),
             "past_key_values.0.value": rng.standard_normal((5, 2, 4, 4)).astype(np.float16)}
    got = engines.run("decoder", feeds)
    direct = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    expected = dict(zip(["logits", "present.0.key", "present.0.value"], direct.run(None, feeds), strict=True))
    assert set(got) == set(expected)
    assert all(np.array_equal(got[k], expected[k]) for k in expected) and got["logits"].shape == (5, 1, 16)
    engines.deactivate()
