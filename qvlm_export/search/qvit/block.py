"""Q-ViT in a block reconstruction: the DGD term and the learnable IRM as hooks of Q-VLM's block search.

:func:`vision_hooks` builds, for the vision units of a block, a :class:`..qvlm.block_search.SearchHooks`
whose ``extra_loss`` is ``lambda * sum_units DGD(q~, k~ ; q_fp, k_fp)`` (student q/k recomputed from
the searched projections on the attention input captured in the forward pass, rectified by the
unit's IRM; teacher q/k of the FP block on the FP-stream input) and whose ``param_groups`` are the
IRM parameters. :func:`fold_irms` folds the learned IRMs into the committed q/k projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...quant import layernorm_irm as ln_irm
from ...quant.calibrate import BlockContext
from ..qvlm.block_search import SearchHooks
from .dgd import dgd_loss
from .irm import fold_irm_quantized, irm_apply


@dataclass
class AttentionIRM:
    """One vision unit's attention: names, heads, learned IRM, captured input and FP teacher q/k."""

    q_name: str
    k_name: str
    heads: int
    log_g: torch.Tensor
    beta: torch.Tensor
    teacher: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    norms: tuple[ln_irm.HeadNorm, ln_irm.HeadNorm] | None = None  # the release's LayerNorm form (simulated)

    def rectify(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norms is not None:
            return self.norms[0](q), self.norms[1](k)
        return irm_apply(q, k, self.log_g, self.beta)

    def params(self) -> list[torch.Tensor]:
        if self.norms is not None:
            return [p for n in self.norms for p in n.parameters()]
        return [self.log_g, self.beta]


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def find_attentions(ctx: BlockContext) -> list[tuple[int, nn.Module]]:
    """(unit index, self-attention module) of every vision unit of the block with quantized q/k."""
    quantized = {n for n, _ in ctx.linears()}
    out = []
    for i, (unit, module) in enumerate(zip(ctx.units, ctx.modules)):
        attn = getattr(module, "self_attn", None)
        if unit.kind == "vision" and attn is not None and \
                {f"{unit.name}.self_attn.q_proj", f"{unit.name}.self_attn.k_proj"} <= quantized:
            out.append((i, attn))
    return out


def _teacher(ctx: BlockContext, unit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    attn = ctx.fp_modules[unit].self_attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, a, k: seen.append(_hidden(a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            for b, x in enumerate(ctx.fp_inputs):
                ctx.forward(x, b, fp=True, upto=unit + 1)
            return [(attn.q_proj(h).detach(), attn.k_proj(h).detach()) for h in seen]
    finally:
        handle.remove()


def _layernorms(ctx: BlockContext, unit: int, attn: nn.Module) -> tuple[ln_irm.HeadNorm, ln_irm.HeadNorm]:
    """The release's q/k LayerNorms, fitted to the identity on the block's quantized-stream q/k (first batch)."""
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, a, k: seen.append(_hidden(a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            ctx.forward(ctx.q_inputs[0], 0, upto=unit + 1)
    finally:
        handle.remove()
    heads, dim = int(attn.num_heads), attn.q_proj.out_features
    norms = []
    for proj in (attn.q_proj, attn.k_proj):
        norm = ln_irm.HeadNorm(heads, dim // heads).to(proj.weight.device)
        with torch.no_grad():
            ln_irm.fit_to_identity(norm, proj(seen[0]))
        norms.append(norm)
    return norms[0], norms[1]


def vision_hooks(ctx: BlockContext, lambda_dgd: float, irm: bool, lr_irm: float,
                 token_weights: list[torch.Tensor] | None = None,
                 form: str = "fold") -> tuple[SearchHooks, list[AttentionIRM], list]:
    """The hooks for the block's vision units, their IRM records, and the forward-hook handles to remove.

    ``form="layernorm"`` (with ``irm``): the release's LayerNorm IRM, installed on the attention now
    (it stays after the search: read it back with :func:`layernorm_extras`); else ours, folded later."""
    records, handles = [], []
    layernorm = irm and form == "layernorm"
    for i, attn in find_attentions(ctx):
        name = f"{ctx.units[i].name}.self_attn"
        dim = attn.q_proj.out_features
        dev = attn.q_proj.weight.device
        rec = AttentionIRM(f"{name}.q_proj", f"{name}.k_proj", int(attn.num_heads),
                           torch.zeros(dim, device=dev, requires_grad=irm),
                           torch.zeros(dim, device=dev, requires_grad=irm), _teacher(ctx, i) if lambda_dgd > 0 else [])
        if layernorm:
            rec.norms = _layernorms(ctx, i, attn)
            ln_irm.install(attn, *rec.norms)  # part of the model from now on

        def capture(_m, a, k, rec=rec):
            rec.hidden = _hidden(a, k)
        handles.append(attn.register_forward_pre_hook(capture, with_kwargs=True))
        records.append(rec)

    def extra_loss(search, b: int) -> torch.Tensor:
        total = 0.0
        for rec in records:
            q, k = search[rec.q_name](rec.hidden), search[rec.k_name](rec.hidden)
            q, k = rec.rectify(q, k)
            tq, tk = rec.teacher[b]
            total = total + dgd_loss(q, k, tq, tk, rec.heads)
        return lambda_dgd * total

    groups = [{"params": r.params(), "lr": lr_irm} for r in records] if irm else []
    hooks = SearchHooks(token_weights=token_weights, extra_loss=extra_loss if lambda_dgd > 0 and records else None,
                        param_groups=groups)
    return hooks, records, handles


def fold_irms(ctx: BlockContext, records: list[AttentionIRM]) -> dict[str, dict[str, float]]:
    """Fold each learned IRM into the committed q/k layers and biases; returns its range per unit."""
    out = {}
    for rec in records:
        q_mod, k_mod = ctx.root.get_submodule(rec.q_name), ctx.root.get_submodule(rec.k_name)
        ql, kl, qb, kb = fold_irm_quantized(ctx.layers[rec.q_name], ctx.layers[rec.k_name], q_mod.bias, k_mod.bias,
                                            rec.log_g, rec.beta)
        for name, module, layer, bias in ((rec.q_name, q_mod, ql, qb), (rec.k_name, k_mod, kl, kb)):
            if bias is not None:
                with torch.no_grad():
                    module.bias.copy_(bias)
                ctx.set_override(f"{name}.bias", bias)
            ctx.replace_linear(name, layer)
        g = rec.log_g.detach().exp()
        out[rec.q_name.rsplit(".", 2)[0]] = {"g_min": float(g.min()), "g_max": float(g.max()),
                                             "beta_absmax": float(rec.beta.detach().abs().max())}
    return out


def layernorm_extras(records: list[AttentionIRM]) -> dict[str, dict]:
    """The learned LayerNorm IRMs as the quant state's ``extras["qvit_layernorm_irm"]`` entries."""
    return {r.q_name.rsplit(".", 1)[0]: {"q": r.norms[0].to_json(), "k": r.norms[1].to_json()}
            for r in records if r.norms is not None}
