"""The wheel must carry everything the CLI reads at run time (release pipelines install it, not the repo)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import qvlm_export
from qvlm_export.engine.profiles import PROFILES_DIR, load_profile
from qvlm_export.load.model import EMBEDDED_MODEL_DIR
from qvlm_export.quant.recipe import RECIPES_DIR, load_recipe

REPO = Path(__file__).resolve().parent.parent
PACKAGE = Path(qvlm_export.__file__).resolve().parent


def test_runtime_data_lives_inside_the_package():
    for folder in (RECIPES_DIR, PROFILES_DIR, EMBEDDED_MODEL_DIR):
        assert folder.resolve().is_relative_to(PACKAGE), folder
    # the documented repo paths are links to the same files
    assert (REPO / "calibration" / "recipes").resolve() == RECIPES_DIR.resolve()
    assert (REPO / "engines").resolve() == PROFILES_DIR.resolve()


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    # a clean copy: setuptools would otherwise reuse a stale build/ or *.egg-info of the checkout
    src = out / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "out", "*.egg-info", "__pycache__", ".*_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("qvlm_export-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_carries_recipes_profiles_thresholds_and_model(wheel_names):
    data_files = [p for folder in (RECIPES_DIR, PROFILES_DIR, EMBEDDED_MODEL_DIR, PACKAGE / "configs")
                  for p in folder.iterdir() if p.is_file()]
    assert len(data_files) >= 30 + 2 + 5
    missing = [str(p.relative_to(PACKAGE.parent)) for p in data_files
               if str(p.relative_to(PACKAGE.parent)) not in wheel_names]
    assert missing == []
    assert "qvlm_export/search/qvlm/method.py" in wheel_names


def test_every_shipped_recipe_and_profile_loads_by_name():
    recipes = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    # rtn, smoothquant, awq, gptq, qvlm, qig, qvlm_plus at all 6 settings; qvit at its 3 vision settings
    assert len(recipes) == 7 * 6 + 3
    for name in recipes:
        assert f"{load_recipe(name).method}-{load_recipe(name).setting}" == name
    assert sorted(load_profile(p.stem).name for p in PROFILES_DIR.glob("*.yaml")) == ["edge", "server"]
