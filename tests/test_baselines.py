"""RTN, SmoothQuant, AWQ and GPTQ: their arithmetic against references, and each doing its job.

Tiny random models give the parity-style checks (folds are exact, GPTQ/AWQ beat RTN);
the embedded trained model gives issue 3's acceptance numbers.
"""

from __future__ import annotations

import re

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.evaluate.logits import logit_sqnr_db, next_token_logits
from qvlm_export.load.model import load_vlm
from qvlm_export.quant import functional as F
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.quant.simulate import load_simulated
from qvlm_export.search.algorithms import awq_clip_ratio, awq_scales, gptq_quantize, pseudo_quantize
from qvlm_export.search.api import quantize
from qvlm_export.search.smoothing import find_scale_groups, fold_scales, smoothquant_scales

GEN = torch.Generator().manual_seed(0)


# -- arithmetic ----------------------------------------------------------------------------------
def test_smoothquant_scales_by_hand():
    s = smoothquant_scales(torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 4.0, 1.0]), alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.5, 3.0]))
    assert torch.allclose(smoothquant_scales(torch.tensor([4.0]), torch.tensor([2.0]), alpha=1.0), torch.tensor([4.0]))


def test_awq_scales_are_normalised_powers_of_the_activation_mean():
    mean = torch.tensor([0.5, 2.0, 8.0])
    assert torch.equal(awq_scales(mean, 0.0), torch.ones(3))
    s = awq_scales(mean, 1.0)
    assert torch.allclose(s, mean / 2.0) and float(s.max() * s.min()) == pytest.approx(1.0)


def test_awq_clip_ratio_is_the_grid_argmin_of_each_groups_output_error():
    w = torch.randn(6, 40, generator=GEN)
    w[0, 3] = 9.0  # an outlier that clipping should sacrifice
    x = torch.randn(64, 40, generator=GEN)
    ratio = awq_clip_ratio(w, x, bits=4, group_size=16, grid=20, max_shrink=0.5)
    assert ratio.shape == (6, 3) and float(ratio[0, 0]) < 1.0
    for r in range(6):
        for g, cols in enumerate([slice(0, 16), slice(16, 32), slice(32, 40)]):
            wg, xg = w[r:r + 1, cols], x[:, cols]
            errs = {round(1 - i / 20, 4): float(((pseudo_quantize(wg, 4, "channel", 0, 1 - i / 20) - wg) @ xg.t()).pow(2).mean())
                    for i in range(10)}
            assert errs[round(float(ratio[r, g]), 4)] == pytest.approx(min(errs.values()), rel=1e-4)


def _rtn_codes(w, bits, granularity, group_size):
    scale, zp = F.choose_qparams(w, bits, True, granularity, group_size)
    return F.quantize(w, scale, zp, bits, True, granularity, group_size)


@pytest.mark.parametrize("granularity,static", [("group", False), ("group", True), ("channel", False)])
def test_gptq_with_uncorrelated_inputs_is_rtn(granularity, static):
    w = torch.randn(8, 48, generator=GEN)
    h = torch.diag(torch.rand(48, generator=GEN) + 0.5)  # no cross terms: no error to spread
    codes, scale, _ = gptq_quantize(w, h, 4, granularity, 16, static_groups=static, damp=0.0 + 1e-9)
    assert torch.equal(codes, _rtn_codes(w, 4, granularity, 16))
    assert torch.allclose(scale, F.choose_qparams(w, 4, True, granularity, 16)[0])


def _correlated_inputs(n=512, k=64):
    base = torch.randn(n, 8, generator=GEN)
    return base @ torch.randn(8, k, generator=GEN) + 0.1 * torch.randn(n, k, generator=GEN)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output_error(act_order):
    w, x = torch.randn(32, 64, generator=GEN), _correlated_inputs()
    h = 2 * x.t() @ x / x.shape[0]
    codes, scale, zero = gptq_quantize(w, h, 3, "group", 32, act_order=act_order, block_size=16)
    w_gptq = F.dequantize(codes, scale, zero, "group", 32)
    w_rtn = pseudo_quantize(w, 3, "group", 32)
    err_gptq, err_rtn = ((w_gptq - w) @ x.t()).pow(2).sum(), ((w_rtn - w) @ x.t()).pow(2).sum()
    assert float(err_gptq) < 0.5 * float(err_rtn)
    assert int(codes.min()) >= -4 and int(codes.max()) <= 3
    if act_order:  # groups stay contiguous with static scales from the original weight: deployable
        assert torch.allclose(scale, F.choose_qparams(w, 3, True, "group", 32)[0])


def test_gptq_lazy_batches_match_column_by_column_updates():
    w, x = torch.randn(16, 64, generator=GEN), _correlated_inputs()
    h = 2 * x.t() @ x / x.shape[0]
    lazy = gptq_quantize(w, h, 4, "group", 32, block_size=32)[0]
    eager = gptq_quantize(w, h, 4, "group", 32, block_size=1)[0]
    assert (lazy == eager).float().mean().item() > 0.99


def test_gptq_zeroes_dead_inputs():
    w, x = torch.randn(4, 32, generator=GEN), _correlated_inputs(k=32)
    x[:, 5] = 0
    codes = gptq_quantize(w, 2 * x.t() @ x / 512, 4, "group", 16)[0]
    assert int(codes[:, 5].abs().max()) == 0


