"""QIG's token weights for a whole block: integrated gradients of the block's quantization error.

``f`` is the block with full-precision weights (the live block before its search), ``f_q`` a copy
with every searched Linear round-to-nearest quantized at the recipe's granularity (absmax static
activation steps when activations are quantized; straight-through gradients). ``F(Z) = sum over
real tokens of mean_c |f(Z) - f_q(Z)|`` at the block's last output; the baseline is zero
(weight-only) or the block's quantized-stream input with the FP-stream input as ``X``
(quantized activations), as QIG. Token scores, per-sample normalisation and the IQR clip are
:mod:`..qig.ig`'s.
"""

from __future__ import annotations

import copy

import torch

from ...quant.calibrate import BlockContext
from ...quant.modules import QuantLinear, rtn_layer, set_submodule
from ...quant.primitives import absmax_scale
from ..qig.ig import integrated_gradients, token_weights
from ..stats import batch_mask, collect_input_stats
from .config import CombinedConfig


def rtn_copies(ctx: BlockContext) -> list[torch.nn.Module]:
    """Copies of the block's modules with every searched Linear RTN-quantized."""
    bits = ctx.recipe.activations.bits
    names = [n for n, _ in ctx.linears()]
    stats = collect_input_stats(ctx, names) if bits else {}
    copies = [copy.deepcopy(m) for m in ctx.modules]
    for unit, mod in zip(ctx.units, copies):
        for name in names:
            if not (name == unit.name or name.startswith(unit.name + ".")):
                continue
            rel = name[len(unit.name) + 1:]
            lin = mod.get_submodule(rel)
            scale = absmax_scale(stats[name].absmax, bits) if bits else None
            q = QuantLinear(rtn_layer(lin.weight.detach(), ctx.recipe, scale), lin.bias, lin.weight.dtype)
            set_submodule(mod, rel, q)
    for m in copies:
        m.requires_grad_(False)
    return copies


def _run(modules, x, ctx: BlockContext, b: int) -> torch.Tensor:
    for i, m in enumerate(modules):
        x = m(x, **ctx.kwargs[i][b])
    return x


def mix_uniform(p: torch.Tensor, mask: torch.Tensor | None, mix: float) -> torch.Tensor:
    """``(1 - mix) * uniform + mix * p`` per sample over real tokens (still summing to 1)."""
    real = torch.ones_like(p) if mask is None else mask.to(p.dtype)
    return (1 - mix) * real / real.sum(-1, keepdim=True).clamp_min(1) + mix * p


def per_token_relative(w: torch.Tensor, ctx: BlockContext, b: int) -> torch.Tensor:
    """``w_t / ||f_r(X_r)_t||^2``: with these weights the pooled objective
    ``sum_t w'_t ||e_t||^2 / sum_t w'_t ||r_t||^2`` equals ``sum_t w_t ||e_t||^2 / ||r_t||^2 / sum_t w_t``, the
    token-normalised objective with the token weights inside (each token's error relative to its own FP energy)."""
    with torch.no_grad():
        energy = ctx.forward(ctx.fp_inputs[b], b, fp=True).float().pow(2).sum(-1)
    return w / energy.clamp_min(1e-12)


def block_token_weights(ctx: BlockContext, cfg: CombinedConfig) -> list[torch.Tensor] | None:
    """Per batch ``[batch, seq]`` weights (each sample sums to 1 over real tokens); None for 2-D block inputs."""
    if ctx.q_inputs[0].dim() != 3:
        return None
    weight_only = ctx.recipe.activations.bits is None
    quantized = cfg.baseline == "quantized" or (cfg.baseline == "auto" and not weight_only)
    clip = cfg.iqr_clip == "on" or (cfg.iqr_clip == "auto" and weight_only)
    fq = rtn_copies(ctx)
    frozen = [p for m in ctx.modules for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    out = []
    try:
        for b, (xq, xf) in enumerate(zip(ctx.q_inputs, ctx.fp_inputs)):
            mask = batch_mask(ctx, len(ctx.units) - 1, b)
            mask = None if mask is None or tuple(mask.shape) != tuple(xq.shape[:2]) else mask.to(torch.bool)

            def fn(z, b=b, mask=mask):
                per_token = (_run(ctx.modules, z, ctx, b) - _run(fq, z, ctx, b)).abs().float().mean(-1)
                return (per_token if mask is None else per_token[mask]).sum()

            x, x0 = (xf, xq) if quantized else (xq, torch.zeros_like(xq))
            p = token_weights(integrated_gradients(fn, x, x0, cfg.ig_steps).float(), mask, clip)
            w = mix_uniform(p, mask, cfg.token_mix)
            if cfg.normalise_tokens:
                w = per_token_relative(w, ctx, b)
            out.append(w)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out
