"""Task-level parity: accuracy per question type of reference and candidate, and answer agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..evaluate.accuracy import EvalResult, normalize_answer
from .thresholds import Check


def identical_share(reference: list[str], candidate: list[str]) -> float:
    """Share of greedy answers identical (after normalisation) to the reference's."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference answers vs {len(candidate)} candidate answers")
    if not reference:
        return 1.0
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(reference, candidate))
    return same / len(reference)


@dataclass(frozen=True)
class TaskParity:
    """One candidate runner's accuracy against the reference on the eval set."""

    runner: str
    reference: EvalResult
    candidate: EvalResult
    identical: float
    checks: tuple[Check, ...]

    @property
    def delta(self) -> dict[str, float]:
        """Candidate minus reference accuracy, per question type and ``overall``."""
        out = {t: self.candidate.by_type.get(t, 0.0) - acc for t, acc in self.reference.by_type.items()}
        out["overall"] = self.candidate.overall - self.reference.overall
        return out

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"task accuracy ({self.runner}, {self.reference.n} eval samples): {c.describe()}"
                for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"runner": self.runner, "n": self.reference.n, "passed": self.passed,
                "reference": self.reference.to_json(), "candidate": self.candidate.to_json(),
                "delta": self.delta, "identical_answers": self.identical, "checks": [c.to_json() for c in self.checks]}


def task_parity(runner: str, reference: EvalResult, candidate: EvalResult, bounds: dict[str, float]) -> TaskParity:
    """Compare two scored runs on the same samples; ``bounds`` from ``ThresholdConfig.task_bounds``."""
    if reference.n != candidate.n:
        raise ValueError(f"reference scored {reference.n} samples, candidate {candidate.n}")
    identical = identical_share(reference.predictions, candidate.predictions)
    checks = []
    if "max_accuracy_drop" in bounds:
        checks.append(Check("accuracy_drop", reference.overall - candidate.overall, bounds["max_accuracy_drop"]))
    if "min_identical_answers" in bounds:
        checks.append(Check("identical_answers", identical, bounds["min_identical_answers"]))
    return TaskParity(runner=runner, reference=reference, candidate=candidate, identical=identical,
                      checks=tuple(checks))
