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



@dataclass(frozen=True)
class SettingSpec:
    """What a setting name means: the recipe's defaults and where its exports run."""

    weight_bits: int
    weight_granularity: str  # channel | group
    act_bits: int | None  # None: activations stay in floating point
    deployable: bool  # False: simulated (fake-quant) only
    runs_on: str

    # Rows were 5-tuples; unpacking and indexing still read them in that order (tests/test_recipes.py and
    # tests/test_validate_stats.py do; the package reads the named fields).
    def __iter__(self):
        return iter(dataclasses.astuple(self))

    def __getitem__(self, index: int):
        return dataclasses.astuple(self)[index]


SETTINGS: dict[str, SettingSpec] = {
    "w8a8": SettingSpec(8, "channel", 8, True, "TensorRT INT8 QDQ; ONNX Runtime QDQ"),
    "w4a16": SettingSpec(4, "group", None, True, "TensorRT INT4 weight-only; ONNX Runtime MatMulNBits"),
    "w4a8": SettingSpec(4, "group", 8, True, "ONNX Runtime (exact QDQ)"),
    "w3a16": SettingSpec(3, "group", None, True, "ONNX Runtime (exact QDQ)"),
    "w6a6": SettingSpec(6, "channel", 6, False, "simulated (fake-quant) only"),
    "w4a4": SettingSpec(4, "channel", 4, False, "simulated (fake-quant) only"),
}
# method_args that change the graph beyond what export writes: the state is simulated only, whatever the setting
SIMULATED_ARGS: dict[tuple[str, str], str] = {
    ("irm_form", "layernorm"): "Q-ViT's LayerNorm IRM adds normalisation nodes on q and k that the exported graph "
                               "does not carry; use irm_form: fold to export",
}
# method_args that change what is shown, never the result: split off into QuantRecipe.display on load
DISPLAY_ARGS = ("progress",)
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
class Display:
    """How a search reports itself. Not part of the recipe's identity: toggling it must not redo a search."""

    progress: bool = True  # a progress bar per block (and per search step where the method has one)


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
    # Kept out of ==, to_dict (recipe.yaml, the manifest's identity, checkpoint fingerprints) on purpose.
    display: Display = field(default_factory=Display, compare=False, repr=False)

    @property
    def simulated_by(self) -> str | None:
        """Why ``method_args`` make this recipe simulated only (None: they do not)."""
        return next((why for (key, value), why in SIMULATED_ARGS.items() if self.method_args.get(key) == value), None)

    @property
    def deployable(self) -> bool:
        return SETTINGS[self.setting].deployable and self.simulated_by is None

    @property
    def runs_on(self) -> str:
        why = self.simulated_by
        return SETTINGS[self.setting].runs_on if why is None else f"simulated (fake-quant) only: {why}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["display"]
        for key in ("rotation", "fallback"):  # absent when off: recipes without them serialise as before
            if out[key] is None:
                del out[key]
        return out

    def with_method_args(self, **overrides: Any) -> QuantRecipe:
        """Overrides merged into ``method_args``; display options among them go to ``display``, as on load."""
        display = {key: overrides.pop(key) for key in DISPLAY_ARGS if key in overrides}
        out = dataclasses.replace(self, method_args={**self.method_args, **overrides})
        return out.with_display(**display) if display else out

    def with_display(self, **options: Any) -> QuantRecipe:
        return dataclasses.replace(self, display=dataclasses.replace(self.display, **options))


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
    version = raw.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION or isinstance(version, bool):
        raise QvlmError(f"{source}: recipe version {version!r} is not supported (this qvlm-export reads version "
                        f"{RECIPE_VERSION}); write the recipe for version {RECIPE_VERSION} or upgrade qvlm-export")
    method, setting = raw.get("method"), str(raw.get("setting", "")).lower()
    if method not in METHODS:
        raise QvlmError(f"{source}: method must be one of {list(METHODS)}, got {method!r}")
    if setting not in SETTINGS:
        raise QvlmError(f"{source}: setting must be one of {list(SETTINGS)}, got {raw.get('setting')!r}")
    spec = SETTINGS[setting]
    weights = _section(WeightSpec, raw.get("weights"), f"{source}: weights",
                       {"bits": spec.weight_bits, "granularity": spec.weight_granularity})
    acts = _section(ActivationSpec, raw.get("activations"), f"{source}: activations", {"bits": spec.act_bits})
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
    method_args = dict(method_args)
    display = {key: method_args.pop(key) for key in DISPLAY_ARGS if key in method_args}
    return QuantRecipe(
        method=method, setting=setting, weights=weights, activations=acts,
        modules=_section(ModuleSpec, raw.get("modules"), f"{source}: modules"),
        calibration=_section(CalibrationSpec, raw.get("calibration"), f"{source}: calibration"),
        method_args=method_args, **_outlier_sections(raw, source, acts.bits),
        display=Display(**typed_fields(Display, display, f"{source}: method_args")),
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
