"""QIG (seed 002): the integrated-gradient maths by hand, and the scale search against AWQ's."""

from __future__ import annotations

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.errors import QvlmError
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.awq import AWQ
from qvlm_export.search.qig.config import qig_config
from qvlm_export.search.qig.ig import integrated_gradients, iqr_clip, normalise_per_sample, token_weights
from qvlm_export.search.qig.scale_search import (
    group_token_weights,
    scale_error,
    weighted_error,
    weighted_scale_search,
)
from qvlm_export.search.smoothing import find_scale_groups
from qvlm_export.search.stats import collect_input_stats

GEN = torch.Generator().manual_seed(0)


# -- token weights ---------------------------------------------------------------------------------
def test_token_weights_sum_to_one_per_sample_and_padding_gets_zero():
    ig = torch.randn(3, 7, 5, generator=GEN)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    for clip in (False, True):
        w = token_weights(ig, mask, clip)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=w.dtype), atol=1e-6, rtol=0)
        assert float(w[1, :3].abs().sum()) == 0.0
        assert bool((w >= 0).all())


def test_normalise_falls_back_to_uniform_when_all_scores_are_zero():
    w = normalise_per_sample(torch.zeros(2, 4), torch.tensor([[True] * 4, [False, True, True, True]]))
    torch.testing.assert_close(w, torch.tensor([[0.25] * 4, [0.0, 1 / 3, 1 / 3, 1 / 3]]))


def test_iqr_clip_by_hand():
    p = torch.tensor([[1.0, 1.0, 2.0, 2.0, 100.0]])  # Q1 = 1, Q3 = 2, IQR = 1: clip to [-0.5, 3.5]
    torch.testing.assert_close(iqr_clip(p), torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.5]]) / 9.5)


# -- integrated gradients --------------------------------------------------------------------------
def test_ig_is_exact_for_a_linear_function():
    c = torch.randn(4, 6, generator=GEN)
    x, x0 = torch.randn(4, 6, generator=GEN), torch.randn(4, 6, generator=GEN)
    ig = integrated_gradients(lambda z: (c * z).sum(), x, x0, steps=3)
    torch.testing.assert_close(ig, c * (x - x0))


def test_ig_completeness_improves_with_steps():
    a = torch.randn(6, 8, generator=GEN)
    x, x0 = torch.randn(5, 6, generator=GEN), torch.zeros(5, 6)

    def fn(z):
        return torch.tanh(z @ a).pow(2).sum() + (z.pow(3)).sum()

    gap = [abs(float(integrated_gradients(fn, x, x0, steps=m).sum() - (fn(x) - fn(x0)))) for m in (4, 32, 256)]
    total = abs(float(fn(x) - fn(x0)))
    assert gap[0] > gap[1] > gap[2], gap
    assert gap[2] < 0.02 * total, (gap, total)


# -- the scale search ------------------------------------------------------------------------------
def test_weighted_error_by_hand():
    out, ref = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]]), torch.zeros(1, 2, 2)
    w = torch.tensor([[0.25, 0.75]])
    assert weighted_error([out], [ref], [w], [None], "mae") == pytest.approx(0.25 * 2.0 / 1.0)
    assert weighted_error([out], [ref], [None], [None], "mse") == pytest.approx((5.0 + 0.0) / 2)
    mask = torch.tensor([[True, False]])
    assert weighted_error([out], [ref], [w], [mask], "mae") == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_calibrator(tiny_model_dir):
    def make(setting):
        vlm = load_vlm(tiny_model_dir)
        recipe = recipe_from_dict({"method": "qig", "setting": setting})
        return SequentialCalibrator(vlm, load_dataset("builtin:calib:8"), recipe, batch_size=4, device="cpu")
    return make


class _Done(Exception):
    pass


