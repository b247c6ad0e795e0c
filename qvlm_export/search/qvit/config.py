"""The Q-ViT (post-training) configuration: one frozen dataclass, read from a recipe's ``method_args``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...config_types import known_options
from ...errors import QvlmError

IRM_FORMS = ("fold", "layernorm")


@dataclass(frozen=True)
class QViTConfig:
    """Hyperparameters of Q-ViT as a post-training block reconstruction (docs/qvit.md).

    Attributes:
        vision_block_units: vision layers reconstructed together as one block (0: the whole
            used vision tower, so the block objective is the vision output itself; 1: layer-wise).
        lambda_dgd: weight of the DGD term in the vision blocks' objective (0: off).
        irm: learn the function-preserving IRM (folded into q/k at the end).
        lr_irm: Adam learning rate of the IRM's ``log g`` and ``beta`` (or the LayerNorm's weight and bias).
        irm_form: ``fold`` (ours: function-preserving, folded into q/k, deployable) or ``layernorm``
            (Q-ViT's release: an affine LayerNorm on each head's q and k, shared across heads; it
            adds nodes the exported graph does not carry, so the state is simulated only).
        iterations: Adam steps per unit of a block: a vision block of ``n`` layers gets ``n * iterations``
            (the same steps per layer as a layer-wise search), every other block ``iterations``.
        lr_round, lr_step: as Q-VLM's (AdaRound logits; LSQ log activation steps).
        start, holdout: as Q-VLM's: the layer-wise solutions a block may start from, and the share
            of calibration batches that decide whether the searched block (with its IRM) replaces it.
        seed: search seed; ``None`` takes the recipe's calibration seed.
        progress: show a progress bar per block. Display only, as Q-VLM's (set from the recipe's ``display``).
    """

    version: ClassVar[int] = 1  # bumped when a field's meaning changes

    vision_block_units: int = 0
    lambda_dgd: float = 0.1
    irm: bool = True
    lr_irm: float = 0.01
    irm_form: str = "fold"
    iterations: int = 160
    lr_round: float = 0.02
    lr_step: float = 0.005
    start: tuple[str, ...] = ("rtn", "gptq", "gptq_mse")
    holdout: float = 0.25
    seed: int | None = None
    progress: bool = field(default=True, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["progress"]
        return d


def qvit_config(args: dict[str, Any], source: str = "method_args") -> QViTConfig:
    """Validate a recipe's ``method_args`` into a :class:`QViTConfig`."""
    cfg = QViTConfig(**known_options(QViTConfig, dict(args), source, "Q-ViT option"))
    if cfg.lambda_dgd < 0 or cfg.iterations < 0 or cfg.lr_irm <= 0 or cfg.vision_block_units < 0:
        raise QvlmError(f"{source}: lambda_dgd, iterations and vision_block_units must be >= 0 and lr_irm > 0")
    if cfg.irm_form not in IRM_FORMS:
        raise QvlmError(f"{source}: irm_form must be one of {list(IRM_FORMS)}, got {cfg.irm_form!r}")
    return cfg
