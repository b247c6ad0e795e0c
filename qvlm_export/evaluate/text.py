"""Language-model metrics on real English text: perplexity and next-token agreement with FP.

The text is not ours: the Apache-2.0 and GPL-3 licence texts every Debian system installs
under ``/usr/share/common-licenses`` (package ``base-files``), read at run time. It is cut into
fixed windows of the model's own tokens; each window is scored with the language model alone
(no image), so the same numbers come from the PyTorch model, a simulated quant state or an
ONNX bundle. A window starts with the tokenizer's BOS (SmolLM2: ``<|im_start|>``) when it has
one, as the model saw in pretraining; the first position of a window is not scored.

Models whose tokenizer is not a natural-language one (the embedded model's 39-word
vocabulary) cannot be scored: :func:`text_windows` refuses them with a reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError

LICENSE_DIR = Path("/usr/share/common-licenses")
CORPUS_FILES = ("Apache-2.0", "GPL-3")
DEFAULT_TOKENS = 3072
DEFAULT_WINDOW = 512
MAX_UNKNOWN_SHARE = 0.02  # a tokenizer mapping more words than this to <unk> is not for English

LogitsFn = Callable[[np.ndarray], np.ndarray]  # token ids [B, T] -> logits [B, T, vocab]


@dataclass(frozen=True)
class TextSpec:
    """What to score: how many tokens of the corpus, in windows of ``window``."""

    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW

    def __post_init__(self):
        if self.window < 2 or self.tokens < self.window:
            raise QvlmError(f"text metrics need window >= 2 and tokens >= window (got tokens={self.tokens}, "
                            f"window={self.window})")


def english_text(directory: Path = LICENSE_DIR) -> str:
    """The corpus: the licence texts, joined in a fixed order."""
    parts = []
    for name in CORPUS_FILES:
        path = directory / name
        if not path.is_file():
            raise QvlmError(f"the English text for perplexity is missing ({path}); install Debian's base-files "
                            "package or run without text metrics")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def text_windows(tokenizer, spec: TextSpec = TextSpec(), text: str | None = None) -> np.ndarray:
    """``[n_windows, window]`` token ids of the corpus; refuses a tokenizer that cannot read English."""
    text = english_text() if text is None else text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids and sum(i == unk for i in ids) / len(ids) > MAX_UNKNOWN_SHARE:
        raise QvlmError("the model's tokenizer maps most English words to its unknown token; text metrics need a "
                        "natural-language tokenizer (use a real-weights model, e.g. --model builtin:llava-smollm2)")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = spec.window - (bos is not None)
    n = spec.tokens // spec.window
    if len(ids) < n * body:
        raise QvlmError(f"the English text has {len(ids)} tokens, fewer than the {n * body} asked for; "
                        "lower the token count")
    rows = [ids[i * body:(i + 1) * body] for i in range(n)]
    if bos is not None:
        rows = [[bos, *r] for r in rows]
    return np.asarray(rows, dtype=np.int64)


@dataclass(frozen=True)
class TextScores:
    """Per scored position: the negative log-likelihood of the true next token and the argmax token."""

    nll: np.ndarray  # [n_windows, window - 1] float64
    top1: np.ndarray  # [n_windows, window - 1] int64

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def tokens(self) -> int:
        return int(self.nll.size)


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL of ``targets`` [B, T] under ``logits`` [B, T, V], in float64 (a stable log-sum-exp)."""
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def score_text(logits_fn: LogitsFn, windows: np.ndarray) -> TextScores:
    """Run each window through ``logits_fn`` (one window at a time: logits of 49k tokens are large)."""
    nll, top1 = [], []
    for row in windows:
        logits = np.asarray(logits_fn(row[None, :]))[0, :-1]
        if not np.isfinite(logits).all():
            nll.append(np.full(len(row) - 1, np.inf))
        else:
            nll.append(log_softmax_nll(logits[None], row[None, 1:])[0])
        top1.append(logits.argmax(axis=-1))
    return TextScores(nll=np.stack(nll), top1=np.stack(top1).astype(np.int64))


