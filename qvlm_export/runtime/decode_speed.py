"""Decode speed of a decoder: prefill a prompt of random embeddings, then one-token steps.

Random embeddings, because speed does not depend on what the tokens are and the decoder
graph is timed alone (no tokenizer, no vision graph). Repeats keep the fastest: on a
shared machine contention only ever slows a run down; the slowest is kept too, so every
figure can carry its spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bundle import BundleInfo

# (inputs_embeds, attention_mask, position_ids, past) -> present
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Sequence[Any]], Sequence[Any]]


@dataclass(frozen=True)
class DecodeTiming:
    prompt: int
    steps: int
    prefill_s: tuple[float, ...]  # one per repeat
    step_s: tuple[float, ...]  # mean seconds per decode step, one per repeat

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / min(self.step_s)

    @property
    def spread(self) -> float:
        """Slowest repeat over fastest (1.0: the repeats agree)."""
        return max(self.step_s) / min(self.step_s)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "steps": self.steps, "tokens_per_s": self.tokens_per_s, "spread": self.spread,
                "prefill_s": min(self.prefill_s), "step_s": list(self.step_s)}


def time_decode(step: StepFn, info: BundleInfo, prompt: int, steps: int, repeats: int = 3,
                seed: int = 0) -> DecodeTiming:
    """Time ``repeats`` generations of ``prompt`` + ``steps`` tokens through ``step``."""
    rng = np.random.default_rng(seed)
    hidden, dtype = info.model.hidden_size, info.float_dtype
    prefills, per_step = [], []
    for _ in range(repeats):
        embeds = rng.standard_normal((1, prompt, hidden)).astype(dtype)
        start = time.perf_counter()
        past = step(embeds, np.ones((1, prompt), np.int64), np.arange(prompt, dtype=np.int64)[None], info.empty_past(1))
        prefills.append(time.perf_counter() - start)
        tokens = rng.standard_normal((steps, 1, 1, hidden)).astype(dtype)
        start = time.perf_counter()
        for i in range(steps):
            total = prompt + i + 1
            past = step(tokens[i], np.ones((1, total), np.int64), np.array([[total - 1]], np.int64), past)
        per_step.append((time.perf_counter() - start) / steps)
    return DecodeTiming(prompt, steps, tuple(prefills), tuple(per_step))


def runner_step(runner: Any) -> StepFn:
    """A :data:`StepFn` over an active :class:`~.runner.VLMRunner` (its decode, logits dropped)."""
    return lambda embeds, mask, positions, past: runner.decode(embeds, mask, positions, past)[1]
