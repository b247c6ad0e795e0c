"""Entropy of quantized activations and the cross-layer dependency of Q-VLM, as tensor functions.

Definitions (docs/qvlm.md has the derivations):

* A *probe* is a static symmetric per-tensor quantizer: codes ``q = clamp(round(x / s),
  -2^(b-1), 2^(b-1) - 1)``. Q-VLM's ``X_q^(k)`` is a layer input pushed through its
  probe, and every quantity below is a function of those integer codes only.
* ``H(X_q) = -sum_c p(c) log2 p(c)`` in bits, ``p`` the empirical distribution of the
  codes over all (valid) elements.
* ``D(k, k+1) = H(X_q^(k+1) | X_q^(k)) = H(X_q^(k), X_q^(k+1)) - H(X_q^(k))``, the
  conditional entropy of element-aligned code pairs (same sample, token and channel),
  which is the paper's ``-sum p(x^k, x^k+1) log p(x^k+1 | x^k)``.
* ``soft_entropy`` is a differentiable surrogate of ``H``: the histogram is built by
  linear interpolation (a triangular kernel of width one code) of the *unrounded*
  clamped codes ``x / s``, so it equals the hard histogram when ``x / s`` is integral and
  passes gradients to ``x`` and ``s`` everywhere else.
"""

from __future__ import annotations

import torch

from ...quant import functional as F
from ...quant.primitives import absmax_scale, round_clamp


def probe_scale(absmax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Scale of a symmetric per-tensor ``bits``-bit probe covering ``[-absmax, absmax]``."""
    return absmax_scale(absmax, bits)


def probe_codes(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes (int64) of ``x`` under a symmetric per-tensor probe."""
    qmin, qmax = F.qrange(bits, True)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return round_clamp(x.detach() / s, qmin, qmax).to(torch.int64)


def valid_elements(codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The codes of valid elements, flattened; ``mask`` broadcasts over trailing dims (e.g. [B, T])."""
    if mask is None:
        return codes.reshape(-1)
    mask = mask.to(torch.bool)
    while mask.dim() < codes.dim():
        mask = mask.unsqueeze(-1)
    return codes[mask.expand_as(codes)]


def histogram(codes: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Counts (int64, ``2^bits`` bins, lowest code first) of the valid symmetric ``bits``-bit codes."""
    qmin, qmax = F.qrange(bits, True)
    return torch.bincount(valid_elements(codes, mask) - qmin, minlength=qmax - qmin + 1).cpu()


def joint_histogram(a: torch.Tensor, b: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Counts ``[2^bits, 2^bits]`` of element-aligned code pairs ``(a_i, b_i)`` (rows: ``a``)."""
    if a.shape != b.shape:
        raise ValueError(f"aligned codes need one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    qmin, qmax = F.qrange(bits, True)
    levels = qmax - qmin + 1
    pair = (valid_elements(a, mask) - qmin) * levels + (valid_elements(b, mask) - qmin)
    return torch.bincount(pair, minlength=levels * levels).reshape(levels, levels).cpu()


def entropy_from_counts(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of the distribution a histogram (any shape) describes."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts.double().reshape(-1) / total
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


def conditional_entropy_from_joint(joint: torch.Tensor) -> float:
    """``H(B | A) = H(A, B) - H(A)`` from a joint histogram with ``A`` along rows."""
    return entropy_from_counts(joint) - entropy_from_counts(joint.sum(dim=1))


def entropy(codes: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> float:
    """``H(X_q)``: Shannon entropy in bits of the empirical distribution of integer ``codes``."""
    return entropy_from_counts(histogram(codes, bits, mask))


def conditional_entropy(given: torch.Tensor, target: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> float:
    """``H(target | given)`` in bits over element-aligned pairs: Q-VLM's ``D(k, k+1)``."""
    return conditional_entropy_from_joint(joint_histogram(given, target, bits, mask))


def per_sample_entropy(codes: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> list[float]:
    """``entropy`` of each sample (leading dimension) separately."""
    return [entropy(codes[i], bits, None if mask is None else mask[i]) for i in range(codes.shape[0])]


def soft_entropy(x: torch.Tensor, scale: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable entropy (bits) of the codes of ``x`` under a symmetric per-tensor quantizer.

    Each element spreads unit mass over its two nearest code levels in proportion to
    closeness (linear interpolation), so the histogram is piecewise linear in ``x / s``.
    """
    qmin, qmax = F.qrange(bits, True)
    u = valid_elements(torch.clamp(x / scale, qmin, qmax), mask) - qmin
    lower = torch.floor(u).detach().clamp(max=qmax - qmin - 1)
    frac = u - lower
    levels = qmax - qmin + 1
    hist = torch.zeros(levels, dtype=u.dtype, device=u.device)
    hist = hist.index_add(0, lower.long(), 1 - frac).index_add(0, lower.long() + 1, frac)
    p = hist / hist.sum().clamp_min(1e-12)
    return -(p * torch.log2(p.clamp_min(1e-12))).sum()
