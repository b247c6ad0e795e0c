"""Block-wise search of rounding functions and activation steps (Q-VLM's block objective).

For a block ``B_i`` of consecutive units ending at unit ``L_i`` the search minimises

    L = mean_t ||f_q(X_q)_t - f_r(X_r)_t||^2 / ||f_r(X_r)_t||^2  +  lambda * R_round  [+ eta * sum_k w_k H_soft(X_q^(k))]

where ``f_q`` is the block with every Linear quantized (AdaRound weights, learnable
static activation steps), ``X_q`` the block input from the already-quantized preceding
blocks (``ctx.q_inputs``), ``f_r``/``X_r`` the full-precision block and input, the norm
taken over the last unit's output on valid tokens ``t`` (the paper's
``||W_q^(L_i) X_q^(L_i) - W_r^(L_i) X_r^(L_i)||^2``, made relative per token so that neither
the layer's scale nor the few attention-sink tokens that carry most of the hidden-state
energy decide the search; ``token_normalised=False`` pools instead). ``R_round`` is AdaRound's regulariser, annealed after a warm-up, so
the soft rounding ends binary; the entropy term is the visual-encoder optimisation
(:mod:`.visual`) and is only passed for vision blocks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...quant import distributed
from ...quant.calibrate import BlockContext
from ...quant.modules import QuantLinear, rtn_layer
from ...quant.primitives import absmax_scale
from .config import QVLMConfig
from .entropy import probe_scale
from .search_linear import SearchLinear, act_quant_error, mse_act_scale
from .start import choose_start, swap_module

EntropyTerm = Callable[[dict[str, SearchLinear]], torch.Tensor]


@dataclass
class SearchHooks:
    """Optional additions to the block objective, for methods built on this search (search/qvit, search/combined).

    ``token_weights``: per batch ``[batch, seq]`` weights of each token's error term (QIG);
    ``extra_loss(search, b)``: a term added for batch ``b`` after its forward pass (Q-ViT's DGD);
    ``param_groups``: further Adam parameter groups learned with the rounding (Q-ViT's IRM).
    """

    token_weights: list[torch.Tensor] | None = None
    extra_loss: Callable[[dict[str, SearchLinear], int], torch.Tensor] | None = None
    param_groups: list[dict] = field(default_factory=list)


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask.to(torch.bool)]


def input_statistics(ctx: BlockContext, masks: list[torch.Tensor | None], bits: int | None,
                     grid: tuple[float, ...]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Absolute maximum of every block Linear's input on the quantized stream, and (when ``bits``)
    the per-tensor quantization error of each clipping ratio of ``grid``."""
    linears = dict(ctx.linears())
    absmax: dict[str, float] = dict.fromkeys(linears, 0.0)
    errors: dict[str, dict[float, float]] = {n: dict.fromkeys(grid, 0.0) for n in linears}
    current: dict[str, int] = {}
    ids = ctx.batch_ids
    parts: list[tuple[int, str, dict[float, float]]] = []  # distributed: each call's errors, by global batch

    def hook_for(name: str, second_pass: bool):
        def hook(_m, args):
            x = _masked(args[0].detach(), masks[current["b"]])
            if second_pass:
                found = act_quant_error(x, absmax[name], bits, grid)
                if ids is not None:
                    parts.append((ids[current["b"]], (name, found)))
                    return
                for r, e in found.items():
                    errors[name][r] += e
            else:
                absmax[name] = max(absmax[name], float(x.abs().max()) if x.numel() else 0.0)
        return hook

    for second_pass in ((False, True) if bits else (False,)):
        handles = [m.register_forward_pre_hook(hook_for(n, second_pass)) for n, m in linears.items()]
        try:
            with torch.no_grad():
                for b, x in enumerate(ctx.q_inputs):
                    current["b"] = b
                    ctx.forward(x, b)
        finally:
            for h in handles:
                h.remove()
        if ids is not None and not second_pass:  # a max: exact in any order
            gathered = distributed.all_gather(absmax)
            absmax = {n: max(g[n] for g in gathered) for n in absmax}
    for name, found in distributed.in_batch_order(parts) if ids is not None else []:
        for r, e in found.items():  # every rank's errors, added in the single process's batch order
            errors[name][r] += e
    return absmax, errors


def error_terms(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                token_normalised: bool, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and denominator of the relative output error over valid tokens.

    Token-normalised: ``sum_t ||y_t - r_t||^2 / ||r_t||^2`` and the token count, so every
    token weighs the same; pooled: ``sum ||y - r||^2`` and ``sum ||r||^2``.
    ``weights`` (``[batch, seq]``, hook for QIG's token weights): every token's terms times its weight.
    """
    y, target = _masked(y, mask), _masked(target, mask)
    diff, energy = (y - target).pow(2).sum(-1), target.pow(2).sum(-1)
    if weights is not None:  # hook: token-weighted objective (search/combined)
        w = _masked(weights.to(diff), mask)
        if token_normalised:
            return (w * diff / energy.clamp_min(1e-12)).sum(), w.sum()
        diff, energy = diff * w, energy * w
    if token_normalised:
        return (diff / energy.clamp_min(1e-12)).sum(), torch.tensor(float(diff.numel()))
    return diff.sum(), energy.sum()


def block_error(ctx: BlockContext, targets: list[torch.Tensor], masks: list[torch.Tensor | None],
                token_normalised: bool = True, batches: list[int] | None = None) -> float:
    """The relative error of the block's last output over the calibration set, or its ``batches``
    (see :func:`error_terms`)."""
    num = den = 0.0
    ids = ctx.batch_ids
    if ids is None:
        local = list(range(len(ctx.q_inputs)) if batches is None else batches)
    else:  # ``batches`` are global indices; this rank scores those it holds
        local = [i for i, g in enumerate(ids) if batches is None or g in batches]
    terms = []
    with torch.no_grad():
        for b in local:
            n, d = error_terms(ctx.forward(ctx.q_inputs[b], b), targets[b], masks[b], token_normalised)
            terms.append((float(n), float(d)))
    if ids is not None:  # every rank's terms, added in the single process's batch order
        terms = distributed.in_batch_order([(ids[b], t) for b, t in zip(local, terms)])
    for n, d in terms:
        num, den = num + n, den + d
    return num / max(den, 1e-30)


def rtn_block_error(ctx: BlockContext, targets, masks, absmax: dict[str, float], token_normalised: bool) -> float:
    """The block error of plain round-to-nearest (min/max weight steps, absmax activation steps)."""
    originals = dict(ctx.linears())
    bits = ctx.recipe.activations.bits
    for name, lin in originals.items():
        scale = absmax_scale(absmax[name], bits) if bits else None
        swap_module(ctx, name, QuantLinear(rtn_layer(lin.weight.detach(), ctx.recipe, scale), lin.bias, lin.weight.dtype))
    try:
        return block_error(ctx, targets, masks, token_normalised)
    finally:
        for name, lin in originals.items():
            swap_module(ctx, name, lin)


def _progress(enabled: bool, description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not (enabled and sys.stderr.isatty()))


def search_block(ctx: BlockContext, cfg: QVLMConfig, masks: list[torch.Tensor | None], seed: int,
                 entropy_term: Callable[[dict[str, SearchLinear]], torch.Tensor] | None = None,
                 probe_units: dict[str, str] | None = None, hooks: SearchHooks | None = None) -> dict:
    """Search the block's rounding and activation steps, then commit hard codes via ``ctx.replace_linear``.

    ``probe_units`` maps unit name -> the name of its first Linear, whose captured input is
    ``X^(k)`` for ``entropy_term`` (called with the captured SearchLinears). ``hooks``: see
    :class:`SearchHooks` (the reported errors stay unweighted). Returns the
    block's statistics: RTN, initial and final block error, iterations and seconds.
    """
    started = time.perf_counter()
    bits = ctx.recipe.activations.bits
    with torch.no_grad():
        targets = [ctx.forward(x, b, fp=True) for b, x in enumerate(ctx.fp_inputs)]
    absmax, errors = input_statistics(ctx, masks, bits, cfg.clip_grid)
    rtn_err = rtn_block_error(ctx, targets, masks, absmax, cfg.token_normalised)

    frozen = [p for m in ctx.modules for p in m.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only rounding logits and steps learn; keep the model's .grad untouched
    act_mse = {n: mse_act_scale(errors[n], absmax[n], bits) if bits else None for n, _ in ctx.linears()}
    act_absmax = {n: absmax_scale(absmax[n], bits) if bits else None for n, _ in ctx.linears()}
    try:
        search, start, init_err = choose_start(ctx, cfg.start, act_mse, act_absmax, cfg.clip_grid,
                                               lambda: block_error(ctx, targets, masks, cfg.token_normalised))
        for first in (probe_units or {}).values():
            search[first].capture = True
            if not search[first].quantize_input:  # A16: the entropy probe is a fixed 8-bit absmax code
                search[first].step0.copy_(probe_scale(absmax[first], cfg.probe_bits))
        hooks = hooks or SearchHooks()
        # The rounding logits' start is recomputed to restore it (no block-sized copy); the rest is copied.
        learned = [sl.log_step for sl in search.values() if sl.log_step is not None]
        learned += [t for group in hooks.param_groups for t in group["params"]]  # e.g. Q-ViT's IRM scales
        at_start = [t.detach().clone() for t in learned]
        train, held = split_batches(ctx.n_batches, cfg.holdout)
        start_held = block_error(ctx, targets, masks, cfg.token_normalised, held) if held else None
        for sl in search.values():
            sl.hard = False
        _optimise(ctx, cfg, search, targets, masks, seed, entropy_term, train, hooks)
        for sl in search.values():
            sl.hard, sl.capture, sl.captured = True, False, None
        final_err = searched_err = block_error(ctx, targets, masks, cfg.token_normalised)
        # The search may only move from its start when that generalises: judged on calibration
        # batches it never trained on (at W3A16 it lowered the training error 20% and lost 6 dB of
        # logit SQNR), or, without a held-out split, on the whole set.
        if held:
            kept_start = block_error(ctx, targets, masks, cfg.token_normalised, held) > start_held
        else:
            kept_start = final_err > init_err
        if kept_start:
            with torch.no_grad():
                for sl in search.values():
                    sl.reset_rounding()
                for t, t0 in zip(learned, at_start):
                    t.copy_(t0)
            final_err = init_err
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for name, sl in search.items():
        ctx.replace_linear(name, sl.to_layer())
    return {"units": [u.name for u in ctx.units], "rtn_error": rtn_err, "start": start, "init_error": init_err,
            "error": final_err, "searched_error": searched_err, "kept_start": kept_start, "iterations": cfg.iterations,
            "seconds": time.perf_counter() - started}


def split_batches(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """Training and held-out calibration batch indices: the last ``round(holdout * n)`` batches are held out
    (none when fewer than two batches would remain for training)."""
    held = round(holdout * n)
    if held == 0 or n - held < 2:
        return list(range(n)), []
    return list(range(n - held)), list(range(n - held, n))


def _optimise(ctx: BlockContext, cfg: QVLMConfig, search: dict[str, SearchLinear], targets, masks, seed: int,
              entropy_term, train: list[int], hooks: SearchHooks) -> None:
    if cfg.iterations == 0:
        return
    params_round = [sl.v for sl in search.values()]
    params_step = [sl.log_step for sl in search.values() if sl.log_step is not None]
    groups = [{"params": params_round, "lr": cfg.lr_round}]
    if params_step:
        groups.append({"params": params_step, "lr": cfg.lr_step})
    groups += list(hooks.param_groups)
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    warm = int(cfg.warmup * cfg.iterations)
    label = ctx.units[0].name if len(ctx.units) == 1 else f"{ctx.units[0].name} (+{len(ctx.units) - 1})"
    with _progress(cfg.progress, label, cfg.iterations) as bar:
        task = bar.add_task(label, total=cfg.iterations)
        for it in range(cfg.iterations):
            b = train[int(torch.randint(len(train), (1,), generator=gen))]  # the same draw on every rank
            opt.zero_grad(set_to_none=True)
            if ctx.batch_ids is None or b in ctx.batch_ids:
                _backward(ctx, cfg, search, targets, masks, entropy_term, hooks, it, warm,
                          b if ctx.batch_ids is None else ctx.batch_ids.index(b))
            if ctx.batch_ids is not None:  # the owner's step, taken by every rank
                distributed.broadcast_grads([p for g in opt.param_groups for p in g["params"]],
                                            distributed.owner(b, ctx.n_batches))
            opt.step()
            bar.advance(task)


def _backward(ctx: BlockContext, cfg: QVLMConfig, search: dict[str, SearchLinear], targets, masks, entropy_term,
              hooks: SearchHooks, it: int, warm: int, b: int) -> None:
    """The gradient of iteration ``it``'s loss on (this rank's) batch ``b``."""
    weights = None if hooks.token_weights is None else hooks.token_weights[b]
    num, den = error_terms(ctx.forward(ctx.q_inputs[b], b), targets[b], masks[b], cfg.token_normalised, weights)
    loss = num / den.clamp_min(1e-30)
    if hooks.extra_loss is not None:
        loss = loss + hooks.extra_loss(search, b)
    if it >= warm:
        frac = (it - warm) / max(cfg.iterations - warm, 1)
        beta = cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac
        loss = loss + cfg.round_weight * sum(sl.regularizer(beta) for sl in search.values())
    if entropy_term is not None:
        loss = loss + entropy_term(search)
    loss.backward()
