"""Fuzzed configs and data manifests: every parser returns a value or raises a one-line QvlmError.

Hypothesis mutates one key of a valid recipe / run config / thresholds / profile / export or
validate config (any YAML value at any depth, or an unknown key), feeds random YAML text through
the file loaders, and random lines through the JSONL data-manifest reader. Derandomized (a fixed
example sequence), so CI sees the same cases every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qvlm_export.cli import main
from qvlm_export.data.manifest import load_dataset, read_manifest
from qvlm_export.engine.profiles import load_profile, profile_from_dict
from qvlm_export.errors import QvlmError
from qvlm_export.export.config import ExportConfig, export_config_from_dict
from qvlm_export.pipeline_config import RunConfig, load_run_config, run_config_from_dict
from qvlm_export.quant.recipe import load_recipe, recipe_from_dict
from qvlm_export.search.qvlm.config import QVLMConfig, config_from_args
from qvlm_export.validate.config import ValidateConfig, validate_config_from_dict
from qvlm_export.validate.thresholds import load_thresholds, thresholds_from_dict

FUZZ = settings(deadline=None, max_examples=60, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["w8a8", "fp16", "faithful", "group", "rtn", "", "builtin:calib", "1e3", "yes"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def key_paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += key_paths(v, (*prefix, k))
    return out


def mutated(base: dict):
    """``base`` with one key (at any depth) set to any YAML value, or one unknown key added."""
    def apply(path, value, add):
        d = json.loads(json.dumps(base))
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1] if not add else f"{path[-1]}_x"] = value
        return d
    return st.builds(apply, st.sampled_from(key_paths(base)), values, st.booleans() | st.just(False))


def one_line_or_value(fn, *args):
    """Call ``fn``: any result is fine, a QvlmError must be one line; anything else fails the test."""
    try:
        return fn(*args)
    except QvlmError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None


BASES = {
    "recipe": (load_recipe("qvlm-w4a16").to_dict(), recipe_from_dict),
    "run": (RunConfig().to_dict(), run_config_from_dict),
    "thresholds": (yaml.safe_load(Path(__import__("qvlm_export").__file__).parent.joinpath(
        "configs/thresholds.yaml").read_text()), thresholds_from_dict),
    "profile": (load_profile("edge").to_dict(), profile_from_dict),
    "export": (ExportConfig().to_dict(), export_config_from_dict),
    "validate": (ValidateConfig().to_dict(), validate_config_from_dict),
    "qvlm method_args": (QVLMConfig().to_dict(), config_from_args),
}


@pytest.mark.parametrize("kind", sorted(BASES))
def test_a_mutated_config_is_valid_or_one_line_error(kind):
    base, parse = BASES[kind]
    assert parse(base) is not None  # the unmutated base is valid

    @FUZZ
    @given(mutated(base))
    def check(raw):
        one_line_or_value(parse, raw)

    check()


@pytest.mark.parametrize("bad, message", [
    ({"weights": {"bits": "eight"}}, "weights: bits must be an integer, got 'eight'"),
    ({"calibration": {"samples": 1.5}}, "calibration: samples must be an integer, got 1.5"),
    ({"activations": {"symmetric": "no"}}, "activations: symmetric must be true or false, got 'no'"),
])
def test_recipe_type_errors_name_key_type_and_value(bad, message):
    with pytest.raises(QvlmError) as err:
        recipe_from_dict({"method": "rtn", "setting": "w8a8", **bad}, source="r.yaml")
    assert str(err.value) == f"r.yaml: {message}"


def test_method_args_types_are_checked():
    from qvlm_export.search.gptq import GPTQ

    with pytest.raises(QvlmError, match=r"gptq: method_args.block_size must be int like 128, got '128'"):
        GPTQ(recipe_from_dict({"method": "gptq", "setting": "w4a16", "method_args": {"block_size": "128"}}))
    assert GPTQ(recipe_from_dict({"method": "gptq", "setting": "w4a16", "method_args": {"block_size": 64}})).args[
        "block_size"] == 64
    with pytest.raises(QvlmError, match=r"m: beta must be a list, got 'hot'"):
        config_from_args({"beta": "hot"}, source="m")
    assert config_from_args({"beta": [10, 1]}).beta == (10.0, 1.0)


def test_run_config_and_validate_types_are_checked():
    with pytest.raises(QvlmError, match=r"quantize.settings must be a list like \[w8a8, w4a16\], got 3"):
        run_config_from_dict({"quantize": {"settings": 3}})
    with pytest.raises(QvlmError, match="run config: model must be a string or null, got 7"):
        run_config_from_dict({"model": 7})
    with pytest.raises(QvlmError, match="validate: runners must be a list of strings, got 3"):
        validate_config_from_dict({"runners": 3})
    assert validate_config_from_dict({"runners": ["fast"]}).runners == ("fast",)
    with pytest.raises(QvlmError, match=r"precisions.w8a8.task.max_accuracy_drop: must be a number, got 'high'"):
        thresholds_from_dict({"precisions": {"w8a8": {"task": {"max_accuracy_drop": "high"}}}})


yaml_texts = st.one_of(st.text(max_size=60), values.map(lambda v: yaml.safe_dump(v)),
                       st.sampled_from(["a: [1", "{", "- - -", "? a\n: b", "!!python/object:os.system {}",
                                        "a: &x [*x]", "\t", "key: value\n  bad indent: 1"]))


def test_yaml_files_load_or_fail_in_one_line(tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "f.yaml"
    loaders = [load_recipe, load_thresholds, load_profile, lambda p: load_run_config(p)]

    @FUZZ
    @given(yaml_texts)
    def check(text):
        path.write_text(text, encoding="utf-8")
        for load in loaders:
            one_line_or_value(load, path)

    check()


def test_set_overrides_are_values_or_one_line_errors():
    @FUZZ
    @given(st.text(max_size=30))
    def check(assignment):
        one_line_or_value(load_run_config, None, [assignment])

    check()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(d / "ok.png")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


json_rows = st.fixed_dictionaries(
    {"image": st.sampled_from(["ok.png", "bad.png", "none.png", "", ".", "../", "ok.png\x00", "/dev/null"]) | st.text(max_size=5),
     "question": values, "answer": values},
    optional={"type": values, "extra": values}).map(json.dumps)
lines = st.one_of(json_rows, st.text(max_size=20), values.map(json.dumps),
                  st.sampled_from(['{"image": "ok.png", "question": "what ?", "answer": "red"}', "", "[]", "null"]))


def test_jsonl_manifests_load_or_fail_in_one_line(data_dir):
    manifest = data_dir / "m.jsonl"

    @FUZZ
    @given(st.lists(lines, max_size=4), st.binary(max_size=4))
    def check(rows, tail):
        manifest.write_bytes("\n".join(rows).encode("utf-8", "surrogatepass") + tail)
        samples = one_line_or_value(read_manifest, manifest)
        if samples is not None:
            assert all(s.image.mode == "RGB" and s.question.strip() for s in samples)

    check()


@pytest.mark.parametrize("spec, message", [
    ("builtin:eval:0", "N must be at least 1"), ("builtin:eval:x", "bad built-in data spec"),
    ("builtin:nope", "unknown split"), ("builtin:", "unknown split")])
def test_builtin_specs_are_checked(spec, message):
    with pytest.raises(QvlmError, match=message):
        load_dataset(spec)
    assert len(load_dataset("builtin:eval:3")) == 3


@pytest.mark.parametrize("argv, file_text, message", [
    (["quantize", "--out", "{tmp}/q", "--recipe"], "method: rtn\nsetting: w8a8\nweights: {bits: eight}\n",
     "weights: bits must be an integer, got 'eight'"),
    (["run", "--out", "{tmp}/r", "--config"], "validate: {runners: 3}\n", "runners must be a list of strings, got 3"),
    (["run", "--out", "{tmp}/r", "--config"], "quantize: [w8a8]\n", "quantize must be a mapping"),
    (["eval", "--data"], '{"image": "ok.png", "question": "", "answer": "red"}\n',
     "f.txt:1: question must be a non-empty string"),
    (["eval", "--data"], b"\xff\xfe{}\n", "is not UTF-8 text"),
])
def test_cli_bad_files_exit_2_with_one_line(tmp_path, capsys, argv, file_text, message):
    path = tmp_path / "f.txt"
    if isinstance(file_text, bytes):
        path.write_bytes(file_text)
    else:
        path.write_text(file_text)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    assert main([a.format(tmp=tmp_path) for a in argv] + [str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "ok.png"]  # no half-written output


def test_a_real_process_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "run.yaml"
    config.write_text("quantize: {settings: w6a6}\n")
    proc = subprocess.run([sys.executable, "-m", "qvlm_export", "run", "--config", str(config), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "w6a6 is simulated only" in proc.stderr
