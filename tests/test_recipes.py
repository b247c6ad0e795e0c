"""Shipped recipes validate; bad recipes fail with one actionable line (quant/recipe.py, search/*)."""

from __future__ import annotations

import pytest

from qvlm_export.cli import main
from qvlm_export.errors import QvlmError
from qvlm_export.quant.recipe import RECIPES_DIR, SETTINGS, load_recipe, recipe_from_dict
from qvlm_export.search.registry import get_method

BASELINES = ("rtn", "smoothquant", "awq", "gptq")
SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_every_baseline_has_a_recipe_at_every_setting():
    missing = [f"{m}-{s}" for m in BASELINES for s in SETTINGS if f"{m}-{s}" not in SHIPPED]
    assert not missing


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_validates_and_constructs_its_method(name):
    recipe = load_recipe(name)
    assert f"{recipe.method}-{recipe.setting}" == name
    get_method(recipe.method)(recipe)  # method_args are checked by the method itself


@pytest.mark.parametrize("name", [f"{m}-{s}" for m in BASELINES for s in SETTINGS])
def test_baseline_recipes_follow_the_setting_table(name):
    recipe = load_recipe(name)
    wbits, wgran, abits, deployable, _ = SETTINGS[recipe.setting]
    assert (recipe.weights.bits, recipe.weights.granularity, recipe.activations.bits) == (wbits, wgran, abits)
    assert recipe.deployable is deployable and recipe.weights.symmetric and recipe.weights.group_size == 128
    assert recipe.calibration.samples == 64 and not recipe.modules.lm_head


def test_setting_table_marks_simulated_settings():
    assert {s for s, row in SETTINGS.items() if not row[3]} == {"w6a6", "w4a4"}


@pytest.mark.parametrize("raw,message", [
    ({"method": "rtn", "setting": "w8a8", "wieghts": {}}, "unknown key 'wieghts'"),
    ({"method": "awq2", "setting": "w4a16"}, "method must be one of"),
    ({"method": "rtn", "setting": "w5a5"}, "setting must be one of"),
    ({"method": "rtn", "setting": "w8a8", "weights": {"bits": 9}}, "weights.bits must be in 2..8"),
    ({"method": "rtn", "setting": "w8a8", "weights": {"granularity": "row"}}, "granularity must be"),
    ({"method": "rtn", "setting": "w8a8", "weights": {"group_size": 1}}, "group_size must be at least 2"),
    ({"method": "rtn", "setting": "w8a8", "activations": {"bits": 1}}, "activations.bits must be null or in 2..8"),
    ({"method": "rtn", "setting": "w8a8", "weights": [4]}, "weights: must be a mapping"),
    ({"method": "rtn", "setting": "w8a8", "method_args": [1]}, "method_args must be a mapping"),
    (["rtn"], "must be a YAML mapping"),
])
def test_bad_recipe_mapping_is_a_clear_error(raw, message):
    with pytest.raises(QvlmError, match=message.replace(".", r"\.").replace("(", r"\(")):
        recipe_from_dict(raw, source="r.yaml")


@pytest.mark.parametrize("method,args,message", [
    ("awq", {"grdi": 10}, "awq: unknown method_args key 'grdi'"),
    ("gptq", {"damp": 2.0}, "damp must be in"),
    ("gptq", {"dampening": 0.1}, "unknown method_args key 'dampening'"),
    ("smoothquant", {"alpha": 1.5}, "alpha must be in"),
    ("rtn", {"alpha": 0.5}, "rtn: unknown method_args key 'alpha'"),
])
def test_bad_method_args_are_clear_errors(method, args, message):
    recipe = recipe_from_dict({"method": method, "setting": "w4a16", "method_args": args})
    with pytest.raises(QvlmError, match=message):
        get_method(method)(recipe)


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(QvlmError, match="rtn-w8a8"):
        load_recipe("rtn-w9a9")


@pytest.mark.parametrize("text,message", [
    ("method: rtn\nsetting: [w8a8\n", "not valid YAML"),
    ("method: rtn\nsetting: w8a8\nweights: {bits: 12}\n", "weights.bits must be in 2..8"),
    ("method: awq\nsetting: w4a16\nmethod_args: {grdi: 3}\n", "unknown method_args key 'grdi'"),
])
def test_cli_quantize_rejects_bad_recipe_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["quantize", "--recipe", str(path), "--out", str(tmp_path / "q"), "--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()
