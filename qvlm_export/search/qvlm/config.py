"""The Q-VLM search configuration: one frozen dataclass, read from a recipe's ``method_args``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...config_types import known_options
from ...errors import QvlmError

STARTS = ("rtn", "gptq", "gptq_mse")  # where a block search may start (.start)


@dataclass(frozen=True)
class QVLMConfig:
    """Hyperparameters of the Q-VLM search; defaults are tuned for a few CPU minutes per setting.

    Attributes:
        p: partition threshold on the normalised dependency ``D(k,k+1) / b`` in [0, 1]:
            consecutive units join one block while it exceeds ``p`` (paper: ``p``).
        max_depth: most units in one block (paper: 3).
        eta: weight of the Jacobian-weighted entropy term in vision blocks (paper: ``eta``).
        iterations: Adam steps per block.
        lr_round: Adam learning rate of the AdaRound rounding logits.
        lr_step: Adam learning rate of the log activation steps (LSQ gradient).
        round_weight: weight of the AdaRound regulariser (mean over weights) once annealing starts.
        warmup: fraction of iterations before the regulariser switches on.
        beta: start and end of the regulariser's annealed exponent.
        token_normalised: measure the block output error per token relative to the token's FP
            energy (every token weighs the same) instead of pooled; a few attention-sink tokens
            carry most of the hidden-state energy and would otherwise decide the search.
        probe_bits: bit width of the entropy probe when activations are not quantized (A16).
        dependency_mining: partition by ``D`` (off: every unit its own block, layer-wise search).
        visual_optimization: add the entropy term to vision blocks (off: ``eta`` is ignored).
        clip_grid: candidate clipping ratios for the initial weight and activation steps.
        start: the layer-wise solutions a block search may start from (:mod:`.start`): ``rtn``
            (the paper's), ``gptq`` (the GPTQ baseline's rounding), ``gptq_mse``; the one with
            the smallest block error is the start, and a search that ends above it keeps it.
        holdout: fraction of the calibration batches the rounding search does not train on; they
            decide whether the searched block replaces its start (0: decide on the training batches).
        seed: search seed; ``None`` takes the recipe's calibration seed.
        progress: show a progress bar per block. Display only: the method sets it from the recipe's
            ``display`` (``quantize(progress=...)``); it is left out of ``==`` and ``to_dict``.
    """

    version: ClassVar[int] = 1  # bumped when a field's meaning changes

    p: float = 0.6
    max_depth: int = 3
    eta: float = 0.0005
    iterations: int = 160
    lr_round: float = 0.02
    lr_step: float = 0.005
    round_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    token_normalised: bool = False
    probe_bits: int = 8
    dependency_mining: bool = True
    visual_optimization: bool = True
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)
    start: tuple[str, ...] = ("rtn", "gptq", "gptq_mse")
    holdout: float = 0.25
    seed: int | None = None
    progress: bool = field(default=True, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["progress"]
        return d


def config_from_args(args: dict[str, Any], source: str = "method_args") -> QVLMConfig:
    """Validate a recipe's ``method_args`` into a :class:`QVLMConfig`."""
    cfg = QVLMConfig(**known_options(QVLMConfig, dict(args), source, "Q-VLM option"))  # lists become float tuples
    if not 0.0 <= cfg.p <= 1.0:
        raise QvlmError(f"{source}: p must be in [0, 1] (a normalised dependency), got {cfg.p}")
    if cfg.max_depth < 1:
        raise QvlmError(f"{source}: max_depth must be at least 1, got {cfg.max_depth}")
    if cfg.iterations < 0 or cfg.eta < 0 or cfg.lr_round <= 0 or cfg.lr_step <= 0:
        raise QvlmError(f"{source}: iterations and eta must be >= 0 and learning rates > 0")
    if not 2 <= cfg.probe_bits <= 8:
        raise QvlmError(f"{source}: probe_bits must be in 2..8, got {cfg.probe_bits}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise QvlmError(f"{source}: holdout must be in [0, 1), got {cfg.holdout}")
    if not cfg.start or any(s not in STARTS for s in cfg.start):
        raise QvlmError(f"{source}: start must list some of {list(STARTS)}, got {list(cfg.start)}")
    if len(cfg.beta) != 2 or not cfg.clip_grid or not all(0 < r <= 1 for r in cfg.clip_grid):
        raise QvlmError(f"{source}: beta must be [start, end] and clip_grid ratios in (0, 1]")
    return cfg
