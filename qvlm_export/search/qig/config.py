"""The QIG configuration: one frozen dataclass, read from a recipe's ``method_args``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config_types import known_options
from ...errors import QvlmError


@dataclass(frozen=True)
class QIGConfig:
    """Hyperparameters of QIG (docs/qig.md); defaults are the paper's where it gives one.

    Attributes:
        grid: exponent grid of the scale search, ``r in {0, 1/grid, ..., (grid-1)/grid}`` (QIG: 20).
        ig_steps: integrated-gradient path points (QIG: 32).
        loss: ``mae`` (QIG's default) or ``mse`` (AWQ's) per token, averaged over channels.
        baseline: ``auto`` (zero for weight-only, the quantized-stream input for quantized
            activations, as QIG does), ``zero`` or ``quantized``.
        iqr_clip: ``auto`` (weight-only only, as QIG), ``on`` or ``off``.
        amplify: constant factor on ``|f - f_q|`` in the IG objective (QIG's W4A8 path uses
            1000; it cancels in the normalised weights except through float precision).
        token_weighting: off gives the plain AWQ scale search (uniform weights): the ablation.
        clip: llm-awq's per-group clipping search after the scales (ours: QIG's release has
            none; on here so that QIG and its base method AWQ differ only by the token weights).
        clip_grid, max_shrink, clip_tokens: as AWQ's.
        code_faithful: reproduce the release's quirks instead of the paper's intent: the
            quantized branch without gradient on the W4A8 path, padded tokens in the
            normalisation and the loss, and the first ``faithful_uniform_searches`` scale
            searches with uniform weights.
        faithful_uniform_searches: see ``code_faithful``.
        awq_candidate: per scale group, also search AWQ's scales (uniform weights, MSE) and keep
            whichever of the two has the smaller ``select_by`` loss on held-out calibration batches
            (both searched on the others; ours, not QIG's).
        select_by: the held-out loss that decides: ``awq`` (uniform MSE, AWQ's objective) or
            ``qig`` (the token-weighted ``loss``).
        holdout: share of the calibration batches held out for that choice.
    """

    version: ClassVar[int] = 1  # bumped when a field's meaning changes

    grid: int = 20
    ig_steps: int = 32
    loss: str = "mae"
    baseline: str = "auto"
    iqr_clip: str = "auto"
    amplify: float = 1.0
    token_weighting: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    code_faithful: bool = False
    faithful_uniform_searches: int = 1
    awq_candidate: bool = False
    select_by: str = "awq"
    holdout: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"loss": ("mae", "mse"), "baseline": ("auto", "zero", "quantized"), "iqr_clip": ("auto", "on", "off"),
            "select_by": ("awq", "qig")}


def qig_config(args: dict[str, Any], source: str = "method_args") -> QIGConfig:
    """Validate a recipe's ``method_args`` into a :class:`QIGConfig`."""
    cfg = QIGConfig(**known_options(QIGConfig, dict(args), source, "QIG option"))
    for key, allowed in _CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise QvlmError(f"{source}: {key} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.grid < 1 or cfg.ig_steps < 1 or cfg.clip_grid < 1 or cfg.amplify <= 0 or not 0 <= cfg.holdout < 1:
        raise QvlmError(f"{source}: grid, ig_steps and clip_grid must be >= 1, amplify > 0 and holdout in [0, 1)")
    return cfg