def test_uniform_token_weights_reproduce_awq_scale_search_exactly(tiny_calibrator):
    cal = tiny_calibrator("w4a16")
    awq = AWQ(recipe_from_dict({"method": "awq", "setting": "w4a16"}))
    checked = []

    def check(ctx):
        for group in find_scale_groups(ctx, through_gate=True):
            absmean = collect_input_stats(ctx, group.consumers[:1])[group.consumers[0]].channel_absmean
            ratio, s = awq.search_scale(ctx, group, absmean)
            ones = [torch.ones(x.shape[:2]) for x in ctx.q_inputs]
            for weights in (None, ones):
                r2, s2, losses = weighted_scale_search(ctx, group, absmean, ctx.recipe, 20, weights, "mse")
                assert r2 == ratio and torch.equal(s2, s), (group.producer, ratio, r2)
            checked.append(group.producer)
        if len(checked) > 6:
            raise _Done

    with pytest.raises(_Done):
        cal.run(check)
    assert len(checked) > 6


@pytest.mark.parametrize("setting", ["w3a16", "w4a8"])
def test_group_token_weights_are_distributions(tiny_calibrator, setting):
    cal = tiny_calibrator(setting)
    cfg = qig_config({"ig_steps": 4})
    seen = []

    def check(ctx):
        for group in find_scale_groups(ctx, through_gate=True):
            stats = collect_input_stats(ctx, group.consumers)
            for w, x in zip(group_token_weights(ctx, group, stats, cfg), ctx.q_inputs):
                assert w.shape == x.shape[:2]
                torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5, rtol=0)
            seen.append(group.producer)

    cal.run(check)
    assert any("language_model" in p for p in seen) and any("vision_tower" in p for p in seen)


def test_qig_quantizes_the_tiny_model_and_records_its_config(tiny_model_dir, tmp_path):
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    recipe = recipe_from_dict({"method": "qig", "setting": "w4a8", "method_args": {"ig_steps": 4, "grid": 5}})
    out = quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8", out=tmp_path / "s", progress=False)
    state = load_state(out)
    assert state.extras["qig"]["config"]["ig_steps"] == 4
    groups = state.extras["qig_groups"]
    assert not any(p.endswith("language_model.layers.0.self_attn.v_proj") for p in groups)  # GQA: no v->o fold
    assert all(g["weighted"] for g in groups.values())


def test_scale_error_is_the_search_loss_of_the_chosen_scales(tiny_calibrator):
    cal = tiny_calibrator("w4a8")
    checked = []

    def check(ctx):
        for group in find_scale_groups(ctx, through_gate=True):
            absmean = collect_input_stats(ctx, group.consumers[:1])[group.consumers[0]].channel_absmean
            for batches in (None, [1]):
                r, s, losses = weighted_scale_search(ctx, group, absmean, ctx.recipe, 10, None, "mse", batches=batches)
                assert scale_error(ctx, group, s, ctx.recipe, None, "mse", False, batches) == min(losses)
            assert losses[0] != weighted_scale_search(ctx, group, absmean, ctx.recipe, 10, None, "mse")[2][0]
            checked.append(group.producer)
        if len(checked) > 3:
            raise _Done

    with pytest.raises(_Done):
        cal.run(check)


@pytest.mark.parametrize("select_by", ["awq", "qig"])
def test_awq_candidate_keeps_the_scales_with_the_smaller_held_out_loss(tiny_model_dir, tmp_path, select_by):
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    recipe = recipe_from_dict({"method": "qig", "setting": "w3a16", "calibration": {"batch_size": 2},
                               "method_args": {"ig_steps": 4, "grid": 5, "awq_candidate": True, "select_by": select_by}})
    groups = load_state(quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8", out=tmp_path / "s",
                                 progress=False)).extras["qig_groups"]
    assert groups
    for producer, g in groups.items():
        c = g["candidate"]
        e_qig, e_awq = c["held_errors"]
        assert c["chosen"] == ("awq" if e_awq < e_qig else "qig"), producer
        assert g["ratio"] == (c["awq_ratio"] if c["chosen"] == "awq" else c["qig_ratio"]), producer


def test_bad_qig_option_is_one_line():
    with pytest.raises(QvlmError, match="unknown QIG option 'steps'"):
        qig_config({"steps": 3})
    with pytest.raises(QvlmError, match="loss must be one of"):
        qig_config({"loss": "l1"})
    with pytest.raises(QvlmError, match="select_by must be one of"):
        qig_config({"select_by": "both"})
