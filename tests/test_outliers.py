"""Outlier techniques: folded rotations and gate smoothing preserve the function; fallback and the
per-group SmoothQuant strength do what the recipe says (issue 21)."""

from __future__ import annotations

import json

import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.quant.modules import apply_overrides
from qvlm_export.quant.outlier_options import RotationSpec
from qvlm_export.quant.recipe import load_recipe, recipe_from_dict
from qvlm_export.quant.simulate import load_simulated
from qvlm_export.quant.state import load_state
from qvlm_export.search.api import quantize
from qvlm_export.search.rotation import rotate_model, rotated_parameters, rotation_matrix

GEN = torch.Generator().manual_seed(0)


def _tied_model(hidden: int = 96, seed: int = 0):
    """A tiny random LLaVA whose Llama has tied embeddings, non-trivial norm gains and projector bias, in float64."""
    from transformers import LlavaForConditionalGeneration

    from qvlm_export.load.tiny import build_tokenizer, tiny_llava_config

    cfg = tiny_llava_config(build_tokenizer(), hidden=hidden, heads=4, kv_heads=2, text_mlp=160)
    cfg.text_config.tie_word_embeddings = cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(torch.rand(p.shape, generator=GEN, dtype=torch.float64) * 2 + 0.1)
        model.model.multi_modal_projector.linear_2.bias.normal_(0, 0.1, generator=GEN)
        model.model.language_model.embed_tokens.weight[:, 5] *= 40  # a massive channel
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    return model


def _logits(model) -> torch.Tensor:
    cfg = model.config
    ids = torch.tensor([[1] + [cfg.image_token_index] * cfg.image_seq_length + [7, 9, 11, 3, 20, 8]])
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("n", [576, 96, 128, 9])
def test_rotation_matrix_is_orthogonal_and_seeded(n):
    q = rotation_matrix(n, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(n, seed=3)) and not torch.equal(q, rotation_matrix(n, seed=4))
    if n == 576:  # 64 x 9: a unit channel spreads over every channel, none above 1/8 * max|R9|
        assert int((q[7].abs() > 0).sum()) == 576 and float(q.abs().max()) < 0.125


@pytest.mark.parametrize("hidden", [96, 128])
def test_folded_rotation_preserves_the_model_and_survives_the_state_round_trip(hidden):
    model = _tied_model(hidden)
    before = _logits(model)
    residual_absmax = model.model.language_model.embed_tokens.weight.detach().abs().amax(0)
    info = rotate_model(model, RotationSpec(seed=0))
    after = _logits(model)
    assert info["untied_lm_head"] and not model.config.tie_word_embeddings
    assert float((after - before).norm() / before.norm()) < 1e-6
    rotated = model.model.language_model.embed_tokens.weight.detach().abs().amax(0)
    assert float(rotated.max() / rotated.median()) < 0.5 * float(residual_absmax.max() / residual_absmax.median())
    # the quant state's path: a fresh tied model plus the rotated parameters as overrides
    params = dict(model.named_parameters(remove_duplicate=False))
    overrides = {n: params[n].detach().clone() for n in rotated_parameters(model)}
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight",
            "model.multi_modal_projector.linear_2.bias"} <= set(overrides)
    fresh = _tied_model(hidden)
    apply_overrides(fresh, overrides)
    assert fresh.lm_head.weight is not fresh.model.language_model.embed_tokens.weight
    assert torch.allclose(_logits(fresh), after, rtol=0, atol=1e-9 * float(after.abs().max()))


def test_gate_smoothing_fold_is_exact():
    """down_proj smoothed through up_proj: up's rows / s, down's columns * s."""
    from qvlm_export.search.smoothing import ScaleGroup, fold_scales

    model = _tied_model()
    before = _logits(model)
    for i in range(4):
        s = torch.rand(160, generator=GEN, dtype=torch.float64) * 50 + 0.02
        p = f"model.language_model.layers.{i}.mlp"
        fold_scales(model, ScaleGroup(f"{p}.up_proj", (f"{p}.down_proj",)), s)
    assert float((_logits(model) - before).norm() / before.norm()) < 1e-10


# -- recipes ---------------------------------------------------------------------------------------
def test_outlier_sections_are_off_unless_named_and_validated():
    plain = load_recipe("smoothquant-w8a8")
    assert plain.rotation is None and plain.fallback is None
    assert set(plain.to_dict()) == {"method", "setting", "weights", "activations", "modules", "calibration",
                                    "method_args", "version"}
    rec = recipe_from_dict({"method": "rtn", "setting": "w8a8", "rotation": {"seed": 2},
                            "fallback": {"max_layers": 3}})
    assert rec.rotation.seed == 2 and rec.fallback.criterion == "sqnr"
    assert recipe_from_dict(rec.to_dict()) == rec
    with pytest.raises(QvlmError, match="quantizes no activations"):
        recipe_from_dict({"method": "rtn", "setting": "w4a16", "fallback": {"max_layers": 1}})
    with pytest.raises(QvlmError, match="criterion must be one of"):
        recipe_from_dict({"method": "rtn", "setting": "w8a8", "fallback": {"criterion": "vibes"}})
    with pytest.raises(QvlmError, match="kind must be one of"):
        recipe_from_dict({"method": "rtn", "setting": "w8a8", "rotation": {"kind": "spin"}})


