"""Entropy probes of every calibration unit on the calibration set (Q-VLM's plan-time analysis).

``X^(k)`` of unit ``k`` is the input of the unit's first Linear: the normalised hidden
state that the unit's q/k/v projections read (vision and decoder layers), the selected
image features (projector), or the final-norm output (lm_head). This is the tensor the
unit's first static per-tensor activation quantizer sees, so ``X_q^(k)`` is its integer
code under that quantizer:

* with quantized activations (A4/A6/A8) the probe is the quantizer the search starts from:
  ``b`` = activation bits, step ``r * absmax / qmax`` with the clipping ratio ``r`` of
  ``clip_grid`` that minimises the quantization MSE on the calibration set (with the
  visual-encoder optimisation, vision units minimise ``MSE/energy + eta * w_k * H``);
* with float activations (A16) no quantizer exists, so an 8-bit (``probe_bits``) absmax
  code serves as the probe.

Statistics stream over the calibration batches with forward hooks on the FP model (three
passes: absmax, clipping errors, codes); only the current and the previous unit's codes
of one batch are alive at a time, so the analysis scales to large models. Padding tokens
of the decoder are excluded. Dependencies are element-aligned (same sample, token and
channel) and only defined inside a stack, where consecutive inputs share a shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...quant import functional as F
from ...quant.calibrate import CalibBatch, Unit
from . import entropy as E
from .search_linear import act_quant_error


def first_linear(model: nn.Module, unit: Unit) -> str:
    """Full name of the first ``nn.Linear`` (module order) of a unit: where ``X^(k)`` is read."""
    module = model.get_submodule(unit.name)
    for sub, m in module.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in ("QuantLinear", "SearchLinear"):
            return f"{unit.name}.{sub}" if sub else unit.name
    raise ValueError(f"unit {unit.name} has no Linear")


def uses_mask(unit: Unit) -> bool:
    """Decoder-side units see padded prompts; their padding tokens are left out of every statistic."""
    return unit.kind in ("decoder", "lm_head")


@dataclass
class ProbeStats:
    """Entropy and dependency of the unit probes (bits), overall and per calibration sample."""

    units: list[str]
    bits: int
    scales: dict[str, float]
    entropy: dict[str, float]
    dependency: list[float | None]  # D(k, k+1), None across stacks
    sample_entropy: dict[str, list[float]] = field(default_factory=dict)
    sample_dependency: list[list[float] | None] = field(default_factory=list)

    def normalised_dependency(self) -> list[float | None]:
        return [None if d is None else d / self.bits for d in self.dependency]

    def to_json(self) -> dict:
        return {"units": self.units, "bits": self.bits, "scales": self.scales, "entropy": self.entropy,
                "dependency": self.dependency, "normalised_dependency": self.normalised_dependency(),
                "sample_entropy": self.sample_entropy, "sample_dependency": self.sample_dependency}


def _run_hooked(model: nn.Module, batches: Sequence[CalibBatch], targets: dict[str, Unit],
                fn: Callable[[Unit, torch.Tensor, torch.Tensor | None], None], device: str) -> None:
    """Run the FP model over ``batches`` calling ``fn(unit, x, mask)`` on each probe input."""
    current: dict[str, torch.Tensor] = {}

    def hook_for(unit: Unit):
        def hook(_m, args):
            fn(unit, args[0].detach(), current["mask"] if uses_mask(unit) else None)
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(u)) for name, u in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b.attention_mask.to(device).bool()
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                      **b.images(device))
    finally:
        for h in handles:
            h.remove()


def collect_probe_stats(model: nn.Module, batches: Sequence[CalibBatch], units: Sequence[Unit],
                        act_bits: int | None, probe_bits: int, clip_grid: tuple[float, ...],
                        entropy_penalty: dict[str, float] | None = None, device: str = "cpu") -> ProbeStats:
    """Probe scales, entropies ``H(X_q^(k))`` and dependencies ``D(k, k+1)`` on the calibration set.

    ``entropy_penalty[unit] = eta * w_k`` switches that unit's clipping choice to
    ``argmin MSE/energy + eta * w_k * H`` (the visual-encoder optimisation).
    """
    bits = act_bits or probe_bits
    targets = {first_linear(model, u): u for u in units}
    absmax = {u.name: 0.0 for u in units}

    def pass_absmax(unit, x, mask):
        v = E.valid_elements(x, mask)
        absmax[unit.name] = max(absmax[unit.name], float(v.abs().max()) if v.numel() else 0.0)

    _run_hooked(model, batches, targets, pass_absmax, device)
    scales = {n: float(E.probe_scale(a, bits)) for n, a in absmax.items()}
    if act_bits:
        scales = _clipped_scales(model, batches, targets, absmax, bits, clip_grid, entropy_penalty or {}, device)

    hist = {u.name: torch.zeros(2**bits, dtype=torch.int64) for u in units}
    joint: list[torch.Tensor | None] = [torch.zeros(2**bits, 2**bits, dtype=torch.int64)
                                        if a.kind == b.kind else None for a, b in zip(units, units[1:])]
    sample_h: dict[str, list[float]] = {u.name: [] for u in units}
    sample_d: list[list[float] | None] = [[] if j is not None else None for j in joint]
    position = {u.name: i for i, u in enumerate(units)}
    previous: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def pass_codes(unit, x, mask):
        codes = E.probe_codes(x, scales[unit.name], bits)
        hist[unit.name] += E.histogram(codes, bits, mask)
        sample_h[unit.name] += E.per_sample_entropy(codes, bits, mask)
        k = position[unit.name]
        if k > 0 and joint[k - 1] is not None and units[k - 1].name in previous:
            prev, _ = previous.pop(units[k - 1].name)
            joint[k - 1] += E.joint_histogram(prev, codes, bits, mask)
            sample_d[k - 1] += [E.conditional_entropy(prev[i], codes[i], bits, None if mask is None else mask[i])
                                for i in range(codes.shape[0])]
        previous.clear()
        previous[unit.name] = (codes, mask)

    _run_hooked(model, batches, targets, pass_codes, device)
    return ProbeStats(
        units=[u.name for u in units], bits=bits, scales=scales,
        entropy={n: E.entropy_from_counts(h) for n, h in hist.items()},
        dependency=[None if j is None else E.conditional_entropy_from_joint(j) for j in joint],
        sample_entropy=sample_h, sample_dependency=sample_d,
    )


def _clipped_scales(model, batches, targets, absmax, bits, grid, penalty, device) -> dict[str, float]:
    """Per-unit probe steps from the clipping grid: min MSE, or MSE/energy + penalty * H when penalised."""
    errors = {n: dict.fromkeys(grid, 0.0) for n in absmax}
    energy = dict.fromkeys(absmax, 0.0)
    hists = {n: {r: torch.zeros(2**bits, dtype=torch.int64) for r in grid} for n in penalty}
    _, qmax = F.qrange(bits, True)

    def pass_errors(unit, x, mask):
        v = E.valid_elements(x, mask)
        energy[unit.name] += float(v.pow(2).sum())
        for r, e in act_quant_error(v, absmax[unit.name], bits, grid).items():
            errors[unit.name][r] += e
            if unit.name in penalty:
                hists[unit.name][r] += E.histogram(E.probe_codes(v, max(absmax[unit.name] * r, 1e-8) / qmax, bits), bits)

    _run_hooked(model, batches, targets, pass_errors, device)
    scales = {}
    for name, errs in errors.items():
        def cost(r, name=name, errs=errs):
            c = errs[r] / max(energy[name], 1e-30)
            return c + penalty[name] * E.entropy_from_counts(hists[name][r]) if name in penalty else c
        best = min(grid, key=lambda r: (cost(r), -r))
        scales[name] = max(absmax[name] * best, 1e-8) / qmax
    return scales
