"""Quantization recipes: one frozen, versioned config per method and setting.

A recipe file (``calibration/recipes/<method>-<setting>.yaml``, package data in
``qvlm_export/recipes/``) names a method and a setting; everything else defaults from the
setting table below and may be overridden::

    method: awq
    setting: w4a16
    weights: {bits: 4, granularity: group, group_size: 128, symmetric: true}
    activations: {bits: null}          # null: not quantized (A16)
    modules: {vision_tower: true, projector: true, language_model: true, lm_head: false}
    calibration: {samples: 64, seed: 0, batch_size: 16}
    method_args: {grid: 20}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_types import typed_fields
from ..errors import QvlmError, reject_unknown_keys
from ..yaml_files import named_yaml, parse_yaml
from .outlier_options import FallbackSpec, RotationSpec

RECIPE_VERSION = 1
# Package data, so an installed wheel has them; the repo's calibration/recipes links here.
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
METHODS = ("fp", "rtn", "smoothquant", "awq", "gptq", "qvlm", "qig", "qvit", "qvlm_plus")

# setting -> (weight bits, weight granularity, activation bits or None, deployable, runs on)
SETTINGS: dict[str, tuple[int, str, int | None, bool, str]] = {
    "w8a8": (8, "channel", 8, True, "TensorRT INT8 QDQ; ONNX Runtime QDQ"),
    "w4a16": (4, "group", None, True, "TensorRT INT4 weight-only; ONNX Runtime MatMulNBits"),
    "w4a8": (4, "group", 8, True, "ONNX Runtime (exact QDQ)"),
    "w3a16": (3, "group", None, True, "ONNX Runtime (exact QDQ)"),
    "w6a6": (6, "channel", 6, False, "simulated (fake-quant) only"),
    "w4a4": (4, "channel", 4, False, "simulated (fake-quant) only"),
}
# method_args that change the graph beyond what export writes: the state is simulated only, whatever the setting
SIMULATED_ARGS: dict[tuple[str, str], str] = {
    ("irm_form", "layernorm"): "Q-ViT's LayerNorm IRM adds normalisation nodes on q and k that the exported graph "
                               "does not carry; use irm_form: fold to export",
}
# The settings TensorRT builds; W4A8 and W3A16 are ONNX Runtime formats (DESIGN.md section 4).
TENSORRT_SETTINGS = ("w8a8", "w4a16")


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 8
    granularity: str = "channel"  # tensor | channel | group
    group_size: int = 128
    symmetric: bool = True


@dataclass(frozen=True)
class ActivationSpec:
    bits: int | None = 8  # None: activations stay in floating point
    symmetric: bool = True


@dataclass(frozen=True)
class ModuleSpec:
    vision_tower: bool = True
    projector: bool = True
    language_model: bool = True
    lm_head: bool = False


@dataclass(frozen=True)
class CalibrationSpec:
    samples: int = 64
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class QuantRecipe:
    method: str
    setting: str
    weights: WeightSpec
    activations: ActivationSpec
    modules: ModuleSpec = field(default_factory=ModuleSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    method_args: dict[str, Any] = field(default_factory=dict)
    version: int = RECIPE_VERSION
    rotation: RotationSpec | None = None  # outlier options (quant/outlier_options.py); None: off
    fallback: FallbackSpec | None = None

    @property
    def simulated_by(self) -> str | None:
        """Why ``method_args`` make this recipe simulated only (None: they do not)."""
        return next((why for (key, value), why in SIMULATED_ARGS.items() if self.method_args.get(key) == value), None)

    @property
    def deployable(self) -> bool:
        return SETTINGS[self.setting][3] and self.simulated_by is None

    @property
    def runs_on(self) -> str:
        why = self.simulated_by
        return SETTINGS[self.setting][4] if why is None else f"simulated (fake-quant) only: {why}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("rotation", "fallback"):  # absent when off: recipes without them serialise as before
            if out[key] is None:
                del out[key]
        return out

    def with_method_args(self, **overrides: Any) -> QuantRecipe:
        return dataclasses.replace(self, method_args={**self.method_args, **overrides})


def _section(cls, raw: Any, where: str, defaults: dict[str, Any] | None = None):
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise QvlmError(f"{where}: must be a mapping, got {type(raw).__name__}")
    reject_unknown_keys(raw, cls, where)
    return cls(**typed_fields(cls, {**(defaults or {}), **raw}, where))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> QuantRecipe:
    """Validate a recipe mapping and fill the setting's defaults."""
    if not isinstance(raw, dict):
        raise QvlmError(f"{source}: a recipe must be a YAML mapping with 'method' and 'setting'")
    allowed = {"method", "setting", "weights", "activations", "modules", "calibration", "method_args", "version",
               "rotation", "fallback"}
    reject_unknown_keys(raw, allowed, source)
    method, setting = raw.get("method"), str(raw.get("setting", "")).lower()
    if method not in METHODS:
        raise QvlmError(f"{source}: method must be one of {list(METHODS)}, got {method!r}")
    if setting not in SETTINGS:
        raise QvlmError(f"{source}: setting must be one of {list(SETTINGS)}, got {raw.get('setting')!r}")
    wbits, wgran, abits, _, _ = SETTINGS[setting]
    weights = _section(WeightSpec, raw.get("weights"), f"{source}: weights", {"bits": wbits, "granularity": wgran})
    acts = _section(ActivationSpec, raw.get("activations"), f"{source}: activations", {"bits": abits})
    if not 2 <= weights.bits <= 8:
        raise QvlmError(f"{source}: weights.bits must be in 2..8, got {weights.bits}")
    if weights.granularity not in ("tensor", "channel", "group"):
        raise QvlmError(f"{source}: weights.granularity must be tensor, channel or group, got {weights.granularity!r}")
    if weights.group_size < 2:
        raise QvlmError(f"{source}: weights.group_size must be at least 2, got {weights.group_size}")
    if acts.bits is not None and not 2 <= acts.bits <= 8:
        raise QvlmError(f"{source}: activations.bits must be null or in 2..8, got {acts.bits}")
    method_args = raw.get("method_args") or {}
    if not isinstance(method_args, dict):
        raise QvlmError(f"{source}: method_args must be a mapping")
    return QuantRecipe(
        method=method, setting=setting, weights=weights, activations=acts,
        modules=_section(ModuleSpec, raw.get("modules"), f"{source}: modules"),
        calibration=_section(CalibrationSpec, raw.get("calibration"), f"{source}: calibration"),
        method_args=dict(method_args), **_outlier_sections(raw, source, acts.bits),
    )


def _outlier_sections(raw: dict[str, Any], source: str, act_bits: int | None) -> dict[str, Any]:
    out = {}
    for key, cls in (("rotation", RotationSpec), ("fallback", FallbackSpec)):
        if raw.get(key) is not None:
            out[key] = _section(cls, raw[key], f"{source}: {key}")
            out[key].check(f"{source}: {key}")
    if "fallback" in out and act_bits is None:
        raise QvlmError(f"{source}: fallback keeps some Linear inputs in floating point, but this setting quantizes "
                        "no activations; remove the fallback section")
    return out


def load_recipe(spec: str | Path) -> QuantRecipe:
    """A recipe from a YAML path or a built-in name such as ``rtn-w8a8``."""
    path = named_yaml(spec, RECIPES_DIR, "recipe")
    return recipe_from_dict(parse_yaml(path.read_text(), str(path)), source=str(path))
