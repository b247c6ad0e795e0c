"""The learnable quantized Linear the block search optimises, and how its steps are initialised.

During the search each Linear of a block is swapped for a :class:`SearchLinear`:

* weight: fixed symmetric scale (per channel or per group, the recipe's granularity,
  clipping ratio chosen per channel/group by weight MSE), learnable AdaRound rounding
  logits ``v`` (``floor(w/s) + h(v)``, initialised to the fractional part, so the hard
  decision starts as round-to-nearest);
* input activation: static per-tensor symmetric step ``s = s0 * exp(t)`` with learnable
  ``t`` (LSQ's straight-through gradient; the log parameterisation lets one learning rate
  serve every layer's magnitude), ``s0`` the MSE-optimal clipped step on the block input.

After the search :meth:`SearchLinear.to_layer` takes the hard rounding into integer codes.

Memory (a 7B decoder layer is 0.81 GB of fp32 weights, ``W``): a start candidate holds no logits
(``lazy``: computed from its base weight when it runs, :meth:`SearchLinear.materialize` when it wins),
and the soft weight is rebuilt in the backward pass instead of keeping its intermediates
(:func:`torch.utils.checkpoint.checkpoint`), so the search holds ``v``, its gradient and Adam's two
moments (4 W) plus one soft weight per Linear, not every intermediate of every Linear's rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...quant import functional as F
from ...quant.primitives import MIN_SCALE, round_clamp, sum_over_units
from ...quant.recipe import QuantRecipe, WeightSpec
from ...quant.state import LayerQuant


def mse_weight_qparams(w: torch.Tensor, spec: WeightSpec, grid: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit (channel/group) scale and zero point whose clipping ratio from ``grid`` minimises weight MSE."""
    best_scale = best_zp = best_err = None
    for ratio in grid:
        scale, zp = F.choose_qparams(w, spec.bits, spec.symmetric, spec.granularity, spec.group_size, clip_ratio=ratio)
        codes = F.quantize(w, scale, zp, spec.bits, spec.symmetric, spec.granularity, spec.group_size)
        err = sum_over_units((w - F.dequantize(codes, scale, zp, spec.granularity, spec.group_size)).pow(2),
                             spec.granularity, spec.group_size)
        if best_err is None:
            best_scale, best_zp, best_err = scale, zp, err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zp


def mse_act_scale(errors: dict[float, float], absmax: float, bits: int) -> torch.Tensor:
    """The per-tensor step ``ratio * absmax / qmax`` with the smallest accumulated error."""
    ratio = min(errors, key=lambda r: (errors[r], -r))
    _, qmax = F.qrange(bits, True)
    return torch.tensor(max(absmax * ratio, MIN_SCALE) / qmax, dtype=torch.float32)  # in float64, then rounded


def act_quant_error(x: torch.Tensor, absmax: float, bits: int, grid: tuple[float, ...]) -> dict[float, float]:
    """Squared error of per-tensor quantization of ``x`` for each clipping ratio of ``grid``."""
    qmin, qmax = F.qrange(bits, True)
    out = {}
    for ratio in grid:
        s = torch.tensor(max(absmax * ratio, MIN_SCALE) / qmax, dtype=x.dtype, device=x.device)
        fq = round_clamp(x / s, qmin, qmax) * s
        out[ratio] = float((x - fq).pow(2).sum())
    return out


class SearchLinear(nn.Module):
    """A Linear with learnable rounding and activation step (see the module docstring)."""

    def __init__(self, linear: nn.Linear, recipe: QuantRecipe, act_scale: torch.Tensor | None,
                 clip_grid: tuple[float, ...], start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 lazy: bool = False):
        """``start`` = (base weight, scale, zero point) begins the rounding search elsewhere than
        round-to-nearest of the FP weight: at GPTQ's solution, the base being the weight its walk
        rounded (:func:`~qvlm_export.search.algorithms.gptq_quantize`'s ``seen``). ``lazy``: no
        rounding logits are stored until :meth:`materialize` (a start candidate, evaluated hard)."""
        super().__init__()
        self.spec, self.act_bits = recipe.weights, recipe.activations.bits
        w = (linear.weight if start is None else start[0]).detach().float()
        self.register_buffer("weight", w)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        if start is None:
            scale, zp = mse_weight_qparams(w, self.spec, clip_grid)
        else:
            scale, zp = start[1].float(), start[2].to(torch.int32)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zp", zp)
        self.register_parameter("v", None)
        if not lazy:
            self.materialize()
        self.quantize_input = act_scale is not None and self.act_bits is not None
        self.register_buffer("step0", torch.as_tensor(act_scale if self.quantize_input else 1.0).float().reshape(()))
        self.log_step = nn.Parameter(torch.zeros((), device=w.device)) if self.quantize_input else None
        self.hard = False
        self.capture = False  # keep the (pre-quantization) input for the entropy term
        self.captured: torch.Tensor | None = None

    def initial_logits(self) -> torch.Tensor:
        """AdaRound's logits at the start: ``h(v)`` is the fractional part of ``weight / w_scale``."""
        return F.adaround_init(self.weight, self.w_scale, self.spec.granularity, self.spec.group_size)

    def materialize(self) -> None:
        """Store the rounding logits as the learnable parameter ``v`` (once)."""
        if self.v is None:
            self.v = nn.Parameter(self.initial_logits())

    def reset_rounding(self) -> None:
        """Put ``v`` back at its start (recomputed: bit-identical to the stored start, without a copy of it)."""
        with torch.no_grad():
            self.v.copy_(self.initial_logits())

    def act_step(self) -> torch.Tensor:
        return self.step0 * torch.exp(self.log_step) if self.log_step is not None else self.step0

    def _weight(self, v: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return F.adaround_weight(self.weight, v, self.w_scale, self.w_zp, s.bits, s.symmetric,
                                 s.granularity, s.group_size, hard=self.hard)

    def quant_weight(self) -> torch.Tensor:
        v = self.initial_logits() if self.v is None else self.v
        if self.hard or not torch.is_grad_enabled():
            return self._weight(v)
        # Soft rounding with gradients: keep only the inputs and recompute the intermediates (several
        # weight-sized tensors per Linear) in the backward pass; the same ops, so the same gradient.
        return checkpoint(self._weight, v, use_reentrant=False, preserve_rng_state=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture:
            self.captured = x
        if self.quantize_input:
            x = F.fake_quantize(x, self.act_step().to(x.dtype), torch.zeros((), dtype=torch.int32), self.act_bits)
        return nn.functional.linear(x, self.quant_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser, averaged over weights so one weight fits every block size."""
        return F.adaround_regularizer(self.v, beta) / self.v.numel()

    def to_layer(self) -> LayerQuant:
        """The hard decision as integer codes (what the exporter consumes)."""
        s = self.spec
        codes = F.adaround_codes(self.weight, self.v.detach(), self.w_scale, self.w_zp, s.bits, s.symmetric,
                                 s.granularity, s.group_size)
        step = self.act_step().detach().float().reshape(()).clone() if self.quantize_input else None
        return LayerQuant(weight_codes=codes.to(torch.int8), weight_scale=self.w_scale.float().clone(),
                          weight_zero_point=self.w_zp.clone(), weight_bits=s.bits, granularity=s.granularity,
                          group_size=s.group_size, symmetric=s.symmetric, input_scale=step,
                          act_bits=self.act_bits if self.quantize_input else None)
