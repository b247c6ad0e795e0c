"""Where a block's rounding search starts: the best layer-wise solution of the setting.

The paper's search starts AdaRound at round-to-nearest. A block search that starts there
and stops after a fixed budget can end worse than a good layer-wise method (GPTQ at W4A16
was 5 dB better than Q-VLM on logit SQNR), so the search may start from several layer-wise
solutions and keeps the one with the smallest block error (:func:`block_error`, the very
objective the search then minimises):

* ``rtn``: round-to-nearest on the MSE-clipped weight grid (the paper's start);
* ``gptq``: the GPTQ baseline's rounding, exactly (min/max grid, true-sequential Hessians
  on the quantized stream, absmax activation steps);
* ``gptq_mse``: GPTQ's error feedback walked on the MSE-clipped grid.

Each weight start is tried with the MSE-clipped and with the absmax activation steps
(A8/A6/A4 settings). GPTQ starts the AdaRound logits at the column values GPTQ rounded
(``seen``), so the hard decision equals GPTQ's codes and the soft weight its compensated
weight. The search then only moves from the start, and :func:`search_block` keeps the
start when the search ends with a larger block error, so the result is never worse, on
the block objective, than any start (in particular, the GPTQ baseline).

Memory does not grow with the number of starts: a candidate is built ``lazy`` (its base
weight and grid, no rounding logits), only the best so far is kept while the next is built,
each GPTQ group's Hessian is measured once for the Linears that share its input and dropped
once they are quantized, and only the winner gets its logits (:meth:`SearchLinear.materialize`).
At most two candidates' base weights (GPTQ's ``seen``; round-to-nearest shares the model's)
and one group's Hessian are alive at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ...quant.calibrate import BlockContext
from ...quant.modules import set_submodule
from ...quant.primitives import absmax_scale
from ..algorithms import gptq_quantize
from ..stats import collect_input_stats, input_groups
from .search_linear import SearchLinear, mse_weight_qparams

GPTQ_DAMP = 0.01  # the GPTQ baseline's default


def swap_module(ctx: BlockContext, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` in the model and in the block's unit list (unit-level Linears)."""
    set_submodule(ctx.root, name, module)
    ctx.modules = [module if u.name == name else m for u, m in zip(ctx.units, ctx.modules)]


def rtn_start(ctx: BlockContext, originals: dict[str, nn.Linear], act: dict[str, torch.Tensor | None],
              grid: tuple[float, ...]) -> dict[str, SearchLinear]:
    """SearchLinears at round-to-nearest on the MSE-clipped grid, swapped into the block."""
    search = {}
    for name, lin in originals.items():
        search[name] = SearchLinear(lin, ctx.recipe, act[name], grid, lazy=True).to(lin.weight.device)
        swap_module(ctx, name, search[name])
    return search


def gptq_start(ctx: BlockContext, originals: dict[str, nn.Linear], groups: list[list[str]],
               act: dict[str, torch.Tensor | None], grid: tuple[float, ...] | None) -> dict[str, SearchLinear]:
    """SearchLinears at GPTQ's solution, quantized group by group in forward order (true sequential):
    each group's Hessian is measured with the earlier groups already quantized and swapped in.
    ``grid`` set: GPTQ walks the MSE-clipped grid; None: its own min/max grid (the baseline)."""
    spec, bits = ctx.recipe.weights, ctx.recipe.activations.bits
    search: dict[str, SearchLinear] = {}
    for group in groups:
        # The group's Linears read the very same tensor (input_groups): one Hessian serves them all.
        stats = collect_input_stats(ctx, group[:1], hessian=True)[group[0]]
        hessian = stats.hessian
        stats.xtx = None
        for name in group:
            lin = originals[name]
            w = lin.weight.detach().float()
            fixed = mse_weight_qparams(w, spec, grid)[0] if grid is not None and spec.symmetric else None
            seen = torch.zeros_like(w)
            _, scale, zero = gptq_quantize(w, hessian, spec.bits, spec.granularity, spec.group_size,
                                           spec.symmetric, damp=GPTQ_DAMP, fixed_scale=fixed, seen=seen)
            step = act[name] if grid is not None or bits is None else absmax_scale(stats.absmax, bits)
            sl = SearchLinear(lin, ctx.recipe, step, grid or (1.0,), start=(seen, scale, zero), lazy=True).to(w.device)
            sl.hard = True
            search[name] = sl
            swap_module(ctx, name, sl)
        del stats, hessian  # before the next group's Hessian is measured
    return search


def choose_start(ctx: BlockContext, starts: tuple[str, ...], act_mse: dict[str, torch.Tensor | None],
                 act_absmax: dict[str, torch.Tensor | None], grid: tuple[float, ...], error) -> tuple[dict, str, float]:
    """Try every start in ``starts`` (with both activation-step choices) and leave the best swapped in.

    ``error()`` is the hard block error of what is swapped in now. Returns the SearchLinears,
    the start's label and its error. Ties keep the earlier start (``rtn`` first: the paper's).
    """
    originals = dict(ctx.linears())
    groups = input_groups(ctx) if any(s.startswith("gptq") for s in starts) else []
    best = None
    for name in starts:
        if name == "rtn":
            search = rtn_start(ctx, originals, act_mse, grid)
        else:
            search = gptq_start(ctx, originals, groups, act_mse, grid if name == "gptq_mse" else None)
        for err, label, act in _evaluate(search, name, act_mse, act_absmax, error):
            if best is None or err < best[0]:
                best = (err, label, search, act)
        for lin_name, lin in originals.items():
            swap_module(ctx, lin_name, lin)
        del search  # a losing candidate is freed before the next one is built
    err, label, search, act = best
    _set_act(search, act)
    for lin_name, sl in search.items():
        sl.materialize()
        swap_module(ctx, lin_name, sl)
    return search, label, err


def _evaluate(search: dict[str, SearchLinear], name: str, act_mse, act_absmax, error) -> list[tuple[float, str, dict]]:
    """The hard block error of a swapped-in start with each of its activation-step choices."""
    for sl in search.values():
        sl.hard = True
    out = []
    for act_name, act in _act_choices(search, act_mse, act_absmax):
        _set_act(search, act)
        out.append((error(), name if act_name is None else f"{name}+{act_name}", act))
    return out


def _act_choices(search: dict[str, SearchLinear], act_mse, act_absmax) -> list[tuple[str | None, dict | None]]:
    """The start's own activation steps, then the MSE-clipped and absmax ones where they differ."""
    if not any(sl.quantize_input for sl in search.values()):
        return [(None, None)]
    choices: list[tuple[str | None, dict | None]] = [(None, {n: sl.step0.clone() for n, sl in search.items()})]
    for label, act in (("act_mse", act_mse), ("act_absmax", act_absmax)):
        if all(not all(_same(act[n], seen[n]) for n in search) for _, seen in choices):
            choices.append((label, act))
    return choices


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None or b is None or bool(torch.equal(a.float().reshape(()).cpu(), b.float().reshape(()).cpu()))


def _set_act(search: dict[str, SearchLinear], act: dict[str, torch.Tensor | None] | None) -> None:
    if act is None:
        return
    for name, sl in search.items():
        if sl.quantize_input and act.get(name) is not None:
            sl.step0.copy_(act[name].to(sl.step0))
            sl.log_step.data.zero_()
