"""Quantizer maths as plain tensor functions (no modules, no model knowledge).

Conventions, used everywhere in the project:

* Integer codes ``q`` are stored in a signed or unsigned integer range of ``bits`` bits:
  symmetric ``[-2^(b-1), 2^(b-1)-1]`` with zero point 0 (what TensorRT and ONNX
  Runtime's int kernels accept); asymmetric ``[0, 2^b-1]`` with an integer zero point.
  ``x ~= (q - zero_point) * scale``.
* Weights are ``[out_features, in_features]``. Granularity ``tensor`` gives a scalar
  scale, ``channel`` one scale per output row (shape ``[out]``), ``group`` one scale per
  ``group_size`` consecutive input columns (shape ``[out, ceil(in / group_size)]``; the
  last group may be shorter, matching ONNX's blocked DequantizeLinear).
* Activations are quantized per tensor (scalar scale): the only deployable choice.

Rounding is ``torch.round`` (round half to even), as ONNX QuantizeLinear does. Ranges,
round-and-clamp and grouping come from :mod:`.primitives`; this module builds quantizers on them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .primitives import grouped, qrange, round_clamp

Granularity = Literal["tensor", "channel", "group"]
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def expand_param(p: torch.Tensor, shape: torch.Size, granularity: Granularity, group_size: int = 128) -> torch.Tensor:
    """Broadcast a scale or zero point of the given granularity to a weight of ``shape``."""
    if granularity == "tensor":
        return p.reshape(())
    if granularity == "channel":
        return p.reshape(-1, *([1] * (len(shape) - 1)))
    in_f = shape[-1]
    return p.repeat_interleave(group_size, dim=-1)[..., :in_f]


def reduce_minmax(x: torch.Tensor, granularity: Granularity, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over each quantization unit."""
    if granularity == "tensor":
        return x.min(), x.max()
    if granularity == "channel":
        flat = x.reshape(x.shape[0], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    g = grouped(x, group_size)
    if x.shape[-1] % group_size:  # padded zeros must not widen a ragged group's range
        in_f = x.shape[-1]
        mask = torch.arange(g.shape[1] * group_size, device=x.device).reshape(g.shape[1], group_size) < in_f
        lo = torch.where(mask, g, torch.full_like(g, float("inf"))).amin(dim=-1)
        hi = torch.where(mask, g, torch.full_like(g, float("-inf"))).amax(dim=-1)
        return lo, hi
    return g.amin(dim=-1), g.amax(dim=-1)


def choose_qparams(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: Granularity = "channel",
                   group_size: int = 128, clip_ratio: float | torch.Tensor = 1.0,
                   eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point; ``clip_ratio`` shrinks the range (clipping search)."""
    lo, hi = reduce_minmax(x.detach(), granularity, group_size)
    lo, hi = lo * clip_ratio, hi * clip_ratio
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        return scale.clamp_min(eps), torch.zeros_like(scale, dtype=torch.int32)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool = True,
             granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    """Integer codes (as an int32 tensor) of ``x``."""
    qmin, qmax = qrange(bits, symmetric)
    s = expand_param(scale, x.shape, granularity, group_size)
    z = expand_param(zero_point, x.shape, granularity, group_size)
    return round_clamp(x / s, qmin, qmax, z).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    s = expand_param(scale, q.shape, granularity, group_size)
    z = expand_param(zero_point, q.shape, granularity, group_size)
    return (q.to(s.dtype) - z.to(s.dtype)) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                  symmetric: bool = True, granularity: Granularity = "tensor", group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients to ``x`` and (LSQ-style) to ``scale``.

    The scale gradient follows LSQ (Esser et al., 2020): d/ds of ``s * clamp(round(x/s))``
    with the rounding treated as identity, scaled by ``1/sqrt(numel * qmax)`` so the step
    learns at the same rate as the weights.
    """
    qmin, qmax = qrange(bits, symmetric)
    s = expand_param(scale, x.shape, granularity, group_size)
    z = expand_param(zero_point, x.shape, granularity, group_size).to(x.dtype)
    if scale.requires_grad:
        grad_scale = 1.0 / math.sqrt(max(x.numel() / max(scale.numel(), 1), 1) * qmax)
        s = s * grad_scale + (s - s * grad_scale).detach()
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def adaround_h(v: torch.Tensor) -> torch.Tensor:
    """Rectified sigmoid of AdaRound (Nagel et al., 2020): the soft rounding offset in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def adaround_init(w: torch.Tensor, scale: torch.Tensor, granularity: Granularity = "channel",
                  group_size: int = 128) -> torch.Tensor:
    """Rounding logits ``v`` such that ``h(v)`` equals the fractional part of ``w / scale``."""
    s = expand_param(scale, w.shape, granularity, group_size)
    rest = (w / s - torch.floor(w / s)).clamp(1e-4, 1 - 1e-4)
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1)


def adaround_weight(w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    symmetric: bool = True, granularity: Granularity = "channel", group_size: int = 128,
                    hard: bool = False) -> torch.Tensor:
    """Dequantized weight with learnable rounding: ``floor(w/s) + h(v)`` (``h`` >= 0.5 when hard)."""
    qmin, qmax = qrange(bits, symmetric)
    s = expand_param(scale, w.shape, granularity, group_size)
    z = expand_param(zero_point, w.shape, granularity, group_size).to(w.dtype)
    offset = (adaround_h(v) >= 0.5).to(w.dtype) if hard else adaround_h(v)
    q = torch.clamp(torch.floor(w / s) + offset + z, qmin, qmax)
    return (q - z) * s


def adaround_codes(w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   symmetric: bool = True, granularity: Granularity = "channel", group_size: int = 128) -> torch.Tensor:
    """The integer codes that the hard AdaRound decision selects."""
    qmin, qmax = qrange(bits, symmetric)
    s = expand_param(scale, w.shape, granularity, group_size)
    z = expand_param(zero_point, w.shape, granularity, group_size)
    q = torch.floor(w / s) + (adaround_h(v) >= 0.5).to(w.dtype) + z
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def adaround_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h(v) - 1|^beta)``: pushes every soft offset to 0 or 1 as beta anneals."""
    return (1 - (2 * adaround_h(v) - 1).abs().pow(beta)).sum()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||ref - approx||^2)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