@dataclass(frozen=True)
class TextComparison:
    """A candidate's text scores against the reference's, with paired bootstrap intervals."""

    reference_perplexity: float
    candidate_perplexity: float
    agreement: float  # share of positions whose argmax equals the reference's
    ratio_interval: tuple[float, float]
    agreement_interval: tuple[float, float]
    tokens: int

    @property
    def perplexity_ratio(self) -> float:
        return self.candidate_perplexity / self.reference_perplexity

    def to_json(self) -> dict[str, Any]:
        return {"reference_perplexity": self.reference_perplexity, "candidate_perplexity": self.candidate_perplexity,
                "perplexity_ratio": self.perplexity_ratio, "perplexity_ratio_ci95": list(self.ratio_interval),
                "next_token_agreement": self.agreement, "agreement_ci95": list(self.agreement_interval),
                "tokens": self.tokens}


def compare_text(reference: TextScores, candidate: TextScores, chunk: int = 64, draws: int = 2000,
                 seed: int = 0) -> TextComparison:
    """Perplexity ratio and agreement; 95% intervals from a paired bootstrap over chunks of ``chunk`` tokens.

    Chunks, not tokens, are resampled: neighbouring tokens' losses are correlated.
    """
    if reference.nll.shape != candidate.nll.shape:
        raise ValueError(f"reference scored {reference.nll.shape}, candidate {candidate.nll.shape}")
    diff = (candidate.nll - reference.nll).reshape(-1)
    same = (candidate.top1 == reference.top1).reshape(-1).astype(np.float64)
    n = diff.size // chunk * chunk
    finite = np.isfinite(diff).all()
    d_chunks = diff[:n].reshape(-1, chunk).mean(axis=1) if finite else None
    a_chunks = same[:n].reshape(-1, chunk).mean(axis=1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a_chunks), size=(draws, len(a_chunks)))
    agreement_ci = tuple(float(v) for v in np.quantile(a_chunks[picks].mean(axis=1), [0.025, 0.975]))
    if d_chunks is None:
        ratio_ci = (float("inf"), float("inf"))
    else:
        ratio_ci = tuple(float(v) for v in np.exp(np.quantile(d_chunks[picks].mean(axis=1), [0.025, 0.975])))
    return TextComparison(reference_perplexity=reference.perplexity, candidate_perplexity=candidate.perplexity,
                          agreement=float(same.mean()), ratio_interval=ratio_ci, agreement_interval=agreement_ci,
                          tokens=reference.tokens)


def torch_logits_fn(model) -> LogitsFn:
    """The language model of a (possibly simulated-quantized) HF VLM, text only."""
    import torch

    language_model = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            hidden = language_model(input_ids=torch.from_numpy(ids)).last_hidden_state
            return model.lm_head(hidden).float().numpy()

    return run


def runner_logits_fn(runner) -> LogitsFn:
    """A bundle's embed and decoder graphs (any :class:`~qvlm_export.runtime.runner.VLMRunner`), text only."""
    def run(ids: np.ndarray) -> np.ndarray:
        batch, length = ids.shape
        mask = np.ones((batch, length), dtype=np.int64)
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        logits, _ = runner.decode(runner.embed(ids), mask, positions, runner.info.empty_past(batch))
        return logits

    return run


def answerer_text_scores(answerer, spec: TextSpec = TextSpec()) -> TextScores:
    """Score the text with whatever an ``eval`` answerer runs: a PyTorch model or a bundle's graphs."""
    if hasattr(answerer, "vlm"):  # TorchAnswerer: FP or simulated-quantized PyTorch
        return score_text(torch_logits_fn(answerer.vlm.model), text_windows(answerer.vlm.tokenizer, spec))
    windows = text_windows(answerer.processor.tokenizer, spec)
    if not answerer._active:
        answerer.runner.activate()
        answerer._active = True
    return score_text(runner_logits_fn(answerer.runner), windows)
