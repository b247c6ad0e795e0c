"""QIG's arithmetic as plain tensor functions: integrated gradients and per-token weights.

* :func:`integrated_gradients`: ``IG = (X - X0) * (1/m) sum_k grad F(X0 + a_k (X - X0))`` with
  ``a_k = linspace(0, 1, m)`` (QIG's release: 32 steps, each weighing ``1/m``; a left Riemann
  sum would drop ``a = 1``, QIG keeps both ends). Completeness: ``sum IG -> F(X) - F(X0)``
  as ``m`` grows (exact for a quadratic ``F`` with the trapezoid rule, approximate here).
* :func:`token_scores`: ``u_{b,t} = mean_c |IG_{b,t,c}|``.
* :func:`normalise_per_sample`: ``p = u / sum_t u`` over each sample's real tokens (padding
  gets 0); a sample whose scores are all 0 (at the first layer on the W4A8 path ``X_q = X``)
  falls back to uniform weights.
* :func:`iqr_clip`: clip each sample's real-token weights to ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]``
  and renormalise to 1 (weight-only path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ScalarFn = Callable[[torch.Tensor], torch.Tensor]


def ig_alphas(steps: int) -> torch.Tensor:
    """The path points ``linspace(0, 1, steps)`` (QIG's release)."""
    if steps < 1:
        raise ValueError(f"integrated gradients need at least 1 step, got {steps}")
    return torch.linspace(0.0, 1.0, steps) if steps > 1 else torch.ones(1)


def integrated_gradients(fn: ScalarFn, x: torch.Tensor, baseline: torch.Tensor, steps: int = 32) -> torch.Tensor:
    """``(x - x0) * mean_k grad fn(x0 + a_k (x - x0))`` elementwise; ``fn`` maps a tensor like ``x`` to a scalar."""
    x, baseline = x.detach(), baseline.detach().to(x.dtype)
    delta = x - baseline
    total = torch.zeros_like(x)
    for a in ig_alphas(steps).tolist():
        z = (baseline + a * delta).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(fn(z), z)
        total += grad
    return delta * total / steps


def token_scores(ig: torch.Tensor) -> torch.Tensor:
    """``u = mean_c |IG|``: ``[..., T, C] -> [..., T]``."""
    return ig.abs().mean(dim=-1)


def normalise_per_sample(u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` scores to weights summing to 1 over each sample's real tokens (``mask``: True = real)."""
    mask = torch.ones_like(u, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    u = torch.where(mask, u.clamp_min(0), torch.zeros_like(u))
    total = u.sum(dim=-1, keepdim=True)
    uniform = mask.to(u.dtype) / mask.sum(dim=-1, keepdim=True).clamp_min(1).to(u.dtype)
    return torch.where(total > 0, u / total.clamp_min(1e-30), uniform)


def iqr_clip(p: torch.Tensor, mask: torch.Tensor | None = None, k: float = 1.5) -> torch.Tensor:
    """Clip each sample's real-token weights to ``[Q1 - k IQR, Q3 + k IQR]`` and renormalise to sum 1."""
    mask = torch.ones_like(p, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    out = torch.zeros_like(p)
    for b in range(p.shape[0]):
        real = p[b][mask[b]]
        if real.numel() == 0:
            continue
        q1, q3 = torch.quantile(real.double(), 0.25).to(p.dtype), torch.quantile(real.double(), 0.75).to(p.dtype)
        iqr = q3 - q1
        out[b][mask[b]] = real.clamp(min=float(q1 - k * iqr), max=float(q3 + k * iqr)).clamp_min(0)
    return normalise_per_sample(out, mask)


def token_weights(ig: torch.Tensor, mask: torch.Tensor | None, clip: bool) -> torch.Tensor:
    """QIG's per-token weights from an IG tensor ``[B, T, C]``: scores, per-sample normalisation, optional IQR clip."""
    p = normalise_per_sample(token_scores(ig), mask)
    return iqr_clip(p, mask) if clip else p
