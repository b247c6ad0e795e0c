"""Uncertainty of the figures a results table compares: intervals and paired tests.

500 questions at 93% accuracy carry about +-1.1 points of standard error, so a table of
accuracies without intervals invites reading noise. Here:

* :func:`wilson_interval`: the Wilson score interval of a proportion (good coverage near 0
  and 1, where the Wald interval fails; Newcombe 1998, method 3);
* :func:`mcnemar_p`: the exact McNemar test of two methods answering the *same* questions
  (a two-sided binomial test on the discordant pairs: what a paired comparison rests on);
* :func:`paired_difference_interval`: a percentile bootstrap interval of the accuracy
  difference between two methods over the same questions (resampling questions, so the
  pairing is kept);
* :func:`sqnr_interval`: a percentile bootstrap interval of the pooled logit SQNR
  (resampling questions; the figure is a ratio of sums, so no closed form), and
  :func:`paired_sqnr_difference_interval` for two methods on the same questions.

Bootstraps draw from a fixed seed, so a table regenerates identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_SAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``successes / n`` (``(0, 1)`` for ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value: is A right-where-B-wrong as often as the reverse?"""
    if len(correct_a) != len(correct_b):
        raise ValueError("paired comparison needs the same questions for both methods")
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _bootstrap_indices(n: int, samples: int, seed: int) -> torch.Tensor:
    return torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))


def paired_difference_interval(correct_a: Sequence[bool], correct_b: Sequence[bool], samples: int = BOOTSTRAP_SAMPLES,
                               seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``acc(A) - acc(B)`` over the same questions."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("paired comparison needs the same, non-empty question set for both methods")
    diff = torch.tensor([float(x) - float(y) for x, y in zip(correct_a, correct_b)], dtype=torch.float64)
    means = diff[_bootstrap_indices(len(diff), samples, seed)].mean(dim=1)
    return _percentiles(means, level)


def sqnr_terms(reference: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row signal ``||r_i||^2`` and noise ``||r_i - a_i||^2`` (float64): what pooled SQNR sums."""
    ref = reference.double().reshape(len(reference), -1)
    return ref.pow(2).sum(dim=1), (ref - approx.double().reshape(len(approx), -1)).pow(2).sum(dim=1)


def pooled_sqnr_db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    return float(10 * torch.log10(signal.sum() / noise.sum().clamp_min(1e-300)))


def sqnr_interval(reference: torch.Tensor, approx: torch.Tensor, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (dB) of the pooled SQNR of rows of ``approx`` against ``reference``."""
    return sqnr_terms_interval(*sqnr_terms(reference, approx), samples=samples, seed=seed, level=level)


def sqnr_terms_interval(signal: torch.Tensor, noise: torch.Tensor, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """:func:`sqnr_interval` from per-row terms (:func:`sqnr_terms`)."""
    idx = _bootstrap_indices(len(signal), samples, seed)
    return _percentiles(_sqnr_rows(signal, noise, idx), level)


def paired_sqnr_difference_interval(signal: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
                                    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                                    level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval (dB) of ``SQNR(A) - SQNR(B)`` over the same questions (same resamples for both)."""
    idx = _bootstrap_indices(len(signal), samples, seed)
    return _percentiles(_sqnr_rows(signal, noise_a, idx) - _sqnr_rows(signal, noise_b, idx), level)


def _sqnr_rows(signal: torch.Tensor, noise: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    signal, noise = torch.as_tensor(signal, dtype=torch.float64), torch.as_tensor(noise, dtype=torch.float64)
    return 10 * torch.log10(signal[idx].sum(dim=1) / noise[idx].sum(dim=1).clamp_min(1e-300))


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype))
    return float(lo), float(hi)
