"""Export of the default model: FP, W8A8 and W4A16 bundles against the PyTorch (simulated) model.

Each bundle is exported once per test process (tests/_export_helpers.py). The numbers
asserted: faithful-ORT logit error relative to the logit range (prefill and decode),
task accuracy and answer agreement, Q/DQ structure, int4 storage ratio, TensorRT rules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402
from _export_helpers import graph_file  # noqa: E402

from qvlm_export.cli import main  # noqa: E402
from qvlm_export.data.manifest import load_dataset  # noqa: E402
from qvlm_export.engine.check_trt import check_path  # noqa: E402
from qvlm_export.evaluate.accuracy import evaluate  # noqa: E402
from qvlm_export.evaluate.torch_answerer import TorchAnswerer  # noqa: E402
from qvlm_export.load.tiny import save_tiny_random_model  # noqa: E402
from qvlm_export.manifest import hash_tree, read_manifest, refresh_manifest_outputs  # noqa: E402
from qvlm_export.runtime.bundle import read_bundle  # noqa: E402
from qvlm_export.runtime.factory import answerer_for_bundle  # noqa: E402
from qvlm_export.runtime.ort_runner import ort_runner  # noqa: E402

SETTINGS = ("fp", "w8a8", "w4a16")
GRAPHS = ("vision", "embed", "decoder")


@pytest.fixture(scope="module")
def bundles() -> dict[str, Path]:
    return {s: H.bundle(s) for s in SETTINGS}


@pytest.fixture(scope="module")
def references():
    return {s: H.reference_model(s) for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS)
def test_faithful_logits_match_pytorch_prefill_and_decode(bundles, references, setting):
    vlm = references[setting]
    batch = H.prompt_batch(vlm.processor, load_dataset("builtin:eval:8"))
    assert batch["attention_mask"].min() == 0 or len(set(batch["attention_mask"].sum(1))) == 1
    reference, tokens = H.torch_steps(vlm, batch, steps=2)
    with ort_runner(bundles[setting], "faithful", threads=1) as runner:
        got = H.runner_steps(runner, batch, tokens)
    assert [g.shape for g in got] == [r.shape for r in reference]
    assert got[1].shape[1] == 1  # decode steps really ran one token on a non-empty cache
    H.assert_logit_parity(H.relative_logit_errors(reference, got, batch["attention_mask"]), setting)


@pytest.mark.parametrize("setting", SETTINGS)
def test_bundle_accuracy_equals_pytorch(bundles, references, setting):
    samples = load_dataset("builtin:eval:24")
    torch_result = evaluate(TorchAnswerer(references[setting]), samples, batch_size=12, progress=False)
    answerer, info = answerer_for_bundle(bundles[setting], mode="faithful", threads=1)
    with answerer:
        ort_result = evaluate(answerer, samples, batch_size=12, progress=False)
    assert info["setting"] == setting and info["backend"] == "onnxruntime-faithful"
    same = np.mean([a == b for a, b in zip(ort_result.predictions, torch_result.predictions)])
    # W8A8 may flip one answer through an int8 rounding-boundary cascade (H.assert_logit_parity)
    allowed = 2 / len(samples) if setting == "w8a8" else 0.005  # boundary flips vary by CPU: two answers
    assert abs(ort_result.overall - torch_result.overall) <= allowed
    assert same >= 0.9, f"{setting}: only {same:.0%} of the answers equal PyTorch's"


@pytest.mark.parametrize("setting", SETTINGS)
def test_graphs_pass_onnx_checker_and_trt_rules(bundles, setting):
    for graph in GRAPHS:
        onnx.checker.check_model(str(graph_file(bundles[setting], graph)), full_check=True)
    report = check_path(bundles[setting])
    assert report.ok, [str(v) for v in report.violations]
    layers = read_bundle(bundles[setting]).quant["layers"]
    per_layer = {"fp": 0, "w8a8": 3, "w4a16": 1}[setting]  # Q+DQ on the input, DQ on the weight
    assert report.qdq_nodes == per_layer * layers


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def test_w8a8_qdq_structure(bundles):
    model = onnx.load(str(graph_file(bundles["w8a8"], "decoder")))
    inits = {t.name: t for t in model.graph.initializer}
    name = "model.language_model.layers.0.mlp.down_proj"
    codes = inits[f"{name}.weight_quantized"]
    assert codes.data_type == TensorProto.INT8
    k, n = codes.dims
    dq = next(node for node in model.graph.node if node.name == f"{name}/weight_dq")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 1}
    assert list(inits[f"{name}.weight_scale"].dims) == [n]
    assert list(inits[f"{name}.input_scale"].dims) == [] and numpy_helper.to_array(inits[f"{name}.input_zero_point"]) == 0
    assert numpy_helper.to_array(inits[f"{name}.input_zero_point"]).dtype == np.int8
    float_weights = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                     and not t.name.startswith("lm_head")]
    assert float_weights == [], "quantized layers must not keep float weights"
    # the bias-free Llama MLP: the MatMul feeds the residual Add, never a DQ
    matmul = next(node for node in model.graph.node if node.name == f"{name}/MatMul")
    assert list(matmul.input) == [f"{name}.input_dq", f"{name}.weight_dq"]


def test_w4a16_int4_storage_and_blocks(bundles):
    state = json.loads((H.quant_state("w4a16") / "state.json").read_text())
    inits = _initializers(graph_file(bundles["w4a16"], "decoder"))
    stored = fp16 = 0
    for name, meta in state["layers"].items():
        if not name.startswith("model.language_model."):
            continue
        codes, scale = inits[f"{name}.weight_quantized"], inits[f"{name}.weight_scale"]
        assert codes.data_type == TensorProto.INT4
        k, n = codes.dims
        assert list(scale.dims) == [-(-k // meta["group_size"]), n]
        stored += len(codes.raw_data) + len(scale.raw_data)
        fp16 += k * n * 2
    assert stored / fp16 <= 0.3, f"int4 decoder weights take {stored / fp16:.3f} of fp16"
    info = read_bundle(bundles["w4a16"]).graphs["decoder"].weight_bytes
    assert info["linear"] / info["linear_fp16"] <= 0.3


def test_bundle_json_manifest_and_processor(bundles):
    info = read_bundle(bundles["w8a8"])
    vlm = H.reference_model("fp")
    cfg = vlm.model.config
    assert info.model.image_token_id == cfg.image_token_id
    assert info.model.num_layers == cfg.text_config.num_hidden_layers
    assert info.model.eos_token_id == vlm.tokenizer.eos_token_id
    assert info.quant["setting"] == "w8a8" and info.quant["deployable"] is True
    processor = info.load_processor()
    assert processor.tokenizer("what color")["input_ids"] == vlm.tokenizer("what color")["input_ids"]
    manifest = read_manifest(bundles["w8a8"], kind="onnx-bundle")
    assert manifest["outputs"] == hash_tree(bundles["w8a8"])
    assert manifest["config"]["export"]["opset"] == 21 and "quant" in manifest["inputs"]
    for graph, io in info.graphs.items():
        model = onnx.load(str(bundles["w8a8"] / io.file), load_external_data=False)
        assert [i.name for i in model.graph.input] == list(io.inputs), graph
        assert model.opset_import[0].version == 21


def _polygraphy_args(info, graph: str) -> list[str]:
    """Consistent shapes and valid values for the decoder and embed (random ints would be out of range)."""
    if graph == "embed":
        return ["--val-range", f"input_ids:[0,{info.model.vocab_size - 1}]"]
    if graph != "decoder":
        return []
    spec = info.model
    past = [f"{n}:[2,{spec.num_kv_heads},2,{spec.head_dim}]" for n in info.past_names()]
    return ["--input-shapes", f"inputs_embeds:[2,3,{spec.hidden_size}]", "attention_mask:[2,5]",
            "position_ids:[2,3]", *past, "--val-range", "attention_mask:[1,1]", "position_ids:[0,8]"]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "graphs"), [("w8a8", GRAPHS), ("w4a16", ("vision", "decoder"))])
def test_polygraphy_inspect_and_run(bundles, setting, graphs):
    # the embed graph is the same float Gather in every bundle: W8A8 covers it
    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or "polygraphy"
    info = read_bundle(bundles[setting])
    for graph in graphs:
        path = str(graph_file(bundles[setting], graph))
        for cmd in ([exe, "inspect", "model", path], [exe, "run", "--onnxrt", path, *_polygraphy_args(info, graph)]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{' '.join(cmd[1:3])} {graph}: {done.stdout[-800:]}{done.stderr[-800:]}"
        assert "PASSED" in done.stdout + done.stderr


def test_bad_states_are_refused_in_one_line(tmp_path, capsys):
    state = tmp_path / "w6a6"
    shutil.copytree(H.quant_state("w8a8"), state)
    recipe = (state / "recipe.yaml").read_text().replace("setting: w8a8", "setting: w6a6")
    (state / "recipe.yaml").write_text(recipe)
    refresh_manifest_outputs(state)  # a deliberate edit: re-hash, so the check under test is reached
    code = main(["export", "--quant", str(state), "--out", str(tmp_path / "bundle")])
    assert code == 2
    err = capsys.readouterr().err
    assert "simulated only" in err and "w8a8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists()
    other = save_tiny_random_model(tmp_path / "other", vision_layers=1, text_layers=1)
    assert main(["export", "--quant", str(H.quant_state("w8a8")), "--model", str(other),
                 "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "pass the --model the state was made for" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists()
