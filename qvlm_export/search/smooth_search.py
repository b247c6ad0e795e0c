"""SmoothQuant's migration strength chosen per scale group on the calibration objective.

The paper uses one ``alpha`` for the whole model (0.5 for Llama, up to 0.85 for GLM). On a model
with massive activations no single value fits: a q/k/v group with mild outliers wants little
migration (weights stay easy), ``down_proj`` behind a 3000x channel wants a lot. For every group
(:class:`~.smoothing.ScaleGroup`) this tries each ``alpha`` of a grid and keeps the one whose
*quantized* output error is smallest, measured like AWQ's scale search: at the output of the
module that consumes the group (self-attention for q/k/v, the MLP for gate/up, the Linear itself
otherwise) on the block's quantized-stream inputs, with only that group quantized:
``Q_w(W diag(s)) . Q_a(diag(s)^-1 x)``, ``Q_w`` the recipe's weight rounding, ``Q_a`` the static
per-tensor activation quantizer whose range is the calibration absmax of ``x / s``.
The chosen scales are folded exactly as with a fixed ``alpha``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..quant import functional as F
from ..quant.calibrate import BlockContext
from ..quant.primitives import absmax_scale
from ..quant.recipe import QuantRecipe
from .algorithms import pseudo_quantize
from .smoothing import ScaleGroup, consumer_weight_absmax, smoothquant_scales
from .stats import capture_calls, masked_mse, unit_of


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def alpha_grid(points: int) -> list[float]:
    """``points`` + 1 strengths evenly spaced over [0, 1]."""
    return [i / points for i in range(points + 1)]


def _quantized_inputs(linears: list[nn.Linear], s: torch.Tensor, scale: torch.Tensor | None,
                      bits: int | None) -> list:
    """Hooks feeding each Linear ``Q_a(x / s)`` (its weight already holds ``Q_w(W diag(s))``)."""
    def hook(_m, args):
        x = args[0] / s.to(args[0].dtype)
        if bits is not None:
            x = F.fake_quantize(x, scale.to(x.dtype), torch.zeros((), dtype=torch.int32), bits, True, "tensor")
        return (x, *args[1:])

    return [lin.register_forward_pre_hook(hook) for lin in linears]


def group_error_fn(ctx: BlockContext, group: ScaleGroup) -> tuple[list[nn.Linear], Callable[[], float]]:
    """The group's Linears and the MSE of its consuming module's output against the module as found."""
    inspect_name = group.consumers[0].rsplit(".", 1)[0] if group.producer_is_norm else group.consumers[0]
    module = ctx.root.get_submodule(inspect_name)
    calls = capture_calls(ctx, inspect_name)
    with torch.no_grad():
        targets = [_first(module(*a, **k)) for a, k in calls]
    unit = unit_of(ctx, inspect_name)

    def error() -> float:
        with torch.no_grad():
            outs = [_first(module(*a, **k)) for a, k in calls]
        return masked_mse(ctx, outs, targets, unit)

    return [ctx.root.get_submodule(c) for c in group.consumers], error


def search_alpha(ctx: BlockContext, group: ScaleGroup, act_absmax: torch.Tensor, recipe: QuantRecipe,
                 alphas: list[float]) -> tuple[float, torch.Tensor, list[float]]:
    """``(alpha, s(alpha), every alpha's error)`` minimising the group's quantized output error.

    Leaves the weights as found (the caller folds the returned scales).
    """
    w, bits = recipe.weights, recipe.activations.bits
    weight_absmax = consumer_weight_absmax(ctx.root, group)
    linears, error = group_error_fn(ctx, group)
    originals = [lin.weight.detach().clone() for lin in linears]
    best, losses = (float("inf"), alphas[0], None), []
    try:
        for alpha in alphas:
            s = smoothquant_scales(act_absmax, weight_absmax, alpha).to(originals[0].dtype)
            scale = None if bits is None else absmax_scale((act_absmax / s).max(), bits).to(s.device)
            with torch.no_grad():
                for lin, w0 in zip(linears, originals):
                    lin.weight.copy_(pseudo_quantize(w0 * s, w.bits, w.granularity, w.group_size))
            handles = _quantized_inputs(linears, s, scale, bits)
            try:
                err = error()
            finally:
                for h in handles:
                    h.remove()
            losses.append(err)
            if err < best[0]:
                best = (err, alpha, s)
    finally:
        with torch.no_grad():
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(w0)
    return best[1], best[2], losses
