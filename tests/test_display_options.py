"""Display options (progress) are not part of any artifact's identity, and ``quantize(progress=False)`` reaches
every bar, the methods' per-block search bars included."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvlm_export.manifest import digest
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.api import quantize_identity
from qvlm_export.search.registry import get_method

BASE = {"method": "qvlm", "setting": "w8a8", "method_args": {"iterations": 4}}


def _with_progress(value: bool) -> dict:
    return {**BASE, "method_args": {**BASE["method_args"], "progress": value}}


def test_progress_does_not_enter_the_state_identity():
    plain, on, off = (recipe_from_dict(r) for r in (BASE, _with_progress(True), _with_progress(False)))
    assert plain == on == off and plain.to_dict() == off.to_dict()
    assert "progress" not in off.to_dict()["method_args"] and off.method_args == {"iterations": 4}
    assert (plain.display.progress, on.display.progress, off.display.progress) == (True, True, False)
    ids = [quantize_identity(Path("."), r, "builtin:calib", None, "cpu", "fp32")[0] for r in (plain, on, off)]
    assert digest(ids[0]) == digest(ids[1]) == digest(ids[2])


@pytest.mark.parametrize("method", ["qvlm", "qvit", "qvlm_plus"])
def test_method_configs_take_progress_from_the_display(method):
    recipe = recipe_from_dict({"method": method, "setting": "w8a8", "method_args": {"progress": False}})
    m = get_method(method)(recipe)
    assert m.config.progress is False and "progress" not in m.config.to_dict()
    assert get_method(method)(recipe.with_display(progress=True)).config.progress is True


def test_a_bad_display_value_is_one_line():
    from qvlm_export.errors import QvlmError

    with pytest.raises(QvlmError, match="r.yaml: method_args: progress must be true or false, got 'no'"):
        recipe_from_dict({**BASE, "method_args": {"progress": "no"}}, source="r.yaml")


def test_quantize_progress_false_silences_the_per_block_bars(tiny_model_dir, tmp_path, monkeypatch):
    from qvlm_export.search.api import quantize
    from qvlm_export.search.qvlm import block_search

    seen = []
    real = block_search._progress
    monkeypatch.setattr(block_search, "_progress", lambda enabled, *a: seen.append(enabled) or real(enabled, *a))
    recipe = recipe_from_dict({**BASE, "calibration": {"samples": 4, "batch_size": 2}})
    assert recipe.display.progress is True  # the recipe would show them; the call says no
    quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:4", out=tmp_path / "q", progress=False,
             device="cpu")
    assert seen and not any(seen)


def test_with_method_args_routes_progress_to_the_display():
    recipe = recipe_from_dict(BASE).with_method_args(progress=False, iterations=2)
    assert recipe.method_args == {"iterations": 2} and recipe.display.progress is False
    assert recipe == recipe_from_dict(BASE).with_method_args(iterations=2)