# -- end to end on the tiny model --------------------------------------------------------------------
def test_fallback_keeps_the_worst_inputs_float(tiny_model_dir, tmp_path):
    rec = recipe_from_dict({"method": "rtn", "setting": "w8a8", "fallback": {"max_layers": 3},
                            "calibration": {"samples": 8, "batch_size": 4}})
    out = quantize(model=tiny_model_dir, recipe=rec, calib="builtin:calib:8", out=tmp_path / "fb", progress=False)
    state = load_state(out)
    floats = sorted(n for n, lq in state.layers.items() if lq.input_scale is None)
    record = state.extras["fallback"]
    assert len(floats) == 3 and floats == sorted(record["layers"])
    ranked = [r[0] for r in record["ranking"]]
    assert sorted(ranked[:3]) == floats  # the three lowest input-rounding SQNRs
    dbs = [r[1] for r in record["ranking"]]
    assert dbs == sorted(dbs)
    assert all(state.layers[n].act_bits is None for n in floats)
    assert sum(lq.input_scale is not None for lq in state.layers.values()) == len(state.layers) - 3
    meta = json.loads((out / "state.json").read_text())
    assert all(meta["layers"][n]["act_bits"] is None for n in floats)
    assert 0 < record["float_mac_share"] < 1


def test_smoothquant_per_group_alpha_and_gate_smoothing(tiny_model_dir, tmp_path):
    base = {"method": "smoothquant", "setting": "w8a8", "calibration": {"samples": 8, "batch_size": 4}}
    rec = recipe_from_dict({**base, "method_args": {"alpha_grid": 4, "through_gate": True}})
    state = load_state(quantize(model=tiny_model_dir, recipe=rec, calib="builtin:calib:8", out=tmp_path / "sq",
                                progress=False))
    alphas = state.extras["smoothquant_alpha"]
    gates = [p for p in alphas if p.endswith("mlp.up_proj")]
    assert len(gates) == 4 and set(alphas.values()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    # the gate fold moved down_proj's input range: its static scale differs from plain SmoothQuant's
    plain = load_state(quantize(model=tiny_model_dir, recipe=recipe_from_dict(base), calib="builtin:calib:8",
                                out=tmp_path / "plain", progress=False))
    assert "smoothquant_alpha" not in plain.extras
    down = "model.language_model.layers.0.mlp.down_proj"
    assert float(state.layers[down].input_scale) != pytest.approx(float(plain.layers[down].input_scale), rel=1e-3)


def test_rotated_state_simulates_the_rotated_model(tmp_path):
    """quantize with rotation on a tied model: the simulated model (overrides untie lm_head) loads and stays close."""
    from qvlm_export.evaluate.text import torch_logits_fn
    from qvlm_export.load.model import load_vlm
    from qvlm_export.load.tiny import build_processor, build_tokenizer

    model = _tied_model(hidden=128).float()
    model.save_pretrained(tmp_path / "m")
    build_processor(build_tokenizer()).save_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 7, 9, 11, 3, 20, 8, 12, 5]]).numpy()
    ref = torch_logits_fn(load_vlm(tmp_path / "m").model)(ids)
    rec = recipe_from_dict({"method": "rtn", "setting": "w8a8", "rotation": {"seed": 0},
                            "calibration": {"samples": 8, "batch_size": 4}})
    out = quantize(model=tmp_path / "m", recipe=rec, calib="builtin:calib:8", out=tmp_path / "q", progress=False)
    state = load_state(out)
    assert "lm_head.weight" in state.float_overrides and state.extras["rotation"]["untied_lm_head"]
    vlm, _ = load_simulated(out)
    assert vlm.model.lm_head.weight is not vlm.model.model.language_model.embed_tokens.weight
    got = torch_logits_fn(vlm.model)(ids)
    assert float(((got - ref) ** 2).sum() / (ref ** 2).sum()) < 1e-2


def test_rotated_fallback_state_exports_and_matches_onnx_runtime(tmp_path):
    """Rotation (tied model: lm_head untied by the state) + fallback: the bundle computes the simulated model,
    the fallback layers are weight-only DQ + MatMul (no input Q/DQ), and check-trt's static rules accept it."""
    import sys
    from pathlib import Path

    import onnx

    sys.path.insert(0, str(Path(__file__).parent))
    import _export_helpers as H

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.engine.check_trt import check_path
    from qvlm_export.export.api import export_bundle
    from qvlm_export.load.tiny import build_processor, build_tokenizer
    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.ort_runner import ort_runner

    _tied_model(hidden=128).float().save_pretrained(tmp_path / "m")
    build_processor(build_tokenizer()).save_pretrained(tmp_path / "m")
    rec = recipe_from_dict({"method": "rtn", "setting": "w8a8", "rotation": {"seed": 1}, "fallback": {"max_layers": 2},
                            "calibration": {"samples": 8, "batch_size": 4}})
    state_dir = quantize(model=tmp_path / "m", recipe=rec, calib="builtin:calib:8", out=tmp_path / "q", progress=False)
    floats = sorted(load_state(state_dir).extras["fallback"]["layers"])
    bundle = export_bundle(model=tmp_path / "m", quant=state_dir, out=tmp_path / "b", dtype="fp32")
    info = read_bundle(bundle, verify=False)
    nodes = {n.name for g in ("vision", "decoder") for n in onnx.load(str(info.graph_path(g))).graph.node}
    for layer in floats:
        assert f"{layer}/weight_dq" in nodes and f"{layer}/MatMul" in nodes and f"{layer}/input_q" not in nodes
    assert sum(n.endswith("/input_q") for n in nodes) == len(load_state(state_dir).layers) - 2
    assert check_path(bundle).ok
    vlm, _ = load_simulated(state_dir)
    batch = H.prompt_batch(vlm.processor, load_dataset("builtin:eval:4"))
    reference, tokens = H.torch_steps(vlm, batch, steps=1)
    with ort_runner(bundle, "faithful", threads=1) as runner:
        got = H.runner_steps(runner, batch, tokens)
    H.assert_logit_parity(H.relative_logit_errors(reference, got, batch["attention_mask"]), "w8a8")
