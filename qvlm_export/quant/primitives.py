"""Quantization primitives: integer ranges, absmax scales, round-and-clamp, grouping.

The one place these are written; search (:mod:`qvlm_export.search`), the quantizers of
:mod:`.functional`, export (:mod:`qvlm_export.export.qdq`) and validate call them, so a
rounding or range convention cannot drift between what is searched, what is written and
what is checked. Conventions are :mod:`.functional`'s: symmetric codes in
``[-2^(b-1), 2^(b-1)-1]``, rounding half to even (``torch.round``, as ONNX QuantizeLinear).

Each function keeps the exact operation order its callers had (a reordering would change
float results, hence searched codes and the exported bytes).
"""

from __future__ import annotations

import math

import torch

MIN_SCALE = 1e-8  # no scale below it: an all-zero tensor still gets a finite, positive step


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Inclusive integer range of a ``bits``-bit quantizer."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def absmax_scale(absmax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Symmetric per-tensor scale (float32) covering ``[-absmax, absmax]`` with ``bits`` bits."""
    _, qmax = qrange(bits, True)
    return torch.as_tensor(absmax, dtype=torch.float32).clamp_min(MIN_SCALE) / qmax


def round_clamp(x: torch.Tensor, qmin: int, qmax: int, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(round(x) + zero_point, qmin, qmax)``, still in ``x``'s float type (``x`` is already ``w / s``)."""
    q = torch.round(x)
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, qmin, qmax)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, in]`` -> ``[rows, n_groups, group_size]`` (zero padded on a ragged last group)."""
    rows, in_f = w.shape
    n_groups = math.ceil(in_f / group_size)
    pad = n_groups * group_size - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, n_groups, group_size)


def sum_over_units(err: torch.Tensor, granularity: str, group_size: int = 128) -> torch.Tensor:
    """Sum an elementwise quantity of a ``[out, in]`` weight over each quantization unit (padding adds 0)."""
    if granularity == "tensor":
        return err.sum()
    if granularity == "channel":
        return err.sum(dim=1)
    return grouped(err, group_size).sum(-1)
