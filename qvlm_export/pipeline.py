"""``qvlm-export run``: the whole toolchain in one call, each stage through its own Python API.

model + calibration set
  -> quantize   one quant state per setting (Q-VLM by default)            out/quant/<setting>/
  -> export     the FP reference bundle and one bundle per setting         out/bundles/{fp,<setting>}/
  -> check-trt  the static TensorRT Q/DQ rules on every quantized bundle   out/check-trt/<setting>.json
  -> build      TensorRT engines when tensorrt and a GPU are present       out/engines/<setting>/
  -> validate   Polygraphy parity + task parity against the FP bundle      out/report/
Stages write their own artifact directories (atomically, with manifests); this module only
sequences them, times them and records what ran in ``out/run.json`` and ``out/manifest.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QvlmError
from .manifest import atomic_write_text, build_manifest, check_output_dir, write_manifest
from .pipeline_config import RunConfig
from .quant.recipe import RECIPES_DIR, SETTINGS, TENSORRT_SETTINGS, QuantRecipe, recipe_from_dict
from .validate.report import ValidationReport

Log = Callable[[str], None]
RUN_KIND = "run"


@dataclass
class RunResult:
    out: Path
    report: ValidationReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    check_trt: dict[str, bool] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # stages whose artifact in --out was already up to date

    @property
    def report_html(self) -> Path:
        return self.out / "report" / "report.html"

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed and all(self.check_trt.values())

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "passed": self.passed, "seconds": self.seconds, "check_trt": self.check_trt,
                "engines": self.engines, "skipped": self.skipped, "reused": self.reused,
                "report": str(self.report_html) if self.report is not None else None}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_recipe(method: str, setting: str, overrides: dict[str, Any]) -> QuantRecipe:
    """The built-in ``<method>-<setting>`` recipe (or a bare one) with the run config's overrides merged in."""
    import yaml

    path = RECIPES_DIR / f"{method}-{setting}.yaml"
    base = yaml.safe_load(path.read_text()) if path.is_file() else {"method": method, "setting": setting}
    return recipe_from_dict(_deep_merge(base, overrides), source=f"{method}-{setting} recipe + run config")


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built here (None when tensorrt and a GPU are present)."""
    from .engine.environment import detect_environment

    try:
        detect_environment()
    except QvlmError as exc:
        return str(exc)
    return None


class _Timer:
    def __init__(self, result: RunResult, log: Log):
        self.result, self.log = result, log

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"{name} ...")
        start = time.perf_counter()
        value = fn()
        self.result.seconds[name] = round(time.perf_counter() - start, 2)
        self.log(f"{name}: done in {self.result.seconds[name]:.1f} s")
        return value

    def reuse(self, name: str, artifact: Path) -> Path:
        self.log(f"{name}: up to date (skipped)")
        self.result.reused.append(name)
        return artifact


def preflight(config: RunConfig) -> dict[str, QuantRecipe]:
    """Every stage's options checked before any work starts: each setting's recipe and its method_args
    (the method's own config), the build profile, the thresholds file. Returns the recipes by setting."""
    from .search.registry import build_method
    from .validate.thresholds import load_thresholds

    q = config.quantize
    recipes = {}
    for setting in q.settings:
        recipe = resolve_recipe(q.method, setting, q.recipe)
        if not recipe.deployable:
            raise QvlmError(f"setting {setting!r} is simulated only (no deployable kernel); run cannot export it: "
                            "use 'qvlm-export quantize' and 'eval --quant' for simulated settings")
        if recipe.method != "fp":
            build_method(recipe)  # refuses unknown or mistyped method_args in one line
        recipes[setting] = recipe
    if config.build.engines != "off":
        from .engine.profiles import load_profile

        load_profile(config.build.profile)
    config.export_config  # noqa: B018  (a RunConfig built in Python skipped run_config_from_dict's check)
    load_thresholds(config.validate.thresholds)
    return recipes


def _quantize_all(config: RunConfig, recipes: dict[str, QuantRecipe], out: Path, stage: _Timer,
                  progress: bool, log: Log) -> dict[str, Path]:
    from .pipeline_resume import quant_state_current
    from .quant import distributed
    from .search.api import quantize, resolve_device

    q = config.quantize
    states = {}
    if distributed.launched():  # torchrun: the other ranks follow rank 0's decisions (quantize_share)
        distributed.setup(resolve_device(q.device))
    for setting, recipe in recipes.items():
        name, target = f"quantize {q.method} {setting}", out / "quant" / setting
        if distributed.broadcast(quant_state_current(config.model, recipe, q.calib, q.device, target)):
            states[setting] = stage.reuse(name, target)
            continue
        checkpoint = Path(q.checkpoint_dir) / setting if q.checkpoint_dir else None
        block_log = None if progress else (lambda line, n=name: log(f"{n}: {line}"))
        states[setting] = stage(name, lambda r=recipe, t=target, c=checkpoint, b=block_log: quantize(
            config.model, r, calib=q.calib, out=t, device=q.device, progress=progress, checkpoint_dir=c, log=b))
    return states


def quantize_share(config: RunConfig, progress: bool = False) -> None:
    """A torchrun rank other than 0 in ``run``: its share of every quantize stage rank 0 redoes
    (the same quantize() calls; rank 0 writes the states and alone goes on to export and validate)."""
    from .quant import distributed
    from .search.api import quantize, resolve_device

    q = config.quantize
    recipes = preflight(config)  # the same refusals as rank 0, before any collective
    distributed.setup(resolve_device(q.device))
    for setting, recipe in recipes.items():
        if distributed.broadcast(None):  # rank 0 reuses this setting's state
            continue
        target = Path(config.out) / "quant" / setting
        checkpoint = Path(q.checkpoint_dir) / setting if q.checkpoint_dir else None
        quantize(config.model, recipe, calib=q.calib, out=target, device=q.device, progress=False,
                 checkpoint_dir=checkpoint)


def _export_one(name: str, config: RunConfig, state: Path | None, target: Path, export_config, stage: _Timer) -> Path:
    """One bundle, or the one already in --out when it was exported from the same inputs and config."""
    from .export.api import export_bundle
    from .pipeline_resume import bundle_current

    if bundle_current(config.model, state, export_config, target):
        return stage.reuse(name, target)
    return stage(name, lambda: export_bundle(config.model, state, target, config=export_config))


def _export_all(config: RunConfig, out: Path, states: dict[str, Path], stage: _Timer) -> dict[str, Path]:
    export_config = config.export_config
    bundles = {"fp": _export_one("export fp", config, None, out / "bundles" / "fp", export_config, stage)}
    for setting, state in states.items():
        bundles[setting] = _export_one(f"export {setting}", config, state, out / "bundles" / setting, export_config,
                                       stage)
    return bundles


def _check_trt(bundles: dict[str, Path], out: Path, result: RunResult, stage: _Timer, log: Log) -> None:
    from .engine.check_trt import check_path

    for setting, bundle in bundles.items():
        if setting == "fp":
            continue
        if setting not in TENSORRT_SETTINGS:  # its rules would only say so; it is not gated on them
            result.skipped.append(f"check-trt {setting}: skipped: {_not_trt(setting)}")
            continue
        report = stage(f"check-trt {setting}", lambda b=bundle: check_path(b))
        report.write_json(out / "check-trt" / f"{setting}.json")
        result.check_trt[setting] = report.ok
        if not report.ok:
            log(f"check-trt {setting}: {len(report.violations)} violations of {report.rules_broken()} "
                f"(see {out / 'check-trt' / f'{setting}.json'})")


def _not_trt(setting: str) -> str:
    return f"{setting} is not a TensorRT format; it runs on {SETTINGS[setting].runs_on}"


def _build_engines(config: RunConfig, out: Path, states: dict[str, Path], result: RunResult, stage: _Timer) -> None:
    """Engines from fp16 exports of each quantized bundle, or a 'skipped: ...' line saying why not."""
    if config.build.engines == "off":
        result.skipped.append("tensorrt engines: skipped: build.engines is off")
        return
    reason = tensorrt_unavailable()
    if reason is not None:
        if config.build.engines == "required":
            raise QvlmError(f"build.engines is 'required' but {reason}")
        result.skipped.append(f"tensorrt engines: skipped: {reason}")
        return
    from .engine.builder import build_engines
    from .engine.profiles import load_profile

    profile = load_profile(config.build.profile)
    export_config = dataclasses.replace(config.export_config, dtype=profile.graph_dtype)
    cache = Path(config.build.timing_cache) if config.build.timing_cache else None
    for setting, state in states.items():
        if setting not in TENSORRT_SETTINGS:
            result.skipped.append(f"tensorrt engines for {setting}: skipped: {_not_trt(setting)}")
            continue
        bundle = _export_one(f"export {setting} {profile.graph_dtype}", config, state,
                             out / "bundles" / f"{setting}-{profile.graph_dtype}", export_config, stage)
        result.engines[setting] = str(stage(f"build {setting} ({profile.name})", lambda s=setting, b=bundle: build_engines(
            b, profile, out / "engines" / s, timing_cache=cache, skip_check=config.build.skip_check)))


def _validate(config: RunConfig, out: Path, bundles: dict[str, Path], states: dict[str, Path], result: RunResult,
              stage: _Timer, log: Log, progress: bool) -> ValidationReport:
    from .validate.api import CandidateSpec, validate

    def skipped(setting: str) -> tuple[str, ...]:
        return tuple(line for line in result.skipped if line.startswith(
            ("tensorrt engines:", f"tensorrt engines for {setting}:", f"check-trt {setting}:")))

    candidates = [CandidateSpec(bundle=bundles[s], quant=states[s], name=s, skipped=skipped(s),
                                engines=Path(result.engines[s]) if s in result.engines else None)
                  for s in config.quantize.settings]
    return stage("validate", lambda: validate(bundles["fp"], candidates, out / "report", config.validate,
                                              log=log, progress=progress))


def run_pipeline(config: RunConfig, log: Log | None = None, progress: bool = True) -> RunResult:
    """Run every stage into ``config.out``; the result says what ran, how long, and the verdict.

    Holds ``out/.lock`` for the whole run (a second run into ``out`` fails in one line),
    removes temporaries a killed run left, and reuses every quant state and bundle already
    in ``out`` that was made from the same inputs and config: a re-run redoes only what changed.
    """
    from .pipeline_resume import remove_stale_temps, run_lock

    log = log or (lambda _: None)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise QvlmError(f"--out {str(out)!r} is a file; choose a directory")
    check_output_dir(out)
    recipes = preflight(config)
    with run_lock(out):
        for path in remove_stale_temps(out):
            log(f"removed {path} (left by an interrupted run)")
        return _run_stages(config, recipes, out, log, progress)


def _run_stages(config: RunConfig, recipes: dict[str, QuantRecipe], out: Path, log: Log, progress: bool) -> RunResult:
    result = RunResult(out=out)
    stage = _Timer(result, log)
    start = time.perf_counter()
    states = _quantize_all(config, recipes, out, stage, progress, log)
    bundles = _export_all(config, out, states, stage)
    _check_trt(bundles, out, result, stage, log)
    _build_engines(config, out, states, result, stage)
    result.report = _validate(config, out, bundles, states, result, stage, log, progress)
    result.seconds["total"] = round(time.perf_counter() - start, 2)
    atomic_write_text(out / "run.json", json.dumps(result.to_json(), indent=2) + "\n")
    write_manifest(out, run_manifest(config, out, states, bundles, result))
    return result


def run_manifest(config: RunConfig, out: Path, states: dict[str, Path], bundles: dict[str, Path],
                 result: RunResult) -> dict[str, Any]:
    """The run directory's manifest: each stage artifact by the hash of its own manifest (which hashes its files)."""
    from .load.model import resolve_model_path
    from .manifest import digest, hash_tree, sha256_file

    artifacts = {**{f"quant/{s}": p for s, p in states.items()}, **{f"bundles/{s}": p for s, p in bundles.items()},
                 **{f"engines/{s}": Path(p) for s, p in result.engines.items()}, "report": out / "report"}
    manifest = build_manifest(RUN_KIND, config.to_dict(), {"model": digest(hash_tree(resolve_model_path(config.model)))},
                              out / "report", extra={"passed": result.passed, "seconds": result.seconds,
                                                     "skipped": result.skipped, "check_trt": result.check_trt})
    # Hash artifact manifests, not every weight file again: each manifest already hashes its own files.
    manifest["outputs"] = {f"{name}/manifest.json": sha256_file(Path(p) / "manifest.json")
                           for name, p in artifacts.items()}
    manifest["outputs"]["run.json"] = sha256_file(out / "run.json")
    return manifest
