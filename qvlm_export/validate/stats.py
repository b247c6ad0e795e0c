"""Parity statistics of a candidate output against a reference output, as plain numpy functions.

PyPI Polygraphy computes absolute/relative error statistics only, so the project computes
its own set, in float64, for every (graph, output, comparison):

* ``max_abs``, ``mean_abs``, ``median_abs``, ``p99_abs``: statistics of ``|candidate - reference|``
  over every element (``p99`` with linear interpolation, numpy's default);
* ``cosine``: cosine similarity of the flattened tensors (1.0 when both are all zeros);
* ``sqnr_db``: ``10 log10(||ref||^2 / ||ref - cand||^2)`` (``inf`` when identical);
* ``nonfinite``: elements that are NaN or infinite in the candidate but not in the reference.

Across calibration iterations a comparison is judged on its worst iteration
(:func:`worst`), which is exactly what Polygraphy's per-iteration verdict checks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

# Statistics where larger is worse (upper bounds) and where smaller is worse (lower bounds).
UPPER_BOUNDED = ("max_abs", "mean_abs", "median_abs", "p99_abs", "nonfinite")
LOWER_BOUNDED = ("cosine", "sqnr_db")
STAT_NAMES = UPPER_BOUNDED + LOWER_BOUNDED


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    median_abs: float
    p99_abs: float
    cosine: float
    sqnr_db: float
    nonfinite: int = 0

    def to_json(self) -> dict[str, float | int | str]:
        # JSON has no inf/nan: keep them readable as strings.
        return {k: (v if isinstance(v, int) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> ErrorStats:
        return cls(**{f.name: (int(d[f.name]) if f.name == "nonfinite" else float(d[f.name])) for f in fields(cls)})


def abs_error_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max, mean, median and 99th percentile of the absolute error (0 for empty tensors)."""
    err = np.abs(np.asarray(candidate, np.float64) - np.asarray(reference, np.float64)).ravel()
    if err.size == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "median_abs": 0.0, "p99_abs": 0.0}
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "median_abs": float(np.median(err)), "p99_abs": float(np.quantile(err, 0.99))}


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of the angle between the flattened tensors; 1.0 when both are zero, 0.0 when one is."""
    r = np.asarray(reference, np.float64).ravel()
    c = np.asarray(candidate, np.float64).ravel()
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if nr == 0 and nc == 0:
        return 1.0
    if nr == 0 or nc == 0:
        return 0.0
    return float(np.dot(r, c) / (nr * nc))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical, -inf for a zero reference)."""
    r = np.asarray(reference, np.float64)
    noise = float(np.sum((r - np.asarray(candidate, np.float64)) ** 2))
    if noise == 0:
        return math.inf
    signal = float(np.sum(r**2))
    return -math.inf if signal == 0 else 10.0 * math.log10(signal / noise)


def error_stats(reference: np.ndarray, candidate: np.ndarray) -> ErrorStats:
    """Every statistic of one candidate output against its reference (shapes must match)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs candidate {candidate.shape}")
    bad = ~np.isfinite(candidate.astype(np.float64)) & np.isfinite(reference.astype(np.float64))
    nonfinite = int(bad.sum())
    if nonfinite:
        nan = math.nan
        return ErrorStats(nan, nan, nan, nan, nan, nan, nonfinite)
    return ErrorStats(**abs_error_stats(reference, candidate), cosine=cosine_similarity(reference, candidate),
                      sqnr_db=sqnr_db(reference, candidate), nonfinite=0)


def _worst_value(name: str, values: list[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if name in UPPER_BOUNDED else min(values)


def worst(per_iteration: list[ErrorStats]) -> ErrorStats:
    """The worst value of each statistic over iterations (NaN wins: it fails every bound)."""
    if not per_iteration:
        raise ValueError("no iterations to aggregate")
    merged = {name: _worst_value(name, [getattr(s, name) for s in per_iteration]) for name in STAT_NAMES}
    merged["nonfinite"] = sum(s.nonfinite for s in per_iteration)
    return ErrorStats(**merged)
