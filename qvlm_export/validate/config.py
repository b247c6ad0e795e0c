"""The validate stage's configuration: one frozen dataclass, serialised into the report's manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config_types import typed_fields
from ..errors import QvlmError, reject_unknown_keys

VALIDATE_CONFIG_VERSION = 1
ORT_RUNNERS = ("faithful", "fast")


@dataclass(frozen=True)
class ValidateConfig:
    """What validate compares and on which data.

    Attributes:
        calib: calibration data for graph parity (``builtin:calib``, ``builtin:eval:N`` or a JSONL path).
        calib_samples: how many calibration samples feed the graphs (in batches of ``batch_size``).
        batch_size: samples per feed; also the eval batch size.
        decode_steps: decoder decode-step feeds per batch after the prefill feed.
        eval_data: evaluation data for task parity.
        eval_samples: how many eval samples (None: all).
        runners: ONNX Runtime session modes to compare (``faithful`` exact QDQ, ``fast`` fused kernels).
        task: run task-level parity (greedy answers on the eval set).
        layer_errors: measure per-layer hidden-state error when the candidate's quant state is known.
        thresholds: thresholds YAML path (None: the packaged ``configs/thresholds.yaml``).
        threads: ONNX Runtime intra-op threads (None: ORT's default).
        int4_accuracy_level: how ``fast`` computes int4 MatMulNBits (1 fp32 ... 4 int8 activations;
            None: ORT's default, 4). The thresholds' ``fast``/``drift`` bounds were measured at 4.
        text: perplexity ratio and next-token agreement on English text (models with a natural-language
            tokenizer; others are skipped with the reason).
        text_tokens: tokens of text scored, in windows of ``text_window``.
        speed_steps: decode steps timed on ORT ``fast`` for the summary's tokens/s (0: not timed).
    """

    calib: str = "builtin:calib"
    calib_samples: int = 8
    batch_size: int = 4
    decode_steps: int = 1
    eval_data: str = "builtin:eval"
    eval_samples: int | None = 100
    runners: tuple[str, ...] = ORT_RUNNERS
    task: bool = True
    layer_errors: bool = True
    thresholds: str | None = None
    threads: int | None = None
    int4_accuracy_level: int | None = None
    text: bool = True
    text_tokens: int = 3072
    text_window: int = 512
    speed_steps: int = 16
    version: int = VALIDATE_CONFIG_VERSION

    def __post_init__(self) -> None:
        for name in ("calib_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise QvlmError(f"validate: {name} must be at least 1, got {getattr(self, name)}")
        if self.text_window < 2 or self.text_tokens < self.text_window:
            raise QvlmError(f"validate: text_window must be at least 2 and text_tokens at least text_window, got "
                            f"{self.text_tokens} and {self.text_window}")
        if self.speed_steps < 0:
            raise QvlmError(f"validate: speed_steps must be 0 or more, got {self.speed_steps}")
        if self.decode_steps < 0:
            raise QvlmError(f"validate: decode_steps must be 0 or more, got {self.decode_steps}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise QvlmError(f"validate: eval_samples must be at least 1 (or null for all), got {self.eval_samples}")
        unknown = [r for r in self.runners if r not in ORT_RUNNERS]
        if unknown or not self.runners:
            raise QvlmError(f"validate: runners must be a non-empty subset of {list(ORT_RUNNERS)}, got {list(self.runners)}")
        if self.int4_accuracy_level is not None and self.int4_accuracy_level not in range(5):
            raise QvlmError(f"validate: int4_accuracy_level must be 0-4 (1 fp32, 2 fp16, 3 bf16, 4 int8) or null, "
                            f"got {self.int4_accuracy_level}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["runners"] = list(self.runners)
        return d


def validate_config_from_dict(raw: dict[str, Any] | None, source: str = "validate") -> ValidateConfig:
    """A config from a mapping (e.g. the ``validate:`` section of a run config), rejecting unknown keys."""
    if raw is not None and not isinstance(raw, dict):
        raise QvlmError(f"{source}: must be a mapping")
    raw = dict(raw or {})
    reject_unknown_keys(raw, ValidateConfig, source, hidden=frozenset({"version"}))
    if isinstance(raw.get("runners"), str):
        raw["runners"] = tuple(raw["runners"].split(","))
    try:
        return ValidateConfig(**typed_fields(ValidateConfig, raw, source))
    except TypeError as exc:
        raise QvlmError(f"{source}: {exc}") from None
