"""``run`` checks every stage's options before any work: a typo fails in one line, nothing is quantized."""

from __future__ import annotations

import pytest

from qvlm_export import pipeline
from qvlm_export.cli import main
from qvlm_export.errors import QvlmError
from qvlm_export.pipeline_config import RunConfig, load_run_config, run_config_from_dict


@pytest.fixture
def no_quantize(monkeypatch):
    """Any call to the search stage fails the test (and records that it happened)."""
    calls = []

    def quantize(*args, **kwargs):
        calls.append(args)
        raise AssertionError("quantize was called")

    monkeypatch.setattr("qvlm_export.search.api.quantize", quantize)
    return calls


def test_set_export_typo_fails_before_quantizing(tmp_path, capsys, no_quantize):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--method", "rtn", "--settings", "w8a8", "--no-progress",
                 "--set", "export.typo=1"])
    err = capsys.readouterr().err
    assert code == 2 and no_quantize == [] and not out.exists()
    assert err.count("\n") == 1 and "export: unknown key 'typo'" in err and "opset" in err


@pytest.mark.parametrize("override, message", [
    ("export.opset=20", "export needs opset >= 21"),
    ("export.dtype=int8", "export dtype must be one of ['fp32', 'fp16']"),
    ("export.example_batch=two", "export: example_batch must be an integer, got 'two'"),
])
def test_bad_export_values_fail_on_load(override, message):
    with pytest.raises(QvlmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_run_config(None, [override])


@pytest.mark.parametrize("raw, message", [
    ({"quantize": {"method": "gptq", "recipe": {"method_args": {"dampening": 0.1}}}},
     "gptq: unknown method_args key 'dampening'"),
    ({"build": {"profile": "no-such-profile"}}, "no-such-profile"),
    ({"validate": {"thresholds": "/nonexistent/t.yaml"}}, "thresholds file '/nonexistent/t.yaml' does not exist"),
])
def test_run_pipeline_refuses_bad_stage_options_before_quantizing(tmp_path, raw, message, no_quantize):
    config = run_config_from_dict({"out": str(tmp_path / "run"), "quantize": {"settings": ["w8a8"]}, **raw})
    with pytest.raises(QvlmError, match=message) as info:
        pipeline.run_pipeline(config)
    assert "\n" not in str(info.value) and no_quantize == [] and not (tmp_path / "run").exists()


def test_a_config_built_in_python_is_checked_too(tmp_path, no_quantize):
    config = RunConfig(out=str(tmp_path / "run"), export={"opsett": 21})
    with pytest.raises(QvlmError, match="run config: export: unknown key 'opsett'"):
        pipeline.run_pipeline(config)
    assert no_quantize == [] and not (tmp_path / "run").exists()


def test_export_config_is_typed_with_the_given_options():
    c = load_run_config(None, ["export.opset=22", "export.example_seq=5"])
    assert c.export == {"opset": 22, "example_seq": 5}
    assert (c.export_config.opset, c.export_config.example_seq, c.export_config.dtype) == (22, 5, "fp32")
