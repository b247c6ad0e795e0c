"""QIG's orchestration per scale group: the IG token weights, then the token-weighted scale search.

For a group (producer -> consumers, :mod:`..smoothing`) the *scored module* ``f`` is the
one AWQ scores (self-attention for q/k/v, the MLP for gate/up or fc1, o_proj and down_proj
alone); ``f_q`` is a copy of it with the group's consumers RTN-quantized at the recipe's
granularity (and, with quantized activations, their inputs fake-quantized at the static
absmax step, straight-through). See docs/qig.md for every definition.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...quant import functional as F
from ...quant.calibrate import BlockContext
from ...quant.primitives import absmax_scale
from ...quant.recipe import QuantRecipe
from ..algorithms import pseudo_quantize
from ..awq import search_exponent
from ..smoothing import ScaleGroup
from ..stats import InputStats, batch_mask, capture_calls, unit_of
from .config import QIGConfig
from .ig import integrated_gradients, token_weights

Call = tuple[tuple, dict[str, Any]]
_ZERO = torch.zeros((), dtype=torch.int32)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def scored_module_name(group: ScaleGroup) -> str:
    """The module whose output the search scores (AWQ's choice)."""
    return group.consumers[0].rsplit(".", 1)[0] if group.producer_is_norm else group.consumers[0]


def hidden_of(call: Call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call: Call, x: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def fp_stream_calls(ctx: BlockContext, name: str) -> list[Call]:
    """What module ``name`` receives per batch on the full-precision stream (the block's FP copy)."""
    u = unit_of(ctx, name)
    rel = name[len(ctx.units[u].name) + 1:]
    module = ctx.fp_modules[u].get_submodule(rel) if rel else ctx.fp_modules[u]
    calls: list[Call] = []
    handle = module.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            for b, x in enumerate(ctx.fp_inputs):
                ctx.forward(x, b, fp=True)
    finally:
        handle.remove()
    return calls


def quantized_copy(ctx: BlockContext, group: ScaleGroup, stats: dict[str, InputStats]) -> nn.Module:
    """``f_q``: a copy of the scored module with the group's consumers RTN-quantized (and A-bit inputs)."""
    name, recipe = scored_module_name(group), ctx.recipe
    fq = copy.deepcopy(ctx.root.get_submodule(name))
    w, abits = recipe.weights, recipe.activations.bits
    for consumer in group.consumers:
        rel = consumer[len(name) + 1:]
        lin = fq.get_submodule(rel) if rel else fq
        with torch.no_grad():
            lin.weight.copy_(pseudo_quantize(lin.weight.float(), w.bits, w.granularity, w.group_size).to(lin.weight.dtype))
        if abits is not None:
            step = absmax_scale(stats[consumer].absmax, abits).to(lin.weight.device)
            lin.register_forward_pre_hook(lambda _m, a, s=step: (F.fake_quantize(a[0], s.to(a[0].dtype), _ZERO, abits),))
    fq.requires_grad_(False)
    return fq


def _row_mask(ctx: BlockContext, unit: int, b: int, shape: torch.Size) -> torch.Tensor | None:
    mask = batch_mask(ctx, unit, b)
    if mask is None or tuple(mask.shape) != tuple(shape[:2]):
        return None
    return mask.to(torch.bool)


def group_token_weights(ctx: BlockContext, group: ScaleGroup, stats: dict[str, InputStats],
                        cfg: QIGConfig) -> list[torch.Tensor]:
    """Per batch ``[B, T]`` QIG token weights for the group (summing to 1 per sample over real tokens)."""
    name = scored_module_name(group)
    f = ctx.root.get_submodule(name)
    fq = quantized_copy(ctx, group, stats)
    weight_only = ctx.recipe.activations.bits is None
    use_quantized = cfg.baseline == "quantized" or (cfg.baseline == "auto" and not weight_only)
    clip = cfg.iqr_clip == "on" or (cfg.iqr_clip == "auto" and weight_only)
    q_calls = capture_calls(ctx, name)
    fp_calls = fp_stream_calls(ctx, name) if use_quantized else q_calls
    unit = unit_of(ctx, name)
    frozen = [p for p in f.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    out = []
    try:
        for b, (qc, fc) in enumerate(zip(q_calls, fp_calls)):
            x = hidden_of(fc).detach()
            baseline = hidden_of(qc).detach() if use_quantized else torch.zeros_like(x)
            mask = None if cfg.code_faithful else _row_mask(ctx, unit, b, x.shape)  # release: padding counts
            fn = _objective(f, fq, qc, mask, cfg, no_grad_q=cfg.code_faithful and use_quantized)
            out.append(token_weights(integrated_gradients(fn, x, baseline, cfg.ig_steps).float(), mask, clip))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out


def _objective(f: nn.Module, fq: nn.Module, call: Call, mask: torch.Tensor | None, cfg: QIGConfig, no_grad_q: bool):
    """``F(Z) = amplify * sum_{b,t real} mean_c |f(Z) - f_q(Z)|``."""
    def fn(z: torch.Tensor) -> torch.Tensor:
        a, k = with_hidden(call, z)
        y = _first(f(*a, **k))
        if no_grad_q:
            with torch.no_grad():
                yq = _first(fq(*a, **k))
        else:
            yq = _first(fq(*a, **k))
        per_token = (y - yq).abs().float().mean(dim=-1)
        if mask is not None:
            per_token = per_token[mask]
        return cfg.amplify * per_token.sum()
    return fn


def weighted_error(outs: list[torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor | None],
                   masks: list[torch.Tensor | None], loss: str) -> float:
    """``sum_{b,t} w_bt mean_c e(Y - Y_ref) / sum w`` over real tokens (``w = 1`` where ``weights`` is None)."""
    num = den = 0.0
    for out, ref, w, m in zip(outs, targets, weights, masks):
        d = (out - ref).double()
        per_token = (d.abs() if loss == "mae" else d.pow(2)).mean(dim=-1)
        w = torch.ones_like(per_token) if w is None else w.to(per_token)
        if m is not None:
            per_token, w = per_token[m], w[m]
        num += float((w * per_token).sum())
        den += float(w.sum())
    return num / max(den, 1e-30)


def _scorer(ctx: BlockContext, group: ScaleGroup, weights: list[torch.Tensor] | None, loss: str, padded: bool,
            batches: list[int] | None):
    """The group's consumers and ``error()``: the scored module's weighted output error on ``batches`` (all: None)."""
    name = scored_module_name(group)
    module, unit = ctx.root.get_submodule(name), unit_of(ctx, name)
    calls = capture_calls(ctx, name)
    keep = range(len(calls)) if batches is None else batches
    with torch.no_grad():
        targets = {b: _first(module(*calls[b][0], **calls[b][1])) for b in keep}
    masks = {b: None if padded else _row_mask(ctx, unit, b, t.shape) for b, t in targets.items()}
    tw = {b: None if weights is None else weights[b] for b in keep}

    def error() -> float:
        outs = [_first(module(*calls[b][0], **calls[b][1])) for b in keep]
        return weighted_error(outs, [targets[b] for b in keep], [tw[b] for b in keep], [masks[b] for b in keep], loss)

    return [ctx.root.get_submodule(c) for c in group.consumers], error


def weighted_scale_search(ctx: BlockContext, group: ScaleGroup, absmean: torch.Tensor, recipe: QuantRecipe,
                          grid: int, weights: list[torch.Tensor] | None, loss: str = "mae",
                          padded: bool = False, batches: list[int] | None = None) -> tuple[float, torch.Tensor, list[float]]:
    """AWQ's exponent grid search with a per-token weighted loss; returns ``(r, s(r), losses)``.

    With ``weights=None`` and ``loss="mse"`` this is exactly :meth:`..awq.AWQ.search_scale`.
    ``padded`` scores padded tokens too (QIG's release); ``batches`` restricts the loss to those
    calibration batches (default: all).
    """
    linears, error = _scorer(ctx, group, weights, loss, padded, batches)
    return search_exponent(linears, absmean, recipe.weights, grid, error)


def scale_error(ctx: BlockContext, group: ScaleGroup, s: torch.Tensor, recipe: QuantRecipe,
                weights: list[torch.Tensor] | None, loss: str, padded: bool, batches: list[int] | None) -> float:
    """The weighted output error of the group's consumers pseudo-quantized with scales ``s`` (weights left as found)."""
    linears, error = _scorer(ctx, group, weights, loss, padded, batches)
    spec, originals = recipe.weights, [lin.weight.detach().clone() for lin in linears]
    try:
        with torch.no_grad():
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(pseudo_quantize(w0 * s, spec.bits, spec.granularity, spec.group_size) / s)
            return error()
    finally:
        with torch.no_grad():
            for lin, w0 in zip(linears, originals):
                lin.weight.copy_(w0)
