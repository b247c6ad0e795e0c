"""Real configurations and bounded stages (issue 11), on tiny random models built here.

* ``vision_feature_layer`` -2 (llava-hf's LLaVA-1.5) and a list: the trailing vision layer
  that feeds nothing is neither calibrated, quantized nor exported, the state says why,
  and the exported vision graph matches the simulated torch model;
* weight-only RTN reads no data (no dataset, no forward call);
* a graph over ``ExportConfig.external_data_bytes`` is written as ONNX external data
  and runs, validates and hashes like an inline one;
* bf16 checkpoints load in bf16 and export to fp16 graphs (``--dtype auto``); tied embeddings;
* a stage refuses in one line (exit 2) when the machine cannot hold it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402

from qvlm_export.cli import main  # noqa: E402
from qvlm_export.data.manifest import load_dataset  # noqa: E402
from qvlm_export.errors import QvlmError  # noqa: E402
from qvlm_export.export.api import check_state_fits, drop_unused_layers, export_bundle  # noqa: E402
from qvlm_export.export.config import ExportConfig  # noqa: E402
from qvlm_export.load.model import load_vlm  # noqa: E402
from qvlm_export.load.tiny import save_tiny_random_model  # noqa: E402
from qvlm_export.manifest import hash_tree  # noqa: E402
from qvlm_export.quant.modules import rtn_layer  # noqa: E402
from qvlm_export.quant.recipe import recipe_from_dict  # noqa: E402
from qvlm_export.quant.simulate import load_simulated  # noqa: E402
from qvlm_export.quant.state import load_state  # noqa: E402
from qvlm_export.runtime.bundle import read_bundle  # noqa: E402
from qvlm_export.runtime.ort_runner import ort_runner  # noqa: E402
from qvlm_export.search.api import quantize  # noqa: E402

SMALL = {"hidden": 32, "heads": 2, "text_layers": 1}
VISION = "model.vision_tower.encoder.layers"


def _recipe(setting: str):
    return recipe_from_dict({"method": "rtn", "setting": setting, "weights": {"group_size": 16},
                             "calibration": {"samples": 2, "batch_size": 2}})


@pytest.fixture(scope="module")
def feature_layer_runs(tmp_path_factory):
    """Per config: (model, state, bundle) for ``vision_feature_layer`` -2 (2 layers) and [-3, -2] (3 layers)."""
    root = tmp_path_factory.mktemp("feature_layers")
    runs = {}
    for name, layers, feature in (("minus2", 2, -2), ("list", 3, [-3, -2])):
        model = save_tiny_random_model(root / name, vision_layers=layers, vision_feature_layer=feature, seed=5,
                                       **SMALL)
        quant = quantize(model, _recipe("w8a8"), out=root / f"quant-{name}", progress=False, device="cpu")
        runs[name] = (model, quant, export_bundle(model, quant, out=root / f"bundle-{name}"))
    return runs


@pytest.mark.parametrize("name,unused", [("minus2", 1), ("list", 2)])
def test_unused_vision_layer_is_left_out_and_recorded(feature_layer_runs, name, unused):
    _, quant, bundle = feature_layer_runs[name]
    state = json.loads((quant / "state.json").read_text())
    vision = sorted({n.split(".")[4] for n in state["layers"] if n.startswith(VISION)})
    assert vision == [str(i) for i in range(unused)]  # every layer before the unused one, none after
    assert list(state["extras"]["left_out"]) == [f"{VISION}.{unused}"]
    assert "feeds nothing" in state["extras"]["left_out"][f"{VISION}.{unused}"]
    graph = onnx.load(str(read_bundle(bundle).graph_path("vision")))
    assert not [n.name for n in graph.graph.node if f"layers.{unused}." in n.name]
    assert read_bundle(bundle).quant["layers"] == len(state["layers"])


@pytest.mark.parametrize("name", ["minus2", "list"])
def test_vision_graph_matches_the_simulated_model(feature_layer_runs, name):
    from qvlm_export.export.wrappers import VisionGraph

    _, quant, bundle = feature_layer_runs[name]
    vlm, _ = load_simulated(quant)
    pixels = H.prompt_batch(vlm.processor, load_dataset("builtin:eval:4"))["pixel_values"]
    with torch.no_grad():
        reference = VisionGraph(vlm.model)(torch.from_numpy(pixels).float()).numpy()
    with ort_runner(bundle, "faithful", threads=1) as runner:
        got = runner.vision(pixels)
    assert got.shape == reference.shape
    error = np.abs(got - reference).max() / np.ptp(reference)
    assert error < 1e-3, f"vision features differ by {error:.2e} of their range"


def test_old_state_with_the_unused_layer_is_trimmed_not_blamed(feature_layer_runs):
    model, quant, _ = feature_layer_runs["minus2"]
    state = load_state(quant)
    name = f"{VISION}.1.mlp.fc1"
    vlm = load_vlm(model)
    state.layers[name] = rtn_layer(vlm.model.get_submodule(name).weight.detach(), state.recipe)
    assert list(drop_unused_layers(vlm.model, state)) == [name]
    assert name not in state.layers


def test_state_for_another_model_names_the_layer_shape_and_digests(feature_layer_runs, tmp_path):
    _, quant, _ = feature_layer_runs["minus2"]
    other = save_tiny_random_model(tmp_path / "wider", vision_layers=2, vision_feature_layer=-2, hidden=48,
                                   heads=2, text_layers=1)
    with pytest.raises(QvlmError) as exc:
        check_state_fits(load_vlm(other).model, load_state(quant), other, quant)
    message = str(exc.value)
    assert "([32, 384]) is shape [48, 384]" in message  # the state's shape, then the model's
    assert "made for a model with digest" in message and "this one is" in message


def test_weight_only_rtn_reads_no_data_and_runs_no_forward(feature_layer_runs, tmp_path):
    model, w8a8, _ = feature_layer_runs["minus2"]
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, a: calls.append(type(m).__name__))
    try:  # a calibration path that does not exist: reading it would fail
        out = quantize(model, _recipe("w4a16"), calib=tmp_path / "absent.jsonl", out=tmp_path / "q", progress=False,
                       device="cpu")
    finally:
        handle.remove()
    assert calls == []
    state, calibrated = load_state(out), load_state(w8a8)
    assert sorted(state.layers) == sorted(calibrated.layers)  # the same Linears the calibrated walk quantizes
    assert state.extras["calibration"]["samples"] == 0
    vlm = load_vlm(model)
    for name, layer in state.layers.items():
        expected = rtn_layer(vlm.model.get_submodule(name).weight.detach(), state.recipe)
        assert torch.equal(layer.weight_codes, expected.weight_codes) and layer.input_scale is None


@pytest.fixture(scope="module")
def external_bundle(tiny_bundle, tmp_path_factory):
    inline = Path(tiny_bundle("w8a8"))
    out = tmp_path_factory.mktemp("external") / "bundle"
    # 20 kB: the decoder (its vocab-sized embedding-free weights) goes external, the vision graph too
    export_bundle(inline.parent / "model", inline.parent / "quant-w8a8", out=out,
                  config=ExportConfig(external_data_bytes=20_000))
    return inline, out


def test_external_data_graph_holds_the_same_tensors(external_bundle):
    inline, external = external_bundle
    info = read_bundle(external)
    decoder, data = "onnx/decoder_model_merged_int8.onnx", "onnx/decoder_model_merged_int8.onnx_data"
    assert info.graphs["decoder"].data_file == data  # the name transformers.js loads
    js = json.loads((external / "config.json").read_text())["transformers.js_config"]
    assert js["use_external_data_format"] == {"decoder_model_merged_int8.onnx": 1, "vision_encoder_int8.onnx": 1}
    bare = onnx.load(str(external / decoder), load_external_data=False)
    inside = [t.name for t in bare.graph.initializer if len(t.raw_data) > 1024]  # onnx_ir keeps <= 1 kB inline
    assert inside == [] and sum(t.data_location == onnx.TensorProto.EXTERNAL for t in bare.graph.initializer) >= 6
    split = (external / decoder).stat().st_size + (external / data).stat().st_size
    assert abs(split - (inline / decoder).stat().st_size) < 0.1 * split  # same bytes, in two files
    assert data in hash_tree(external)
    manifest = json.loads((external / "manifest.json").read_text())
    assert manifest["outputs"][data] == info.graphs["decoder"].data_sha256
    a = onnx.load(str(inline / decoder))
    b = onnx.load(str(external / decoder))  # reads the external data
    ta = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    tb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert sorted(ta) == sorted(tb)
    assert all(ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]) for k in ta)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


def test_external_data_bundle_runs_validates_and_checks(external_bundle, tiny_bundle, tiny_w8a8_thresholds, tmp_path):
    inline, external = external_bundle
    batch = H.prompt_batch(read_bundle(inline).load_processor(), load_dataset("builtin:eval:3"))
    outputs = []
    for bundle in (inline, external):
        with ort_runner(bundle, "faithful", threads=1) as runner:
            outputs.append(H.runner_steps(runner, batch, []))
    assert np.array_equal(outputs[0][0], outputs[1][0])  # same graph, same bits
    assert main(["check-trt", str(external)]) == 0
    code = main(["validate", "--reference", str(tiny_bundle("fp")), "--candidate", str(external), "--out",
                 str(tmp_path / "report"), "--thresholds", str(tiny_w8a8_thresholds), "--calib-samples", "4",
                 "--eval-samples", "8", "--threads", "1"])
    assert code == 0


def test_bf16_checkpoint_with_tied_embeddings_quantizes_and_exports_fp16(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = save_tiny_random_model(tmp_path / "fp32", vision_layers=1, **SMALL)
    vlm = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16)
    vlm.config.text_config.tie_word_embeddings = vlm.config.tie_word_embeddings = True
    vlm.tie_weights()
    bf16 = tmp_path / "bf16"
    vlm.save_pretrained(bf16)
    load_vlm(model).processor.save_pretrained(bf16)
    quant = quantize(bf16, _recipe("w8a8"), out=tmp_path / "q", progress=False, device="cpu")
    state = load_state(quant)
    assert state.extras["load_dtype"] == "bf16" and len(state.layers) > 0
    loaded = load_vlm(bf16, dtype="bf16").model
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    bundle = export_bundle(bf16, quant, out=tmp_path / "b", dtype="auto")
    info = read_bundle(bundle)
    assert info.dtype == "fp16"
    batch = H.prompt_batch(info.load_processor(), load_dataset("builtin:eval:2"))
    with ort_runner(bundle, "faithful", threads=1) as runner:
        logits = H.runner_steps(runner, batch, [])[0]
    assert logits.shape[-1] == info.model.vocab_size and np.isfinite(logits).all()


def test_stage_refuses_when_memory_cannot_hold_it(tiny_bundle, monkeypatch, capsys):
    from qvlm_export import memory

    model = Path(tiny_bundle("w8a8")).parent / "model"
    params, dtype = memory.checkpoint_params(model)
    assert dtype == "fp32" and params > 0
    with pytest.raises(QvlmError, match="needs about"):
        memory.require_memory("export", model, "fp32", 2.0, available=params * 8 - 1)
    assert memory.require_memory("export", model, "fp32", 2.0, available=params * 8) == params * 8
    monkeypatch.setattr(memory, "available_bytes", lambda: 1024)
    assert main(["quantize", "--recipe", "rtn-w4a16", "--model", str(model), "--out", "unused", "--no-progress"]) == 2
    assert "quantize needs about" in capsys.readouterr().err


def test_block_weight_placement_gives_the_same_state(feature_layer_runs):
    """The per-block onloading path (accelerators) on the host: same codes and scales as the plain walk."""
    from qvlm_export.quant.calibrate import SequentialCalibrator
    from qvlm_export.search.registry import get_method

    model, _, _ = feature_layer_runs["minus2"]
    recipe = _recipe("w8a8")
    samples = load_dataset("builtin:calib:2")
    states = []
    for blocks in (False, True):
        calibrator = SequentialCalibrator(load_vlm(model), samples, recipe, batch_size=2, device="cpu",
                                          block_weights=blocks)
        states.append(calibrator.run(get_method("rtn")(recipe).block))
    assert sorted(states[0].layers) == sorted(states[1].layers)
    for name, layer in states[0].layers.items():
        other = states[1].layers[name]
        assert torch.equal(layer.weight_codes, other.weight_codes) and torch.equal(layer.input_scale, other.input_scale)
