"""Task accuracy: greedy exact match per question type, for any backend that answers questions."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..data.synthetic import Sample


class Answerer(Protocol):
    """Anything that answers a batch of visual questions greedily (PyTorch, ORT, TensorRT)."""

    def answer(self, samples: list[Sample]) -> list[str]: ...


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().replace("</s>", " ").strip(" .?!\n\t").split())


@dataclass(frozen=True)
class EvalResult:
    overall: float
    by_type: dict[str, float]
    n: int
    predictions: list[str] = field(default_factory=list, repr=False)
    correct: list[bool] = field(default_factory=list, repr=False)  # per question, in order: for paired tests
    text: dict | None = None  # {"perplexity", "tokens"} when ``eval --text`` scored English text

    def interval(self) -> tuple[float, float]:
        """Wilson 95% interval of ``overall``."""
        from .intervals import wilson_interval

        return wilson_interval(round(self.overall * self.n), self.n)

    def to_json(self) -> dict:
        out = {"overall": self.overall, "by_type": self.by_type, "n": self.n}
        return {**out, "text": self.text} if self.text is not None else out

    def write_json(self, path: str | Path) -> None:
        from ..manifest import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


def score(samples: list[Sample], predictions: list[str]) -> EvalResult:
    hits: dict[str, list[bool]] = defaultdict(list)
    every = []
    for s, p in zip(samples, predictions, strict=True):
        every.append(normalize_answer(p) == normalize_answer(s.answer))
        hits[s.qtype].append(every[-1])
    by_type = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    return EvalResult(overall=sum(every) / max(len(every), 1), by_type=by_type, n=len(every),
                      predictions=list(predictions), correct=every)


def evaluate(answerer: Answerer, samples: list[Sample], batch_size: int = 32,
             progress: bool = True, description: str = "eval") -> EvalResult:
    """Answer every sample in batches (with a progress bar) and score exact match."""
    from rich.progress import Progress

    predictions: list[str] = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(samples))
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            predictions.extend(answerer.answer(batch))
            bar.advance(task, len(batch))
    return score(samples, predictions)


def result_from_dict(d: dict) -> EvalResult:
    return EvalResult(overall=float(d["overall"]), by_type=dict(d["by_type"]), n=int(d["n"]))


def as_dict(result: EvalResult) -> dict:
    d = asdict(result)
    d.pop("predictions", None)
    d.pop("correct", None)
    return d
