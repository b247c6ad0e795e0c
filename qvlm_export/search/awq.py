"""AWQ (Lin et al., MLSys 2024): activation-aware per-channel weight scaling, then clipping search.

For each group of Linears fed by one producer (see :mod:`.smoothing`):
``s = mean|x|^r / sqrt(max * min)`` for ``r`` on a grid of ``grid`` points in [0, 1); the
chosen ``r`` minimises the paper's ``||Q(W diag(s)) (diag(s)^-1 X) - W X||^2`` measured, as
llm-awq does, at the output of the module that consumes the group (self-attention for
q/k/v, the MLP for gate/up or fc1, o_proj and down_proj themselves), on the block's
quantized-stream inputs, with only that group pseudo-quantized. The scales are folded
into the producer. Then, per Linear except q/k (whose output error is not what attention
sees), llm-awq's clipping search picks a per-group shrink of the absmax range, and the
weights are rounded on that grid. Linears behind a nonlinearity with no foldable
producer (CLIP fc2, the projector) only get the clipping.

method_args: ``grid`` (20), ``clip`` (true), ``clip_grid`` (20), ``max_shrink`` (0.5),
``clip_tokens`` (512 input rows per Linear for the clipping search).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..quant.calibrate import BlockContext
from ..quant.modules import rtn_layer
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant
from .algorithms import awq_clip_ratio, awq_scales, pseudo_quantize
from .base import quantize_sequentially, record_rewritten_parameters, snapshot_parameters
from .baseline_configs import AWQConfig, method_config
from .registry import Capabilities, register_method
from .smoothing import ScaleGroup, find_scale_groups, fold_scales
from .stats import InputStats, capture_calls, collect_input_stats, masked_mse, unit_of

_NO_CLIP = ("q_proj", "k_proj")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def search_exponent(linears: list[nn.Linear], absmean: torch.Tensor, spec, grid: int,
                    error: Callable[[], float]) -> tuple[float, torch.Tensor, list[float]]:
    """AWQ's grid over ``r``: pseudo-quantize ``W diag(s(r))`` and score it with ``error()`` (the consumer's
    output error, computed by the caller with the weights in place). Returns ``(r, s(r), every r's error)``
    and leaves the weights as found."""
    originals = [lin.weight.detach().clone() for lin in linears]
    best, losses = (float("inf"), 0.0, torch.ones_like(absmean)), []
    try:
        for i in range(grid):
            ratio = i / grid
            s = awq_scales(absmean, ratio)
            with torch.no_grad():
                for lin, w0 in zip(linears, originals):
                    lin.weight.copy_(pseudo_quantize(w0 * s, spec.bits, spec.granularity, spec.group_size) / s)
                err = error()
            losses.append(err)
            if err < best[0]:
                best = (err, ratio, s)
    finally:
        with torch.no_grad():
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(w0)
    return best[1], best[2], losses


@register_method("awq")
class AWQ:
    config_type = AWQConfig
    capabilities = Capabilities()

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config: AWQConfig = method_config(recipe, AWQConfig)

    @property
    def args(self) -> dict:
        """The config as the recipe's ``method_args`` mapping (every key, defaults filled)."""
        return self.config.to_dict()

    def plan(self, calibrator) -> None:
        return None

    def search_scale(self, ctx: BlockContext, group: ScaleGroup, absmean: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Grid-search the exponent ``r``; returns it and its scales. Leaves the weights as found."""
        w = self.recipe.weights
        inspect_name = group.consumers[0].rsplit(".", 1)[0] if group.producer_is_norm else group.consumers[0]
        module = ctx.root.get_submodule(inspect_name)
        calls = capture_calls(ctx, inspect_name)
        with torch.no_grad():
            targets = [_first(module(*a, **k)) for a, k in calls]
        linears = [ctx.root.get_submodule(c) for c in group.consumers]

        def error() -> float:
            outs = [_first(module(*a, **k)) for a, k in calls]
            return masked_mse(ctx, outs, targets, unit_of(ctx, inspect_name))

        ratio, s, _ = search_exponent(linears, absmean, w, self.config.grid, error)
        return ratio, s

    def rule(self, name: str, linear: nn.Linear, stats: InputStats) -> LayerQuant:
        w, weight = self.recipe.weights, linear.weight.detach()
        if not self.config.clip or w.granularity == "tensor" or name.endswith(_NO_CLIP):
            return rtn_layer(weight, self.recipe)
        group = w.group_size if w.granularity == "group" else weight.shape[1]
        ratio = awq_clip_ratio(weight, stats.sample_rows(), w.bits, group, self.config.clip_grid,
                               self.config.max_shrink)
        return rtn_layer(weight, self.recipe, clip_ratio=ratio if w.granularity == "group" else ratio.reshape(-1))

    def block(self, ctx: BlockContext) -> None:
        before = snapshot_parameters(ctx)
        ratios = {}
        for group in find_scale_groups(ctx, through_gate=True):
            absmean = collect_input_stats(ctx, group.consumers[:1])[group.consumers[0]].channel_absmean
            ratio, s = self.search_scale(ctx, group, absmean)
            fold_scales(ctx.root, group, s)
            ratios[group.producer] = ratio
        record_rewritten_parameters(ctx, before)
        ctx.extras["awq_ratio"] = ratios
        keep = self.config.clip_tokens if self.config.clip else 0
        quantize_sequentially(ctx, self.rule, keep_tokens=keep)
