"""Typed configs of the baselines (RTN, SmoothQuant, AWQ, GPTQ), read from a recipe's ``method_args``.

Like Q-VLM's, QIG's and Q-ViT's: one frozen dataclass per method, its field defaults the
method's defaults, its class-level ``version`` bumped when a field's meaning changes.
:func:`method_config` checks keys and types in one line (``gptq: method_args.block_size must
be int like 128, got '128'``); each config checks its own ranges.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import QvlmError


def check_method_args(method: str, args: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``args`` over ``defaults``; an unknown key or a value unlike its default's type is a one-line error."""
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise QvlmError(f"{method}: unknown method_args key {unknown[0]!r}; allowed: {sorted(defaults)}")
    for key, value in args.items():  # each value must have its default's type (ints pass as floats)
        default = defaults[key]
        kinds = (int, float) if isinstance(default, float) else type(default)
        if default is not None and (not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool)):
            raise QvlmError(f"{method}: method_args.{key} must be {type(default).__name__} like {default!r}, "
                            f"got {value!r}")
    return {**defaults, **args}


def method_config(recipe, cls: type):
    """The recipe's ``method_args`` as a ``cls`` instance (float fields stored as floats)."""
    fields = dataclasses.fields(cls)
    args = check_method_args(recipe.method, dict(recipe.method_args), {f.name: f.default for f in fields})
    return cls(**{f.name: float(args[f.name]) if isinstance(f.default, float) else args[f.name] for f in fields})


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest has no options: the recipe's weight and activation specs are all of it."""

    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha``: migration strength, ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (the paper's 0.5).

    ``alpha_grid``: choose alpha per smoothing group on the quantized output error over ``N + 1``
    values in [0, 1] (0: the fixed ``alpha``); ``through_gate``: also smooth ``down_proj``'s input
    through ``up_proj`` (where a real LM's massive activations are).
    """

    version: ClassVar[int] = 1
    alpha: float = 0.5
    alpha_grid: int = 0
    through_gate: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise QvlmError(f"smoothquant: method_args.alpha must be in [0, 1], got {self.alpha}")
        if self.alpha_grid < 0:
            raise QvlmError(f"smoothquant: method_args.alpha_grid must be >= 0 (0: fixed alpha), got {self.alpha_grid}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AWQConfig:
    """llm-awq's search: ``grid`` exponents, then (``clip``) ``clip_grid`` shrinks of the range down to
    ``1 - max_shrink`` on ``clip_tokens`` input rows per Linear."""

    version: ClassVar[int] = 1
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GPTQConfig:
    """The reference's options: ``damp`` relative to mean diag H, lazy batches of ``block_size`` columns,
    ``act_order`` (forces ``static_groups`` so groups stay contiguous, the deployable layout)."""

    version: ClassVar[int] = 1
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise QvlmError(f"gptq: method_args.damp must be in (0, 1), got {self.damp}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
