"""A quant state written by a newer qvlm-export (recipe version, state layout) is refused on load: one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from qvlm_export.cli import main
from qvlm_export.manifest import refresh_manifest_outputs
from qvlm_export.quant.recipe import RECIPE_VERSION, recipe_from_dict
from qvlm_export.quant.state import STATE_FORMAT, load_state
from qvlm_export.search.api import quantize


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory, tiny_model_dir):
    recipe = recipe_from_dict({"method": "rtn", "setting": "w8a8", "calibration": {"samples": 2, "batch_size": 2}})
    return quantize(tiny_model_dir, recipe, out=tmp_path_factory.mktemp("state") / "q", progress=False)


def _future(state_dir, tmp_path, file: str, key: str, value):
    """A copy of the state as a newer version would write it: the field changed, the manifest consistent."""
    out = tmp_path / f"future-{key}"
    shutil.copytree(state_dir, out)
    path = out / file
    raw = yaml.safe_load(path.read_text()) if file.endswith(".yaml") else json.loads(path.read_text())
    raw[key] = value
    path.write_text(yaml.safe_dump(raw) if file.endswith(".yaml") else json.dumps(raw))
    refresh_manifest_outputs(out)
    return out


def test_the_recipe_version_is_recorded_in_the_state(state_dir):
    assert yaml.safe_load((state_dir / "recipe.yaml").read_text())["version"] == RECIPE_VERSION == 1
    assert load_state(state_dir).recipe.version == RECIPE_VERSION


@pytest.mark.parametrize("file, key, what", [("recipe.yaml", "version", "recipe version"),
                                             ("state.json", "format", "quant-state format")])
def test_a_future_state_is_refused_in_one_line(state_dir, tmp_path, capsys, file, key, what):
    future = _future(state_dir, tmp_path, file, key, 2)
    code = main(["export", "--quant", str(future), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "bundle").exists()
    supported = RECIPE_VERSION if key == "version" else STATE_FORMAT
    assert err == (f"error: {future}: {what} 2 is not supported (this qvlm-export reads {supported}); "
                   "upgrade qvlm-export, or re-run 'qvlm-export quantize' with this one")
