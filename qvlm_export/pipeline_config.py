"""Configuration of ``qvlm-export run``: one frozen dataclass per stage, loadable from YAML.

A run config file mirrors the stages (every key optional)::

    model: null                      # HF LLaVA-family dir; null: the embedded model
    out: qvlm-run                    # run directory (quant/, bundles/, engines/, report/)
    quantize:
      method: qvlm
      settings: [w8a8, w4a16]
      calib: builtin:calib
      device: null                   # cuda | cpu; null: cuda when available
      checkpoint_dir: null           # resumable searches (one sub-directory per setting)
      recipe:                        # merged into every setting's recipe (see quant/recipe.py)
        calibration: {samples: 32}
        method_args: {iterations: 80}
    export: {opset: 21}              # keyword options of qvlm_export.export's API
    build: {profile: edge, engines: auto, timing_cache: null, skip_check: false}
    validate: {calib_samples: 8, eval_samples: 100, runners: [faithful, fast]}

``--set section.key=value`` on the command line overrides any key (values parse as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_types import typed_fields
from .errors import QvlmError, reject_unknown_keys
from .export.config import ExportConfig, export_config_from_dict
from .quant.recipe import SETTINGS, TENSORRT_SETTINGS
from .validate.config import ValidateConfig, validate_config_from_dict
from .yaml_files import parse_yaml

RUN_CONFIG_VERSION = 1
ENGINE_MODES = ("auto", "off", "required")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "qvlm"
    settings: tuple[str, ...] = ("w8a8", "w4a16")
    calib: str = "builtin:calib"
    device: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: str | None = None  # resumable searches: one sub-directory per setting


@dataclass(frozen=True)
class BuildOptions:
    profile: str = "edge"
    engines: str = "auto"  # auto: build when tensorrt and a GPU are present; off; required: fail without them
    timing_cache: str | None = None
    skip_check: bool = False  # build even when check-trt finds violations


@dataclass(frozen=True)
class RunConfig:
    model: str | None = None
    out: str = "qvlm-run"
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    export: dict[str, Any] = field(default_factory=dict)  # the options given, checked on load: see export_config
    build: BuildOptions = field(default_factory=BuildOptions)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    version: int = RUN_CONFIG_VERSION

    @property
    def export_config(self) -> ExportConfig:
        """The export stage's typed config (``export`` was checked against it when this config was made)."""
        return export_config_from_dict(self.export, "run config: export")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quantize"]["settings"] = list(self.quantize.settings)
        d["validate"] = self.validate.to_dict()
        return d


def _section(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise QvlmError(f"{where}: must be a mapping")
    reject_unknown_keys(raw, cls, where)
    return cls(**typed_fields(cls, raw, where))


def run_config_from_dict(raw: dict[str, Any] | None, source: str = "run config") -> RunConfig:
    """Validate a run-config mapping (see the module docstring)."""
    if raw is not None and not isinstance(raw, dict):
        raise QvlmError(f"{source}: a run config must be a mapping")
    raw = dict(raw or {})
    reject_unknown_keys(raw, RunConfig, source, hidden=frozenset({"version"}))
    raw = typed_fields(RunConfig, raw, source)  # model, out, version; sections are checked below
    quantize = raw.get("quantize") or {}
    if not isinstance(quantize, dict):
        raise QvlmError(f"{source}: quantize must be a mapping")
    quantize = dict(quantize)
    if "settings" in quantize:
        s = quantize["settings"]
        if not isinstance(s, str | list | tuple):
            raise QvlmError(f"{source}: quantize.settings must be a list like [w8a8, w4a16], got {s!r}")
        quantize["settings"] = tuple(str(x).lower() for x in (s.split(",") if isinstance(s, str) else s))
    q = _section(QuantizeOptions, quantize, f"{source}: quantize")
    bad = [s for s in q.settings if s not in SETTINGS]
    if bad or not q.settings:
        raise QvlmError(f"{source}: quantize.settings {list(q.settings)} names an unknown setting; list settings from "
                        f"{list(SETTINGS)}")
    simulated = [s for s in q.settings if not SETTINGS[s].deployable]
    if simulated:
        raise QvlmError(f"{source}: {simulated[0]} is simulated only and cannot be exported; choose deployable "
                        f"settings from {[s for s, spec in SETTINGS.items() if spec.deployable]}")
    build = _section(BuildOptions, raw.get("build"), f"{source}: build")
    if build.engines not in ENGINE_MODES:
        raise QvlmError(f"{source}: build.engines is {build.engines!r}; use one of {list(ENGINE_MODES)}")
    not_trt = [s for s in q.settings if s not in TENSORRT_SETTINGS]
    if build.engines == "required" and not_trt:
        raise QvlmError(f"{source}: build.engines is 'required' but {not_trt[0]} is not a TensorRT format (it runs on "
                        f"{SETTINGS[not_trt[0]].runs_on}); use engines auto or drop it from quantize.settings")
    export = raw.get("export") or {}
    if not isinstance(export, dict):
        raise QvlmError(f"{source}: export must be a mapping of export options")
    export_config_from_dict(export, f"{source}: export")  # a bad key or value fails here, not after quantizing
    return RunConfig(model=raw.get("model"), out=str(raw.get("out", "qvlm-run")), quantize=q, export=dict(export),
                     build=build, validate=validate_config_from_dict(raw.get("validate"), f"{source}: validate"))


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``["quantize.recipe.method_args.iterations=40", ...]`` applied to a copy of ``raw``."""
    import yaml

    out = copy.deepcopy(raw)
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise QvlmError(f"--set {item!r} is not an assignment; pass section.key=value, e.g. validate.eval_samples=50")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise QvlmError(f"--set {item!r}: the value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise QvlmError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "run config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise QvlmError(f"run config {str(p)!r} does not exist; pass a YAML file (see 'qvlm-export run --help')")
        raw = parse_yaml(p.read_text(), str(p)) or {}
        if not isinstance(raw, dict):
            raise QvlmError(f"{p}: a run config must be a YAML mapping")
        source = str(p)
    return run_config_from_dict(apply_overrides(raw, overrides or []), source=source)
