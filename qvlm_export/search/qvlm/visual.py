"""Visual-encoder optimisation: Jacobian weights of the vision layers and the entropy term.

The paper adds ``eta * sum_k ||dE^(n)/dX_r^(k)|| * H(X_q^(k))`` over the vision layers to
the vision blocks' objective, so the search prefers quantizers whose codes carry less
entropy where the final output is sensitive, which lowers the cross-layer dependency.

* ``E^(n)`` must be non-zero to have a gradient, so it is the final output error of the
  model quantized by round-to-nearest with the recipe's granularity (min/max weight
  steps, absmax static activation steps): ``E = sum_i mean_t ||z_q,it - z_r,it||^2`` over
  valid tokens ``t`` of sample ``i``, ``z`` the logits. Straight-through gradients pass
  the quantizers.
* ``||dE^(n)/dX_r^(k)||`` is the Frobenius norm of that gradient at unit ``k``'s probe
  input (see :mod:`.probes`), per sample, averaged over the calibration set, computed
  once before the search. ``w_k`` is that norm divided by its mean over the vision
  units, so ``eta`` does not depend on the model's logit scale.
* ``H`` is the soft entropy of :func:`.entropy.soft_entropy` on the block's captured
  probe input with its current activation step held fixed, so the term shapes the
  activations (through the rounding of the block's earlier layers), not the quantizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ...quant.calibrate import CalibBatch, Unit
from ...quant.modules import QuantLinear, quantizable_linears, rtn_layer, set_submodule
from ...quant.primitives import absmax_scale
from ...quant.recipe import QuantRecipe
from .entropy import soft_entropy
from .search_linear import SearchLinear


def _input_absmax(model: nn.Module, batches: Sequence[CalibBatch], names: list[str], device: str) -> dict[str, float]:
    absmax = dict.fromkeys(names, 0.0)

    def hook_for(name):
        def hook(_m, args):
            absmax[name] = max(absmax[name], float(args[0].detach().abs().max()))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                      **b.images(device))
    finally:
        for h in handles:
            h.remove()
    return absmax


def rtn_layers(model: nn.Module, recipe: QuantRecipe, batches: Sequence[CalibBatch], device: str) -> dict[str, QuantLinear]:
    """Round-to-nearest QuantLinears of ``model``'s quantizable Linears (absmax activation steps from
    ``batches``): integer codes, a quarter of the fp32 weights, instead of a copy of the model."""
    names = [n for n, _ in quantizable_linears(model, recipe)]
    bits = recipe.activations.bits
    absmax = _input_absmax(model, batches, names, device) if bits else {}
    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        scale = absmax_scale(absmax[name], bits) if bits else None
        layers[name] = QuantLinear(rtn_layer(lin.weight.detach(), recipe, scale), lin.bias, lin.weight.dtype)
    return layers


@contextmanager
def swapped_in(model: nn.Module, modules: dict[str, nn.Module]):
    """``model`` with ``modules`` in place of its own and every parameter frozen; restored on exit."""
    originals = {name: model.get_submodule(name) for name in modules}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for name, module in modules.items():
        set_submodule(model, name, module)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for name, module in originals.items():
            set_submodule(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)


def jacobian_norms(model: nn.Module, recipe: QuantRecipe, batches: Sequence[CalibBatch], probes: dict[str, str],
                   device: str = "cpu") -> dict[str, float]:
    """``mean_i ||dE^(n)/dX^(k)||`` for each unit of ``probes`` (unit name -> first Linear name).

    The RTN model is ``model`` itself with its Linears swapped for :func:`rtn_layers` per batch (and
    swapped back for the FP reference), not a deep copy: a second model in memory was 2x the peak.
    """
    if not probes:
        return {}
    qlayers = rtn_layers(model, recipe, batches, device)
    captured: dict[str, torch.Tensor] = {}

    def hook_for(unit):
        def hook(_m, args):
            args[0].retain_grad()
            captured[unit] = args[0]
        return hook

    norms: dict[str, list[torch.Tensor]] = {u: [] for u in probes}
    for b in batches:
        inputs = {"input_ids": b.input_ids.to(device), "attention_mask": b.attention_mask.to(device)}
        with torch.no_grad():
            ref = model(**inputs, **b.images(device)).logits
        with swapped_in(model, qlayers):
            handles = [model.get_submodule(lin).register_forward_pre_hook(hook_for(u)) for u, lin in probes.items()]
            try:
                images = b.images(device)
                images["pixel_values"] = images["pixel_values"].clone().requires_grad_(True)  # activations require grad
                out = model(**inputs, **images).logits
                mask = inputs["attention_mask"].to(out.dtype).unsqueeze(-1)
                per_sample = ((out - ref).pow(2) * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))
                per_sample.sum().backward()
            finally:
                for h in handles:
                    h.remove()
        for u, x in captured.items():
            norms[u].append(x.grad.flatten(1).norm(dim=1).detach().cpu())
        captured.clear()
    return {u: float(torch.cat(v).mean()) for u, v in norms.items()}


def normalised_weights(norms: dict[str, float]) -> dict[str, float]:
    """``w_k = J_k / mean_j J_j`` (all ones when every norm is zero)."""
    mean = sum(norms.values()) / max(len(norms), 1)
    return {u: (j / mean if mean > 0 else 1.0) for u, j in norms.items()}


class EntropyTerm:
    """``eta * sum_k w_k * H_soft(X_q^(k))`` over the vision units of one block."""

    def __init__(self, eta: float, weights: dict[str, float], probes: dict[str, str], probe_bits: int):
        self.eta, self.weights, self.probes, self.probe_bits = eta, weights, probes, probe_bits

    def __call__(self, search: dict[str, SearchLinear]) -> torch.Tensor:
        total = 0.0
        for unit, lin in self.probes.items():
            sl = search[lin]
            bits = sl.act_bits if sl.quantize_input else self.probe_bits
            # The step is held fixed here: a coarser quantizer always has fewer codes, and with Adam
            # that gradient would grow the step at the full learning rate for any eta > 0. The term
            # acts on the activations themselves, through the rounding of the layers before them.
            total = total + self.weights[unit] * soft_entropy(sl.captured, sl.act_step().detach(), bits)
        return self.eta * total


def vision_probes(model: nn.Module, units: Sequence[Unit]) -> dict[str, str]:
    from .probes import first_linear

    return {u.name: first_linear(model, u) for u in units if u.kind == "vision"}
