"""Every option of a stage's config is reachable from its command's flags (the CLI cannot drift from the API)."""

from __future__ import annotations

import dataclasses

import pytest
import typer

import qvlm_export.cli as cli
from qvlm_export.export.config import ExportConfig
from qvlm_export.validate.config import ValidateConfig

# Flag names that differ from the field they set.
RENAMED = {"eval_data": "data"}
# Tracing internals (example shapes of the dynamo trace, the attention kernel TensorRT needs): run config only.
EXPORT_INTERNALS = {"example_batch", "example_seq", "example_past", "attn_implementation"}


def _flags(command: str) -> set[str]:
    cli._register()
    return {p.name for p in typer.main.get_command(cli.app).commands[command].params}


@pytest.mark.parametrize(("command", "config", "internal"), [
    ("validate", ValidateConfig, set()),
    ("export", ExportConfig, EXPORT_INTERNALS),
])
def test_every_config_field_has_a_flag(command, config, internal):
    fields = {f.name for f in dataclasses.fields(config)} - {"version"} - internal
    missing = {RENAMED.get(f, f) for f in fields} - _flags(command)
    assert missing == set()


def test_internal_export_fields_are_reachable_through_the_run_config():
    from qvlm_export.pipeline_config import run_config_from_dict

    config = run_config_from_dict({"export": {name: 3 for name in ("example_batch", "example_seq", "example_past")}
                                   | {"attn_implementation": "sdpa", "ragged_int4": "int8"}})
    assert config.export_config.example_past == 3 and config.export_config.ragged_int4 == "int8"


# --- quantize, build, eval, run: each stage's frozen config and API function, reached from the CLI ---

