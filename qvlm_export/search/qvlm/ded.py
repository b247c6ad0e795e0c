"""Discretization-error difference (DED) of two consecutive units: the quantity entropy is a proxy for.

``DED(k, k+1) = E_layerwise - E_joint`` where both are the relative output error of unit
``k+1``, ``||f_q(X) - f_r(X)||^2 / ||f_r(X)||^2`` on the same FP inputs ``X`` of unit ``k``:

* layer-wise: search unit ``k`` alone (its own output error), then unit ``k+1`` alone on
  the quantized output of ``k``;
* joint: search ``k`` and ``k+1`` as one block on the error of ``k+1``'s output.

Both searches are :func:`.block_search.search_block` with the same configuration, run on
copies of the two units (the user's model is never touched). A positive DED is the error
a layer-wise search leaves because it ignores the dependency between the two layers.
:func:`measure_ded` searches on the given inputs (one sample for a per-sample search);
:func:`measure_ded_per_sample` searches once on all of them and splits the error by sample.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...quant.calibrate import BlockContext, SequentialCalibrator, Unit
from ...quant.recipe import QuantRecipe
from .block_search import block_error, search_block
from .config import QVLMConfig


def detached_context(units: Sequence[Unit], modules: Sequence[nn.Module], q_inputs: list[torch.Tensor],
                     fp_inputs: list[torch.Tensor], kwargs: list[dict[str, Any]], recipe: QuantRecipe) -> BlockContext:
    """A block context over copies of ``modules`` under a skeleton root that mirrors their model names."""
    root = nn.Module()
    copies = [copy.deepcopy(m) for m in modules]
    for unit, module in zip(units, copies):
        parent = root
        *path, leaf = unit.name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    fp = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    return BlockContext(units=list(units), modules=copies, fp_modules=fp, q_inputs=q_inputs, fp_inputs=fp_inputs,
                        kwargs=[kwargs for _ in units], recipe=recipe, root=root)


def _search_both(units, modules, inputs, kwargs, masks, recipe, cfg, seed):
    """The joint block and the two layer-wise blocks, searched on ``inputs`` (FP inputs of unit ``k``)."""
    if len(units) != 2:
        raise ValueError("DED compares exactly two consecutive units")
    joint = detached_context(units, modules, inputs, inputs, kwargs, recipe)
    search_block(joint, cfg, masks, seed)
    first = detached_context(units[:1], modules[:1], inputs, inputs, kwargs, recipe)
    search_block(first, cfg, masks, seed)
    with torch.no_grad():
        q_mid = [first.forward(x, b) for b, x in enumerate(inputs)]
        fp_mid = [first.forward(x, b, fp=True) for b, x in enumerate(inputs)]
    second = detached_context(units[1:], modules[1:], q_mid, fp_mid, kwargs, recipe)
    search_block(second, cfg, masks, seed + 1)
    return joint, second


def _sample_errors(ctx: BlockContext, masks: list[torch.Tensor | None]) -> list[float]:
    """Relative output error of the searched block per sample: ``||y_q - y_r||^2 / ||y_r||^2``."""
    out = []
    with torch.no_grad():
        for b, (xq, xr) in enumerate(zip(ctx.q_inputs, ctx.fp_inputs)):
            diff = (ctx.forward(xq, b) - ctx.forward(xr, b, fp=True)).pow(2).sum(-1)
            energy = ctx.forward(xr, b, fp=True).pow(2).sum(-1)
            keep = torch.ones_like(diff) if masks[b] is None else masks[b].to(diff.dtype)
            out += ((diff * keep).sum(-1) / (energy * keep).sum(-1).clamp_min(1e-30)).tolist()
    return out


def measure_ded(units: Sequence[Unit], modules: Sequence[nn.Module], inputs: list[torch.Tensor],
                kwargs: list[dict[str, Any]], masks: list[torch.Tensor | None], recipe: QuantRecipe,
                cfg: QVLMConfig, seed: int) -> dict[str, float]:
    """Layer-wise and joint block error at unit ``k+1``'s output over ``inputs``, and their difference."""
    joint, second = _search_both(units, modules, inputs, kwargs, masks, recipe, cfg, seed)
    lw = block_error(second, [second.forward(x, b, fp=True) for b, x in enumerate(second.fp_inputs)], masks,
                     cfg.token_normalised)
    jt = block_error(joint, [joint.forward(x, b, fp=True) for b, x in enumerate(joint.fp_inputs)], masks,
                     cfg.token_normalised)
    return {"layerwise": lw, "joint": jt, "ded": lw - jt}


def measure_ded_per_sample(units: Sequence[Unit], modules: Sequence[nn.Module], inputs: list[torch.Tensor],
                           kwargs: list[dict[str, Any]], masks: list[torch.Tensor | None], recipe: QuantRecipe,
                           cfg: QVLMConfig, seed: int) -> list[dict[str, float]]:
    """Search both ways once on all ``inputs``, then the DED of each sample under those two solutions."""
    joint, second = _search_both(units, modules, inputs, kwargs, masks, recipe, cfg, seed)
    lw, jt = _sample_errors(second, masks), _sample_errors(joint, masks)
    return [{"layerwise": a, "joint": b, "ded": a - b} for a, b in zip(lw, jt)]


def slice_batch(obj: Any, i: int, n: int) -> Any:
    """Sample ``i`` of a batch of ``n``: tensors with leading dim ``n`` are sliced, containers recursed."""
    if isinstance(obj, torch.Tensor):
        return obj[i:i + 1] if obj.dim() > 0 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(o, i, n) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_batch(v, i, n) for k, v in obj.items()}
    return obj


class _Captured(Exception):
    pass


def capture_unit_inputs(calibrator: SequentialCalibrator, first: int) -> dict[str, Any]:
    """FP inputs, batch kwargs and modules of units ``first`` and ``first + 1`` (nothing is quantized).

    Walks the calibrator with a do-nothing method up to the pair, so the inputs are
    exactly what the calibrator would hand a block starting at ``first``.
    """
    units = calibrator.units
    if not 0 <= first < len(units) - 1 or units[first].kind != units[first + 1].kind:
        raise ValueError(f"units {first} and {first + 1} are not consecutive units of one stack")
    seen: dict[str, Any] = {}

    def block_fn(ctx: BlockContext) -> None:
        if ctx.units[0].name == units[first].name:
            seen.update(units=list(ctx.units), modules=list(ctx.modules), inputs=list(ctx.fp_inputs),
                        kwargs=list(ctx.kwargs[0]))
            raise _Captured

    partition = [[i] for i in range(first)] + [[first, first + 1]]
    try:
        calibrator.run(block_fn, partition)
    except _Captured:
        pass
    return seen
