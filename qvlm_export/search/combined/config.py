"""The combined method's configuration: Q-VLM's (:class:`..qvlm.config.QVLMConfig`) plus QIG's and Q-ViT's parts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ...config_types import typed_fields
from ...errors import QvlmError
from ..qvlm.config import QVLMConfig, config_from_args


@dataclass(frozen=True)
class CombinedConfig:
    """What the combination adds to Q-VLM (docs/combined.md); each part can be switched off (the ablation).

    Attributes:
        token_weights: QIG's integrated-gradient token weights in every block's objective.
        token_mix: ``w = (1 - token_mix) * uniform + token_mix * p_IG`` per sample (1: QIG's
            weights alone; ours: with Q-VLM's pooled objective the IG weights alone concentrate the
            search on a few tokens).
        ig_steps: integrated-gradient path points (QIG: 32).
        baseline: ``auto`` (zero for weight-only, the quantized-stream block input with quantized
            activations), ``zero`` or ``quantized``.
        iqr_clip: ``auto`` (weight-only only), ``on`` or ``off``.
        qvit: Q-ViT's DGD term and learnable IRM in the vision blocks.
        lambda_dgd, lr_irm: as Q-ViT's (:class:`..qvit.config.QViTConfig`).
        irm: learn and fold the IRM (with ``qvit``).
        normalise_tokens: weigh each token's error relative to its own FP energy inside the token-weighted
            objective (``sum_t w_t ||e_t||^2 / ||r_t||^2 / sum_t w_t``, Q-VLM's token-normalised form with
            the weights inside), through weights ``w_t / ||r_t||^2`` in the pooled objective.
        choose_per_block: search every block also as plain Q-VLM and keep the one with the smaller
            unweighted block error on the held-out calibration batches (:mod:`.choice`).
        choose_on: ``held`` (the held-out batches decide) or ``both`` (the combined search must also
            have the smaller error on the whole calibration set).
    """

    version: ClassVar[int] = 1  # bumped when a field's meaning changes

    token_weights: bool = True
    token_mix: float = 0.5
    ig_steps: int = 32
    baseline: str = "auto"
    iqr_clip: str = "auto"
    qvit: bool = True
    lambda_dgd: float = 0.1
    irm: bool = True
    lr_irm: float = 0.01
    normalise_tokens: bool = False
    choose_per_block: bool = True
    choose_on: str = "both"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def combined_config(args: dict[str, Any], source: str = "method_args") -> tuple[CombinedConfig, QVLMConfig]:
    """Split a recipe's ``method_args`` into the combination's own options and Q-VLM's."""
    own = {f.name for f in dataclasses.fields(CombinedConfig)}
    mine = {k: v for k, v in args.items() if k in own}
    qvlm = config_from_args({k: v for k, v in args.items() if k not in own}, source)
    cfg = CombinedConfig(**typed_fields(CombinedConfig, mine, source))
    if cfg.baseline not in ("auto", "zero", "quantized") or cfg.iqr_clip not in ("auto", "on", "off") \
            or cfg.choose_on not in ("held", "both"):
        raise QvlmError(f"{source}: baseline must be auto|zero|quantized, iqr_clip auto|on|off and choose_on held|both")
    if cfg.ig_steps < 1 or cfg.lambda_dgd < 0 or cfg.lr_irm <= 0 or not 0 <= cfg.token_mix <= 1:
        raise QvlmError(f"{source}: ig_steps must be >= 1, lambda_dgd >= 0, lr_irm > 0 and token_mix in [0, 1]")
    return cfg, qvlm
