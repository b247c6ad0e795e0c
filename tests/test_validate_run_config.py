"""The run config of ``qvlm-export run``: file, command-line options and --set reach every stage option."""

from __future__ import annotations

import pytest

from qvlm_export import pipeline
from qvlm_export.cli.run_cmd import cli_overrides
from qvlm_export.errors import QvlmError
from qvlm_export.pipeline import RunResult, resolve_recipe
from qvlm_export.pipeline_config import RunConfig, load_run_config, run_config_from_dict


def test_defaults_are_the_readme_job():
    c = load_run_config()
    assert c == RunConfig()
    assert (c.quantize.method, c.quantize.settings, c.quantize.calib) == ("qvlm", ("w8a8", "w4a16"), "builtin:calib")
    assert c.build.engines == "auto" and c.validate.runners == ("faithful", "fast")


def test_file_then_options_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out: a\nquantize: {settings: [w8a8], recipe: {method_args: {iterations: 10}}}\n"
                    "validate: {eval_samples: 40}\nexport: {opset: 21}\n")
    given = {"out": "b", "iterations": 20, "settings": "w8a8,w4a16", "eval_samples": None, "engines": "off"}
    c = load_run_config(path, [*cli_overrides(given), "validate.eval_samples=50", "quantize.recipe.calibration.samples=8"])
    assert c.out == "b" and c.quantize.settings == ("w8a8", "w4a16") and c.build.engines == "off"
    assert c.quantize.recipe == {"method_args": {"iterations": 20}, "calibration": {"samples": 8}}
    assert c.validate.eval_samples == 50 and c.export == {"opset": 21}
    recipe = resolve_recipe("qvlm", "w4a16", c.quantize.recipe)
    assert recipe.method_args["iterations"] == 20 and recipe.method_args["max_depth"] == 3  # merged, not replaced
    assert recipe.calibration.samples == 8 and recipe.weights.bits == 4 and recipe.weights.group_size == 128
    assert c.to_dict()["quantize"]["settings"] == ["w8a8", "w4a16"]


@pytest.mark.parametrize("raw, match", [
    ({"quantize": {"settings": ["w9a9"]}}, "names an unknown setting; list settings from"),
    ({"quantise": {}}, "unknown key 'quantise'"),
    ({"build": {"engines": "maybe"}}, "build.engines is .maybe.; use one of"),
    ({"validate": {"runners": ["turbo"]}}, "runners must be a non-empty subset"),
    ({"validate": {"eval_samplez": 3}}, "unknown key 'eval_samplez'"),
    ({"export": [1]}, "export must be a mapping"),
    ({"quantize": {"settings": ["w8a8", "w4a4"]}}, "w4a4 is simulated only and cannot be exported"),
    ({"quantize": {"settings": ["w4a8"]}, "build": {"engines": "required"}}, "w4a8 is not a TensorRT format"),
])
def test_bad_config_is_one_actionable_line(raw, match):
    with pytest.raises(QvlmError, match=match) as info:
        run_config_from_dict(raw)
    assert "\n" not in str(info.value)


def test_bad_set_and_bad_recipe_override(tmp_path):
    with pytest.raises(QvlmError, match="is not an assignment; pass section.key=value"):
        load_run_config(None, ["validate.eval_samples"])
    with pytest.raises(QvlmError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(QvlmError, match="unknown key 'bitz'"):
        resolve_recipe("qvlm", "w8a8", {"weights": {"bitz": 4}})


def test_onnx_runtime_settings_are_not_gated_on_tensorrt(tmp_path, monkeypatch):
    """W4A8 / W3A16 run on ONNX Runtime: check-trt and the engine build skip them with the reason, so a
    mixed run is judged on what each setting targets (before, check-trt's w4a8-not-trt failed the run)."""
    result = RunResult(out=tmp_path)
    stage = pipeline._Timer(result, lambda _: None)
    pipeline._check_trt({"fp": tmp_path, "w4a8": tmp_path, "w3a16": tmp_path}, tmp_path, result, stage, lambda _: None)
    assert result.check_trt == {} and not (tmp_path / "check-trt").exists()
    monkeypatch.setattr(pipeline, "tensorrt_unavailable", lambda: None)  # as on a GPU machine with tensorrt
    config = run_config_from_dict({"quantize": {"settings": ["w4a8"]}})
    pipeline._build_engines(config, tmp_path, {"w4a8": tmp_path / "q"}, result, stage)
    assert result.engines == {} and result.seconds == {}
    assert result.skipped == [
        "check-trt w4a8: skipped: w4a8 is not a TensorRT format; it runs on ONNX Runtime (exact QDQ)",
        "check-trt w3a16: skipped: w3a16 is not a TensorRT format; it runs on ONNX Runtime (exact QDQ)",
        "tensorrt engines for w4a8: skipped: w4a8 is not a TensorRT format; it runs on ONNX Runtime (exact QDQ)"]