def _leaves(cls, prefix: str = "") -> set[str]:
    """Dotted names of a config dataclass's leaf fields (nested dataclass sections expanded)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        kind = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        out |= _leaves(kind, f"{prefix}{f.name}.") if kind is not None else {prefix + f.name}
    return out


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _nest(flat: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# A non-default value for every field a YAML file given to --recipe can set (quantize's config).
RECIPE_VALUES = {
    "method": "awq", "setting": "w4a8", "method_args": {"grid": 5},
    "weights.bits": 3, "weights.granularity": "group", "weights.group_size": 32, "weights.symmetric": False,
    "activations.bits": 6, "activations.symmetric": False,
    "modules.vision_tower": False, "modules.projector": False, "modules.language_model": False, "modules.lm_head": True,
    "calibration.samples": 5, "calibration.seed": 3, "calibration.batch_size": 2,
    "rotation.kind": "hadamard", "rotation.seed": 7, "fallback.max_layers": 2, "fallback.criterion": "range",
}
RECIPE_NOT_IN_YAML = {"version": "the format version, checked on load (tests/test_method_registry.py)",
                      "display.progress": "a display option: quantize --progress/--no-progress"}


def test_quantize_recipe_file_reaches_every_recipe_field(tmp_path):
    import yaml

    from qvlm_export.quant.recipe import QuantRecipe, load_recipe

    assert set(RECIPE_VALUES) | set(RECIPE_NOT_IN_YAML) == _leaves(QuantRecipe)
    path = tmp_path / "every-field.yaml"
    path.write_text(yaml.safe_dump(_nest(RECIPE_VALUES)))
    recipe = load_recipe(str(path))  # what quantize(recipe=<the --recipe string>) reads
    assert {k: _get(recipe, k) for k in RECIPE_VALUES} == RECIPE_VALUES
    assert "progress" in _flags("quantize")


# Every parameter of a command's API function has a flag, or a reason it has none.
API_REASONS = {
    "quantize": {"log": "the command prints one line per block itself under --no-progress"},
    "build": {"compiler": "a test seam (TensorRT by default)", "environment": "detected (TensorRT version, GPU)"},
    "eval": {"int4_accuracy": "flag --int4-accuracy-level (the validate config's name)"},
    "run": {"config": "--config / --set / the RUN_OPTIONS flags", "log": "the command's console"},
}


def _api(command: str):
    from qvlm_export.engine.builder import build_engines
    from qvlm_export.evaluate.backends import make_answerer
    from qvlm_export.pipeline import run_pipeline
    from qvlm_export.search.api import quantize

    return {"quantize": quantize, "build": build_engines, "eval": make_answerer, "run": run_pipeline}[command]


@pytest.mark.parametrize("command", sorted(API_REASONS))
def test_every_api_parameter_has_a_flag(command):
    import inspect

    params = set(inspect.signature(_api(command)).parameters)
    assert set(API_REASONS[command]) <= params  # no stale reasons
    assert params - set(API_REASONS[command]) - _flags(command) == set()


# A non-default value for every field a build profile YAML (build --profile FILE) can set.
PROFILE_VALUES = {
    "name": "every-field", "max_batch": 3, "opt_batch": 2, "max_prompt": 100, "opt_prompt": 40, "max_context": 300,
    "opt_context": 120, "workspace_mib": 512, "builder_optimization_level": 4, "timing_cache": "t.cache",
    "hardware_compatibility": "ampere_plus", "version_compatible": True, "graph_dtype": "fp32",
    "size_from_bundle": True, "text_tokens": 64, "new_tokens": 32, "decoder_logits": "all",
}


def test_build_profile_file_and_flags_reach_every_build_field(tmp_path):
    import yaml

    from qvlm_export.engine.profiles import BuildProfile, load_profile
    from qvlm_export.pipeline_config import BuildOptions

    assert set(PROFILE_VALUES) | {"version"} == _leaves(BuildProfile)
    path = tmp_path / "every-field.yaml"
    path.write_text(yaml.safe_dump(PROFILE_VALUES))
    profile = load_profile(str(path))
    assert {k: getattr(profile, k) for k in PROFILE_VALUES} == PROFILE_VALUES
    # run's build section: the build command's flags, except whether run builds at all
    assert _leaves(BuildOptions) - {"engines"} <= _flags("build")


def test_eval_text_options_reach_the_text_spec():
    from qvlm_export.evaluate.text import TextSpec

    flags = _flags("eval")
    assert {f"text_{name}" for name in _leaves(TextSpec)} <= flags
    defaults = {p.name: p.default for p in typer.main.get_command(cli.app).commands["eval"].params}
    assert (defaults["text_tokens"], defaults["text_window"]) == (TextSpec().tokens, TextSpec().window)


# A non-default value for every leaf of the run config, given with --set (RUN_OPTIONS flags map onto these).
RUN_VALUES = {
    "model": "m", "out": "o",
    "quantize.method": "rtn", "quantize.settings": ("w4a16",), "quantize.calib": "builtin:calib:8",
    "quantize.device": "cpu", "quantize.recipe": {"calibration": {"samples": 4}}, "quantize.checkpoint_dir": "ck",
    "build.profile": "server", "build.engines": "off", "build.timing_cache": "t.cache", "build.skip_check": True,
    "validate.calib": "builtin:calib:4", "validate.calib_samples": 9, "validate.batch_size": 5,
    "validate.decode_steps": 2, "validate.eval_data": "builtin:eval:4", "validate.eval_samples": 7,
    "validate.runners": ("faithful",), "validate.task": False, "validate.layer_errors": False,
    "validate.thresholds": "t.yaml", "validate.threads": 2, "validate.int4_accuracy_level": 1, "validate.text": False,
    "validate.text_tokens": 1024, "validate.text_window": 256, "validate.speed_steps": 4,
    "export.dtype": "fp16", "export.opset": 22, "export.example_batch": 3, "export.example_seq": 5,
    "export.example_past": 6, "export.attn_implementation": "sdpa", "export.external_data_bytes": 1000,
    "export.ragged_int4": "int8",
}


def test_run_set_reaches_every_run_config_field():
    import yaml

    from qvlm_export.export.config import ExportConfig
    from qvlm_export.pipeline_config import RunConfig, load_run_config

    versions = {"version", "validate.version", "export.version"}  # format versions, checked on load
    assert set(RUN_VALUES) | versions == (_leaves(RunConfig) - {"export"}) | {f"export.{f}" for f in _leaves(ExportConfig)}
    sets = [f"{k}={yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True).strip()}"
            .removesuffix("\n...") for k, v in RUN_VALUES.items()]
    config = load_run_config(None, sets)
    got = {k: (_get(config.export_config, k[len("export."):]) if k.startswith("export.") else _get(config, k))
           for k in RUN_VALUES}
    assert got == RUN_VALUES


def test_every_run_option_flag_sets_its_config_key():
    from qvlm_export.cli.run_cmd import RUN_OPTIONS, cli_overrides
    from qvlm_export.pipeline_config import load_run_config

    flags = _flags("run")
    for name, (key, _) in RUN_OPTIONS.items():
        assert name in flags
        value = {"settings": "w4a16", "device": "cpu"}.get(name, RUN_VALUES.get(key, 4))
        config = load_run_config(None, cli_overrides({name: value}))
        expected = ("w4a16",) if name == "settings" else value
        assert _get(config, key) == expected, name
