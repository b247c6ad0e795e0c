"""What every baseline shares: the sequential quantize loop and the bookkeeping of rewritten floats.

:func:`quantize_sequentially` walks a block's input groups in forward order; for each it
measures the group's inputs on the quantized stream (earlier groups already quantized,
their activation quantizers on), quantizes each Linear with the method's weight rule,
gives it a static per-tensor input scale when the recipe quantizes activations, and
swaps it in. Only the weight rule differs between RTN, SmoothQuant, AWQ and GPTQ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ..quant.calibrate import BlockContext
from ..quant.primitives import absmax_scale
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant
from .stats import InputStats, collect_input_stats, input_groups

WeightRule = Callable[[str, nn.Linear, InputStats], LayerQuant]


def static_input_scale(stats: InputStats, recipe: QuantRecipe) -> torch.Tensor | None:
    """Symmetric per-tensor scale from the absmax of the calibration inputs (None for A16)."""
    bits = recipe.activations.bits
    if bits is None:
        return None
    return absmax_scale(stats.absmax, bits).to(stats.absmax.device)


def quantize_sequentially(ctx: BlockContext, rule: WeightRule, hessian: bool = False, keep_tokens: int = 0) -> None:
    """Quantize the block's Linears group by group with ``rule``, each with its static input scale."""
    for group in input_groups(ctx):
        stats = collect_input_stats(ctx, group, hessian=hessian, keep_tokens=keep_tokens)
        for name in group:
            layer = rule(name, ctx.root.get_submodule(name), stats[name])
            layer = dataclasses.replace(layer, input_scale=static_input_scale(stats[name], ctx.recipe),
                                        act_bits=ctx.recipe.activations.bits)
            ctx.replace_linear(name, layer)


def snapshot_parameters(ctx: BlockContext) -> dict[str, torch.Tensor]:
    """Copies of every float parameter of the block, by full model name."""
    out = {}
    for unit, module in zip(ctx.units, ctx.modules):
        for sub, p in module.named_parameters():
            out[f"{unit.name}.{sub}"] = p.detach().clone()
    return out


def record_rewritten_parameters(ctx: BlockContext, before: dict[str, torch.Tensor]) -> list[str]:
    """Record (``ctx.set_override``) every parameter a fold changed, except weights about to be quantized.

    Call after folding and before quantizing: quantized weights travel as integer codes,
    everything else a fold touched (norm weights and biases, Linear biases) as an override.
    """
    quantized = {f"{name}.weight" for name, _ in ctx.linears()}
    current = snapshot_parameters(ctx)
    changed = []
    for name, old in before.items():
        if name in quantized or torch.equal(current[name], old):
            continue
        ctx.set_override(name, current[name])
        changed.append(name)
    return changed
