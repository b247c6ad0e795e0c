"""Q-VLM's memory does not grow with its start candidates, and the soft rounding keeps one weight for backward.

At 7B widths a decoder layer is 0.81 GB of fp32 weights (``W``); the default starts (rtn, gptq,
gptq_mse) used to keep every candidate's rounding logits and GPTQ base weight alive (3-4 W while
the next start was evaluated) and the soft rounding kept ~5 weight-sized intermediates per Linear
for backward. These tests count bytes, so they fail when either comes back.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from qvlm_export.data.manifest import load_dataset
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.modules import activation_scale
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.qvlm import search_linear
from qvlm_export.search.qvlm.block_search import block_error
from qvlm_export.search.qvlm.search_linear import SearchLinear
from qvlm_export.search.qvlm.start import choose_start

LAYER = "model.language_model.layers.1"


def _recipe(setting: str):
    return recipe_from_dict({"method": "qvlm", "setting": setting, "calibration": {"samples": 8, "batch_size": 4}})


def _candidate_bytes(model_storages: set[int]) -> int:
    """Bytes of every live SearchLinear's base weight and logits that the model does not own."""
    counted, total = set(model_storages), 0
    for obj in gc.get_objects():
        if isinstance(obj, SearchLinear):
            for t in (obj.weight, obj.v):
                if t is None or t.untyped_storage().data_ptr() in counted:
                    continue
                counted.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("setting", ["w8a8", "w4a16"])
def test_start_selection_keeps_at_most_two_candidates(tiny_model_dir, setting):
    """While each of the default starts is evaluated, live candidates hold at most two block weights
    (the best so far and the one being evaluated), and the winner exactly its base and logits."""
    recipe = _recipe(setting)
    cal = SequentialCalibrator(load_vlm(tiny_model_dir), load_dataset("builtin:calib:8"), recipe, batch_size=4)
    masks = [b.attention_mask.bool() for b in cal.batches]
    seen: dict = {"peak": 0, "calls": 0}

    def block_fn(ctx):
        if ctx.units[0].name != LAYER:
            return
        weight_bytes = sum(lin.weight.numel() * 4 for _, lin in ctx.linears())
        storages = {p.untyped_storage().data_ptr() for p in ctx.root.parameters()}
        with torch.no_grad():
            targets = [ctx.forward(x, b, fp=True) for b, x in enumerate(ctx.fp_inputs)]
        bits = recipe.activations.bits
        act = {n: activation_scale(torch.tensor(4.0), bits) if bits else None for n, _ in ctx.linears()}

        def error():
            seen["calls"] += 1
            seen["peak"] = max(seen["peak"], _candidate_bytes(storages))
            return block_error(ctx, targets, masks)

        search, _, _ = choose_start(ctx, ("rtn", "gptq", "gptq_mse"), act, act, (1.0, 0.9, 0.8), error)
        seen["weight"], seen["final"] = weight_bytes, _candidate_bytes(storages)
        del search

    cal.run(block_fn)
    assert seen["calls"] >= 3, seen
    assert seen["peak"] <= 2 * seen["weight"], seen
    assert seen["final"] <= 2 * seen["weight"], seen


def test_soft_rounding_saves_one_weight_and_the_same_gradient(monkeypatch):
    """The soft weight's intermediates are recomputed in backward (saved: the input and one weight),
    and the gradient of the rounding logits is bit-identical to the plain autograd one."""
    torch.manual_seed(0)
    lin, x = nn.Linear(256, 384), torch.randn(2, 16, 256)
    sl = SearchLinear(lin, _recipe("w4a8"), activation_scale(x.abs().max(), 8), (1.0, 0.9))
    own = {t.untyped_storage().data_ptr() for t in (*sl.parameters(), *sl.buffers(), x)}
    saved: dict[int, int] = {}

    def pack(t):  # tensors the graph keeps for backward that did not exist before (not v, not x)
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sl(x)
    weight_bytes = lin.weight.numel() * 4
    # one soft weight, plus the input-sized tensors of the activation fake-quant (LSQ)
    assert sum(saved.values()) <= weight_bytes + 4 * x.numel() * 4, (saved, weight_bytes)
    (y.pow(2).sum() + sl.regularizer(10.0)).backward()
    grad, sl.v.grad = sl.v.grad.clone(), None
    monkeypatch.setattr(search_linear, "checkpoint", lambda fn, *args, **_: fn(*args))  # plain autograd
    (sl(x).pow(2).sum() + sl.regularizer(10.0)).backward()
    assert torch.equal(grad, sl.v.grad)
