"""The quant-state artifact: bit-identical reload, manifest, determinism and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.errors import QvlmError
from qvlm_export.evaluate.torch_answerer import TorchAnswerer
from qvlm_export.load.model import load_vlm
from qvlm_export.manifest import build_manifest, hash_tree, sha256_file, write_manifest
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.modules import apply_quant_state
from qvlm_export.quant.recipe import load_recipe, recipe_from_dict
from qvlm_export.quant.simulate import load_simulated
from qvlm_export.quant.state import STATE_FORMAT, load_state
from qvlm_export.search.api import quantize, state_to_cpu
from qvlm_export.search.registry import get_method


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with non-zero norm and Linear biases, so folds must rewrite (and save) biases."""
    vlm = load_vlm(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in vlm.model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=gen)
    out = tmp_path_factory.mktemp("biased_model")
    vlm.model.save_pretrained(out)
    vlm.processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_inputs(tiny_model_dir):
    return TorchAnswerer(load_vlm(tiny_model_dir)).inputs(load_dataset("builtin:eval:6"))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("recipe", [
    load_recipe("smoothquant-w4a8"),  # groups, activation scales, folded norm overrides
    recipe_from_dict({"method": "rtn", "setting": "w8a8", "weights": {"symmetric": False}}),  # uint8 codes
])
def test_saved_state_reloads_to_bit_identical_simulated_outputs(tmp_path, biased_model_dir, eval_inputs, recipe):
    vlm = load_vlm(biased_model_dir)
    cal = SequentialCalibrator(vlm, load_dataset("builtin:calib:8"), recipe, batch_size=8, device="cpu")
    state = cal.run(get_method(recipe.method)(recipe).block)
    state.save(tmp_path)
    write_manifest(tmp_path, build_manifest("quant-state", {}, {}, tmp_path))  # as quantize() does: loads verify it
    in_memory = logits(apply_quant_state(load_vlm(biased_model_dir).model, state_to_cpu(state)), eval_inputs)
    reloaded, info = load_simulated(tmp_path, model=str(biased_model_dir))
    assert torch.equal(logits(reloaded.model, eval_inputs), in_memory)
    assert torch.equal(logits(vlm.model, eval_inputs), in_memory)  # == the calibrator's live model
    assert info["setting"] == recipe.setting and info["method"] == recipe.method

    loaded = load_state(tmp_path)
    assert loaded.recipe == recipe and sorted(loaded.layers) == sorted(state.layers)
    for name, lq in state.layers.items():
        assert torch.equal(loaded.layers[name].weight_codes.to(torch.int32), lq.weight_codes.to(torch.int32))
    if recipe.method == "smoothquant":  # 4 CLIP layers x (2 LayerNorms x w, b + v_proj bias) + 4 x 2 RMSNorms
        suffixes = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in loaded.float_overrides}
        assert len(loaded.float_overrides) == 4 * 5 + 4 * 2, sorted(loaded.float_overrides)
        assert suffixes == {"layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
                            "v_proj.bias", "input_layernorm.weight", "post_attention_layernorm.weight"}
    else:  # asymmetric 8-bit: codes 0..255 survive the trip
        codes = torch.cat([lq.weight_codes.flatten().to(torch.int32) for lq in loaded.layers.values()])
        assert int(codes.max()) > 127 and int(codes.min()) >= 0


def test_quantize_api_writes_a_complete_deterministic_artifact(tmp_path, tiny_model_dir):
    a = quantize(model=tiny_model_dir, recipe="gptq-w4a16", calib="builtin:calib:8", out=tmp_path / "a",
                 progress=False)
    # the second run checkpoints every block, the third replays them: all three agree byte for byte
    for out in ("b", "c"):
        b = quantize(model=tiny_model_dir, recipe="gptq-w4a16", calib="builtin:calib:8", out=tmp_path / out,
                     progress=False, checkpoint_dir=tmp_path / "ckpt")
        assert sha256_file(a / "quant.safetensors") == sha256_file(b / "quant.safetensors")
    assert len(list((tmp_path / "ckpt").rglob("quant.safetensors"))) == 9  # 4 vision + projector + 4 decoder
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["kind"] == "quant-state" and manifest["outputs"] == hash_tree(a)
    assert manifest["config"]["recipe"] == load_recipe("gptq-w4a16").to_dict()
    assert set(manifest["inputs"]) == {"model", "calibration"} and manifest["deployable"] is True
    assert {"torch", "transformers"} <= set(manifest["libraries"])
    meta = json.loads((a / "state.json").read_text())
    assert manifest["search_seconds"] > 0 and meta["extras"]["calibration"]["samples"] == 8
    assert "search_seconds" not in meta["extras"]  # timings stay out of the hashed files
    assert all(m["granularity"] == "group" and m["act_bits"] is None for m in meta["layers"].values())


def test_failed_quantize_leaves_no_artifact(tmp_path, tiny_model_dir, monkeypatch):
    from qvlm_export.search import rtn

    def boom(self, ctx):
        raise QvlmError("search failed")

    monkeypatch.setattr(rtn.RTN, "block", boom)
    with pytest.raises(QvlmError, match="search failed"):
        quantize(model=tiny_model_dir, recipe="rtn-w8a8", calib="builtin:calib:4", out=tmp_path / "q",
                 progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_state_rejects_a_non_state_directory(tmp_path):
    with pytest.raises(QvlmError, match="quant.safetensors is missing"):
        load_state(tmp_path)


def test_corrupt_state_files_are_one_line_errors(tmp_path):
    for name in ("quant.safetensors", "recipe.yaml", "state.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(QvlmError, match=r"state.json is not valid JSON") as info:
        load_state(tmp_path, verify=False)  # no manifest: these are the parsers' own errors
    assert "\n" not in str(info.value)
    (tmp_path / "state.json").write_text(json.dumps({"format": STATE_FORMAT}))
    (tmp_path / "recipe.yaml").write_text("method: [unclosed")
    with pytest.raises(QvlmError, match=r"recipe.yaml: not valid YAML"):
        load_state(tmp_path, verify=False)
