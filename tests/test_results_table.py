"""docs/results.json is regenerated from its recipes: a change that moves a committed figure is seen.

One baseline row (weight-only RTN, data-free) and one Q-VLM row are recomputed exactly as
``tools/results_table.py`` computes them and must fall inside the committed row's 95%
intervals (the same CPU reproduces them exactly; another CPU's float reductions may move
them slightly, never outside the interval).
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import results_table  # noqa: E402

from qvlm_export.data.manifest import load_dataset  # noqa: E402
from qvlm_export.evaluate.logits import LOGIT_SQNR_DATA, next_token_logits  # noqa: E402

COMMITTED = {(r["method"], r["setting"]): r for r in json.loads((ROOT / "docs" / "results.json").read_text())}


@pytest.fixture(scope="module")
def fp_logits():
    fp, vlm = results_table.fp_row(None, "builtin:eval")
    committed = COMMITTED[("fp", "fp")]
    assert fp["accuracy"] == pytest.approx(committed["accuracy"], abs=0.004)
    return next_token_logits(vlm, load_dataset(LOGIT_SQNR_DATA))


# Q-VLM's rounding search is chaotic in float summation order: its W3A16 row measured 30.53 dB with
# 2 torch threads and 29.68 dB with 1 (same code, same machine), so it is held to 1.5 dB, not to its
# bootstrap interval (which resamples questions, not thread counts). RTN is exact up to float noise.
SQNR_TOLERANCE = {"rtn": 0.5, "qvlm": 1.5}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "setting"), [("rtn", "w4a16"), ("qvlm", "w3a16")])
def test_committed_row_reproduces(method, setting, fp_logits, tmp_path):
    row = results_table.quant_row(method, setting, None, "builtin:calib", "builtin:eval", LOGIT_SQNR_DATA,
                                  fp_logits, tmp_path)
    committed = COMMITTED[(method, setting)]
    lo, hi = committed["accuracy_ci"]
    assert lo <= row["accuracy"] <= hi, (row["accuracy"], committed["accuracy"])
    assert abs(row["accuracy"] - committed["accuracy"]) <= 0.01  # at most 5 of 500 answers flip
    if method == "rtn":
        s_lo, s_hi = committed["logit_sqnr_ci"]
        assert s_lo <= row["logit_sqnr_db"] <= s_hi, (row["logit_sqnr_db"], committed["logit_sqnr_db"])
    assert row["logit_sqnr_db"] == pytest.approx(committed["logit_sqnr_db"], abs=SQNR_TOLERANCE[method])
