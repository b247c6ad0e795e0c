"""Parity thresholds per precision, runner and output, loaded from a YAML file.

The packaged default is ``qvlm_export/configs/thresholds.yaml``; ``--thresholds FILE``
replaces it. Layout::

    version: 1
    precisions:
      w8a8:                         # the candidate's setting row (fp, w8a8, w4a16, ...)
        faithful:                   # ORT with exact QDQ arithmetic, against the FP reference
          default: {cosine: 0.99, sqnr_db: 15}
          outputs:                  # "<graph>/<output>" glob patterns; the first match is merged over default
            "decoder/logits": {sqnr_db: 12}
        fast: {...}                 # ORT fused integer kernels (absent: faithful's bounds)
        tensorrt: {...}             # TensorRT engines (absent: faithful's bounds)
        drift: {...}                # fast against faithful: the kernels' own error (absent: reported only)
        task: {max_accuracy_drop: 0.05, min_identical_answers: 0.8}
    absolute:                       # bounds against FP that hold whatever RTN does (derived bounds keep them)
      default: {max_perplexity_ratio: 1.25, min_next_token_agreement: 0.75, min_identical_answers: 0.8,
                min_cosine: 0.9}
      w8a8: {max_perplexity_ratio: 1.1}   # per-setting overrides, merged over default

Statistics ending in ``_abs`` and ``nonfinite`` are upper bounds; ``cosine`` and
``sqnr_db`` are lower bounds (see :mod:`qvlm_export.validate.stats`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import QvlmError
from ..yaml_files import parse_yaml
from .stats import LOWER_BOUNDED, STAT_NAMES, ErrorStats

THRESHOLDS_VERSION = 1
RUNNERS = ("faithful", "fast", "tensorrt", "drift")
TASK_KEYS = ("max_accuracy_drop", "min_identical_answers")
# Absolute bounds against FP: a candidate far from FP fails even where RTN is as far (derived bounds).
ABSOLUTE_KEYS = ("max_perplexity_ratio", "min_next_token_agreement", "min_identical_answers", "min_cosine")
# Runners whose outputs are compared with FP (drift compares fast with faithful).
AGAINST_FP = ("faithful", "fast", "tensorrt")
# Task-level statistics that are lower bounds (the rest are upper bounds).
TASK_LOWER_BOUNDED = ("identical_answers", "next_token_agreement")
# Runners whose bounds fall back to the faithful section when they have none of their own.
FALLS_BACK_TO_FAITHFUL = ("fast", "tensorrt")


@dataclass(frozen=True)
class Check:
    """One statistic measured against one bound."""

    stat: str
    value: float
    bound: float

    @property
    def lower_bound(self) -> bool:
        return self.stat in LOWER_BOUNDED or self.stat in TASK_LOWER_BOUNDED

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.bound if self.lower_bound else self.value <= self.bound

    def describe(self) -> str:
        op = ">=" if self.lower_bound else "<="
        return f"{self.stat} = {_fmt(self.value)} (threshold {op} {_fmt(self.bound)})"

    def to_json(self) -> dict[str, Any]:
        return {"stat": self.stat, "value": _json_num(self.value), "bound": self.bound,
                "op": ">=" if self.lower_bound else "<=", "passed": self.passed}


def _fmt(v: float) -> str:
    # Six digits: a cosine of 0.99896 must not print as the 0.999 it failed against.
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def _json_num(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


@dataclass(frozen=True)
class Bounds:
    """A {default, outputs} section: bounds per statistic, with per-output overrides."""

    default: dict[str, float] = field(default_factory=dict)
    outputs: tuple[tuple[str, dict[str, float]], ...] = ()

    def for_output(self, key: str) -> dict[str, float]:
        for pattern, bounds in self.outputs:
            if fnmatch.fnmatchcase(key, pattern):
                return {**self.default, **bounds}
        return dict(self.default)


@dataclass(frozen=True)
class ThresholdConfig:
    precisions: dict[str, dict[str, Bounds]]
    task: dict[str, dict[str, float]]
    source: str = "builtin"
    absolute: dict[str, dict[str, float]] = field(default_factory=dict)  # "default" and per-precision overrides

    def bounds(self, precision: str, runner: str, graph: str, output: str) -> dict[str, float]:
        """The bounds that apply to one output of one graph; empty when nothing is gated."""
        if runner not in RUNNERS:
            raise QvlmError(f"unknown runner {runner!r}; thresholds exist for {list(RUNNERS)}")
        sections = self.precisions.get(precision)
        if sections is None:
            raise QvlmError(f"thresholds ({self.source}) have no section for precision {precision!r}; "
                            f"add one or use one of {sorted(self.precisions)}")
        section = sections.get(runner)
        if section is None and runner in FALLS_BACK_TO_FAITHFUL:
            section = sections.get("faithful")
        return section.for_output(f"{graph}/{output}") if section is not None else {}

    def absolute_bounds(self, precision: str) -> dict[str, float]:
        return {**self.absolute.get("default", {}), **self.absolute.get(precision, {})}

    def check(self, precision: str, runner: str, graph: str, output: str, stats: ErrorStats) -> list[Check]:
        bounds = self.bounds(precision, runner, graph, output)
        floor = self.absolute_bounds(precision).get("min_cosine")
        if floor is not None and runner in AGAINST_FP:  # the stricter of the relative and the absolute bound
            bounds["cosine"] = max(bounds.get("cosine", floor), floor)
        return [Check(stat, float(getattr(stats, stat)), float(bound)) for stat, bound in bounds.items()]

    def task_bounds(self, precision: str) -> dict[str, float]:
        bounds = dict(self.task.get(precision, {}))
        floor = self.absolute_bounds(precision).get("min_identical_answers")
        if floor is not None:
            bounds["min_identical_answers"] = max(bounds.get("min_identical_answers", floor), floor)
        return bounds

    def to_json(self) -> dict[str, Any]:
        return {
            "version": THRESHOLDS_VERSION, "source": self.source,
            "precisions": {p: {**{r: {"default": b.default, "outputs": dict(b.outputs)} for r, b in s.items()},
                               **({"task": self.task[p]} if p in self.task else {})}
                           for p, s in self.precisions.items()},
            "absolute": self.absolute,
        }


def _bound_map(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise QvlmError(f"{where}: must be a mapping of statistic to bound, e.g. {{cosine: 0.99}}")
    out = {}
    for stat, value in raw.items():
        if stat not in STAT_NAMES:
            raise QvlmError(f"{where}: unknown statistic {stat!r}; use one of {list(STAT_NAMES)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise QvlmError(f"{where}.{stat}: bound must be a number, got {value!r}")
        out[stat] = float(value)
    return out


def _bounds(raw: Any, where: str) -> Bounds:
    if not isinstance(raw, dict) or set(raw) - {"default", "outputs"}:
        raise QvlmError(f"{where}: must be a mapping with keys 'default' and/or 'outputs'")
    outputs = raw.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise QvlmError(f"{where}.outputs: must map '<graph>/<output>' patterns to bounds")
    return Bounds(default=_bound_map(raw.get("default") or {}, f"{where}.default"),
                  outputs=tuple((str(k), _bound_map(v, f"{where}.outputs[{k!r}]")) for k, v in outputs.items()))


def _numbers(raw: Any, keys: tuple[str, ...], where: str) -> dict[str, float]:
    """A mapping of some of ``keys`` to numbers, or a one-line error naming the bad key."""
    if not isinstance(raw, dict):
        raise QvlmError(f"{where}: must be a mapping with keys {list(keys)}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise QvlmError(f"{where}: unknown key {unknown[0]!r}; use {list(keys)}")
    bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise QvlmError(f"{where}.{bad[0]}: must be a number, got {raw[bad[0]]!r}")
    return {k: float(v) for k, v in raw.items()}


def _task(raw: Any, where: str) -> dict[str, float]:
    return _numbers(raw, TASK_KEYS, where)


def _absolute(raw: Any, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(raw, dict):
        raise QvlmError(f"{where}: must map 'default' or a setting (w8a8, ...) to bounds {list(ABSOLUTE_KEYS)}")
    return {str(key): _numbers(bounds, ABSOLUTE_KEYS, f"{where}.{key}") for key, bounds in raw.items()}


def thresholds_from_dict(raw: Any, source: str = "thresholds") -> ThresholdConfig:
    """Validate a thresholds mapping (see the module docstring)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("precisions"), dict):
        raise QvlmError(f"{source}: expected a mapping with a 'precisions' section")
    if raw.get("version", THRESHOLDS_VERSION) != THRESHOLDS_VERSION:
        raise QvlmError(f"{source}: thresholds version {raw.get('version')} is not supported (expected {THRESHOLDS_VERSION})")
    precisions, task = {}, {}
    for precision, sections in raw["precisions"].items():
        where = f"{source}: precisions.{precision}"
        if not isinstance(sections, dict):
            raise QvlmError(f"{where}: must be a mapping of runner ({', '.join(RUNNERS)}) to bounds")
        unknown = sorted(set(sections) - set(RUNNERS) - {"task"})
        if unknown:
            raise QvlmError(f"{where}: unknown key {unknown[0]!r}; use {list(RUNNERS) + ['task']}")
        precisions[str(precision)] = {r: _bounds(v, f"{where}.{r}") for r, v in sections.items() if r != "task"}
        if "task" in sections:
            task[str(precision)] = _task(sections["task"], f"{where}.task")
    absolute = _absolute(raw["absolute"], f"{source}: absolute") if "absolute" in raw else {}
    return ThresholdConfig(precisions=precisions, task=task, source=source, absolute=absolute)


def load_thresholds(path: str | Path | None = None) -> ThresholdConfig:
    """The thresholds in ``path``, or the packaged defaults."""
    if path is None:
        text = resources.files("qvlm_export").joinpath("configs/thresholds.yaml").read_text()
        source = "builtin thresholds.yaml"
    else:
        p = Path(path)
        if not p.is_file():
            what = "is not a regular file" if p.exists() else "does not exist"
            raise QvlmError(f"thresholds file {str(p)!r} {what}; pass a YAML file or omit --thresholds")
        text, source = p.read_text(), str(p)
    return thresholds_from_dict(parse_yaml(text, source), source=source)
