"""Recipe sections for outlier handling that apply to any method (both off unless a recipe names them).

``rotation: {kind: hadamard, seed: 0}`` rotates the language model's residual stream with an
orthogonal matrix folded into the weights before calibration (:mod:`qvlm_export.search.rotation`).
``fallback: {max_layers: N, criterion: sqnr}`` keeps the input of the N Linears that int8
static per-tensor activations represent worst in floating point (weight-only quantized;
:mod:`qvlm_export.search.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import QvlmError

ROTATION_KINDS = ("hadamard",)
FALLBACK_CRITERIA = ("sqnr", "range")


@dataclass(frozen=True)
class RotationSpec:
    kind: str = "hadamard"  # Sylvester Hadamard (x) seeded random orthogonal odd factor, random signs
    seed: int = 0

    def check(self, where: str) -> None:
        if self.kind not in ROTATION_KINDS:
            raise QvlmError(f"{where}: kind must be one of {list(ROTATION_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class FallbackSpec:
    max_layers: int = 0
    criterion: str = "sqnr"  # sqnr: worst output SQNR of int8 input rounding; range: absmax / rms of the input

    def check(self, where: str) -> None:
        if self.criterion not in FALLBACK_CRITERIA:
            raise QvlmError(f"{where}: criterion must be one of {list(FALLBACK_CRITERIA)}, got {self.criterion!r}")
        if self.max_layers < 0:
            raise QvlmError(f"{where}: max_layers must be >= 0, got {self.max_layers}")
