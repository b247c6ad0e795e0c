"""Language-model parity on English text: perplexity ratio and next-token agreement against FP.

The reference bundle's language model scores the text once; each candidate runner (ORT
faithful, ORT fast, TensorRT) scores the same windows. The absolute bounds of the thresholds
file (``max_perplexity_ratio``, ``min_next_token_agreement``) judge them: these hold whatever
round-to-nearest does on the model. A model whose tokenizer cannot read English (the embedded
39-word model) is skipped with the reason in the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import QvlmError
from ..evaluate.text import (
    TextComparison,
    TextScores,
    TextSpec,
    compare_text,
    runner_logits_fn,
    score_text,
    text_windows,
)
from .thresholds import Check, ThresholdConfig


@dataclass(frozen=True)
class TextReference:
    """The reference's scores, or why text metrics do not apply to this model."""

    windows: Any = None  # np.ndarray [n, window]
    scores: TextScores | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class TextParity:
    runner: str
    comparison: TextComparison
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"text ({self.runner}, {self.comparison.tokens} tokens of English): {c.describe()}"
                for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"runner": self.runner, "passed": self.passed, **self.comparison.to_json(),
                "checks": [c.to_json() for c in self.checks]}


def runner_scores(runner, windows) -> TextScores:
    with runner:
        return score_text(runner_logits_fn(runner), windows)


def text_reference(info, spec: TextSpec, make_runner) -> TextReference:
    """Score the reference bundle (``make_runner()`` gives its faithful runner), or say why not."""
    try:
        windows = text_windows(info.load_processor().tokenizer, spec)
    except QvlmError as exc:
        return TextReference(skipped=str(exc))
    return TextReference(windows=windows, scores=runner_scores(make_runner(), windows))


def text_parity(runner_name: str, reference: TextReference, candidate: TextScores, precision: str,
                thresholds: ThresholdConfig) -> TextParity:
    comparison = compare_text(reference.scores, candidate)
    bounds = thresholds.absolute_bounds(precision)
    checks = []
    if "max_perplexity_ratio" in bounds:
        checks.append(Check("perplexity_ratio", comparison.perplexity_ratio, bounds["max_perplexity_ratio"]))
    if "min_next_token_agreement" in bounds:
        checks.append(Check("next_token_agreement", comparison.agreement, bounds["min_next_token_agreement"]))
    return TextParity(runner=runner_name, comparison=comparison, checks=tuple(checks))
