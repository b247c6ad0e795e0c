"""Q-VLM's block search starts from the best layer-wise solution and can only move down from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.algorithms import gptq_quantize
from qvlm_export.search.qvlm.block_search import block_error, search_block, split_batches
from qvlm_export.search.qvlm.config import QVLMConfig
from qvlm_export.search.qvlm.ded import detached_context
from qvlm_export.search.registry import get_method

LAYER = "model.language_model.layers.1"


@pytest.fixture(scope="module")
def calib():
    return load_dataset("builtin:calib:16")


def _block_errors(model_dir, calib, setting: str, cfg: QVLMConfig) -> dict:
    """GPTQ's and the searched block error of one decoder layer, on the same inputs."""
    recipe = recipe_from_dict({"method": "qvlm", "setting": setting, "calibration": {"samples": 16, "batch_size": 4}})
    vlm = load_vlm(model_dir)
    cal = SequentialCalibrator(vlm, calib, recipe, batch_size=4)
    masks = [b.attention_mask.bool() for b in cal.batches]
    seen: dict = {}

    def block_fn(ctx):
        if ctx.units[0].name != LAYER:
            return
        with torch.no_grad():
            targets = [ctx.forward(x, b, fp=True) for b, x in enumerate(ctx.fp_inputs)]
        copy = detached_context(ctx.units, ctx.modules, ctx.q_inputs, ctx.fp_inputs, ctx.kwargs[0],
                                dataclasses.replace(recipe, method="gptq"))
        get_method("gptq")(copy.recipe).block(copy)
        seen["gptq"] = block_error(copy, targets, masks, cfg.token_normalised)
        seen.update(search_block(ctx, cfg, masks, seed=0))
        seen["searched"] = block_error(ctx, targets, masks, cfg.token_normalised)

    cal.run(block_fn)
    return seen


@pytest.mark.parametrize("setting", ["w3a16", "w4a8"])
def test_search_never_ends_above_gptq(tiny_model_dir, calib, setting):
    cfg = QVLMConfig(iterations=40, holdout=0.0, progress=False)
    seen = _block_errors(tiny_model_dir, calib, setting, cfg)
    assert seen["start"].startswith("gptq"), seen  # on a random layer GPTQ's rounding is the best start
    assert seen["error"] <= seen["init_error"] <= seen["gptq"] * (1 + 1e-6), seen
    assert seen["searched"] == pytest.approx(seen["error"], rel=1e-6)  # what was committed is what was measured
    assert seen["error"] < seen["rtn_error"]


def test_gptq_start_reproduces_the_baseline_exactly(tiny_model_dir, calib):
    """Started at ``gptq`` alone with no search steps, the block is the GPTQ baseline's block."""
    cfg = QVLMConfig(iterations=0, start=("gptq",), holdout=0.0, progress=False)
    seen = _block_errors(tiny_model_dir, calib, "w4a16", cfg)
    assert seen["init_error"] == pytest.approx(seen["gptq"], rel=1e-5), seen


def test_gptq_seen_rounds_to_its_codes():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 64, generator=gen), torch.randn(256, 64, generator=gen)
    seen = torch.zeros_like(w)
    codes, scale, _ = gptq_quantize(w, 2 * x.t() @ x / 256, 4, "group", 32, seen=seen)
    expanded = scale.repeat_interleave(32, dim=1)
    assert torch.equal(torch.clamp(torch.round(seen / expanded), -8, 7).to(torch.int32), codes)
    fixed = scale * 0.9
    codes_fixed, scale_fixed, _ = gptq_quantize(w, 2 * x.t() @ x / 256, 4, "group", 32, fixed_scale=fixed)
    assert torch.equal(scale_fixed, fixed) and not torch.equal(codes_fixed, codes)


def test_split_batches_holds_out_the_tail():
    assert split_batches(4, 0.25) == ([0, 1, 2], [3])
    assert split_batches(2, 0.25) == ([0, 1], [])  # too few batches to hold one out
    assert split_batches(8, 0.0) == (list(range(8)), [])