# -- folds are exact -------------------------------------------------------------------------------
def test_scale_folds_leave_the_fp_model_unchanged(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir)
    with torch.no_grad():  # random init leaves biases at 0, which would hide a missed bias fold
        for m in vlm.model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=GEN)
    samples = load_dataset("builtin:eval:8")
    before = next_token_logits(vlm, samples)
    recipe = recipe_from_dict({"method": "awq", "setting": "w4a16"})
    found = []

    def fold_random(ctx):
        for group in find_scale_groups(ctx, through_gate=True):
            found.append(re.sub(r"^.*layers\.\d+\.", "", group.producer))
            fold_scales(ctx.root, group, torch.rand(ctx.root.get_submodule(group.consumers[0]).in_features,
                                                    generator=GEN) * 4 + 0.25)

    SequentialCalibrator(vlm, load_dataset("builtin:calib:4"), recipe, batch_size=4, device="cpu").run(fold_random)
    # CLIP: both norms and v->out_proj; Llama with 2 KV heads for 4 heads: norms and up->down, no v->o
    assert found.count("layer_norm1") == found.count("layer_norm2") == 4
    assert sum(p.endswith("self_attn.v_proj") for p in found) == 4
    assert found.count("input_layernorm") == found.count("mlp.up_proj") == 4
    assert logit_sqnr_db(before, next_token_logits(vlm, samples)) > 90


# -- each method does its job on a tiny model -------------------------------------------------------
@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a few activation-outlier channels moved into its norms (FP-equivalent)."""
    vlm = load_vlm(tiny_model_dir)
    with torch.no_grad():
        for layer in vlm.model.model.language_model.layers:
            for c, factor in ((3, 30.0), (77, 20.0)):
                for norm, linears in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                      (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                    norm.weight[c] *= factor
                    for name in linears:
                        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                        module.weight[:, c] /= factor
    out = tmp_path_factory.mktemp("outlier_model")
    vlm.model.save_pretrained(out)
    vlm.processor.save_pretrained(out)
    return out


def _sqnr(model_dir, recipe, tmp_path, samples, calib="builtin:calib:8"):
    ref = next_token_logits(load_vlm(model_dir), samples)
    state = quantize(model=model_dir, recipe=recipe, calib=calib, out=tmp_path / recipe, progress=False)
    return logit_sqnr_db(ref, next_token_logits(load_simulated(state)[0], samples))


def test_smoothquant_rescues_w8a8_from_activation_outliers(outlier_model_dir, tmp_path):
    samples = load_dataset("builtin:eval:32")
    rtn, sq = (_sqnr(outlier_model_dir, r, tmp_path, samples) for r in ("rtn-w8a8", "smoothquant-w8a8"))
    assert sq > rtn + 8.0, (rtn, sq)  # measured 19.7 vs 35.3 dB


def test_awq_and_gptq_beat_rtn_at_w4a16_on_a_random_model(tiny_model_dir, tmp_path):
    samples = load_dataset("builtin:eval:32")
    rtn, awq, gptq = (_sqnr(tiny_model_dir, r, tmp_path, samples) for r in ("rtn-w4a16", "awq-w4a16", "gptq-w4a16"))
    assert awq > rtn + 3.0 and gptq > rtn + 3.0, (rtn, awq, gptq)  # measured 14.1, 23.5, 31.6 dB


# -- issue 3's acceptance numbers on the embedded trained model ----------------------------------------
def test_embedded_rtn_w8a8_stays_close_to_fp(embedded_model_dir, tmp_path):
    """Quantized through the CLI, as every results-table row is reproduced.

    Issue 3's bar (within 1.0 point of FP on all 500 questions) is checked by the results
    table; on 100 questions a point is one answer, so this also bounds answer agreement
    (measured 0.92 FP, 0.91 quantized, 97 of 100 answers identical).
    """
    from qvlm_export.cli import main
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.backends import make_answerer

    state = tmp_path / "q"
    assert main(["quantize", "--recipe", "rtn-w8a8", "--calib", "builtin:calib:16", "--out", str(state),
                 "--no-progress"]) == 0
    samples = load_dataset("builtin:eval:100")
    fp = evaluate(make_answerer(model=str(embedded_model_dir))[0], samples, progress=False)
    q = evaluate(make_answerer(quant=str(state))[0], samples, progress=False)
    agree = sum(a == b for a, b in zip(fp.predictions, q.predictions)) / len(samples)
    assert fp.overall >= 0.9 and q.overall >= fp.overall - 0.02 and agree >= 0.95, (fp.overall, q.overall, agree)


def test_embedded_awq_and_gptq_beat_rtn_logit_sqnr_at_w4a16(embedded_model_dir, tmp_path):
    from qvlm_export.evaluate.logits import LOGIT_SQNR_DATA

    samples = load_dataset(LOGIT_SQNR_DATA)
    ref = next_token_logits(load_vlm(embedded_model_dir), samples)
    sqnr = {}
    for recipe in ("rtn-w4a16", "awq-w4a16", "gptq-w4a16"):
        state = quantize(model=embedded_model_dir, recipe=recipe, calib="builtin:calib:16", out=tmp_path / recipe,
                         progress=False)
        sqnr[recipe] = logit_sqnr_db(ref, next_token_logits(load_simulated(state)[0], samples))
    # measured: rtn 27.5, awq 30.1, gptq 36.4 dB
    assert sqnr["awq-w4a16"] > sqnr["rtn-w4a16"] and sqnr["gptq-w4a16"] > sqnr["rtn-w4a16"], sqnr
