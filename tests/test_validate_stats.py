"""Parity statistics on hand-made arrays and the thresholds config's resolution and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qvlm_export.errors import QvlmError
from qvlm_export.validate.stats import ErrorStats, cosine_similarity, error_stats, sqnr_db, worst
from qvlm_export.validate.thresholds import Check, load_thresholds, thresholds_from_dict


def test_error_stats_hand_computed():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    cand = np.array([[1.0, 2.5], [2.0, 4.0]], np.float32)  # errors 0, 0.5, 1, 0
    s = error_stats(ref, cand)
    assert s.max_abs == 1.0 and s.mean_abs == 0.375 and s.median_abs == 0.25
    assert s.p99_abs == pytest.approx(0.5 + 0.97 * 0.5)  # linear interpolation between 0.5 and 1.0
    assert s.cosine == pytest.approx(28.0 / math.sqrt(30.0 * 27.25))
    assert s.sqnr_db == pytest.approx(10 * math.log10(30.0 / 1.25))
    assert s.nonfinite == 0


def test_edge_cases():
    z = np.zeros(3)
    assert cosine_similarity(z, z) == 1.0 and cosine_similarity(z, np.ones(3)) == 0.0
    assert sqnr_db(np.ones(3), np.ones(3)) == math.inf
    assert sqnr_db(z, np.ones(3)) == -math.inf
    assert cosine_similarity(np.array([1.0, 0]), np.array([-1.0, 0])) == -1.0
    empty = error_stats(np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty.max_abs == 0.0 and empty.sqnr_db == math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        error_stats(np.zeros(3), np.zeros(4))


def test_nonfinite_candidate_poisons_every_statistic():
    s = error_stats(np.ones(4), np.array([1.0, np.nan, np.inf, 1.0]))
    assert s.nonfinite == 2 and math.isnan(s.sqnr_db) and math.isnan(s.max_abs)
    assert not Check("sqnr_db", s.sqnr_db, 10.0).passed
    assert not Check("max_abs", s.max_abs, 1e9).passed


def test_worst_over_iterations():
    a = ErrorStats(0.1, 0.01, 0.01, 0.05, 0.999, 40.0)
    b = ErrorStats(0.3, 0.02, 0.005, 0.04, 0.99, 30.0, 1)
    w = worst([a, b])
    assert (w.max_abs, w.mean_abs, w.median_abs, w.p99_abs) == (0.3, 0.02, 0.01, 0.05)
    assert (w.cosine, w.sqnr_db, w.nonfinite) == (0.99, 30.0, 1)
    assert ErrorStats.from_json(w.to_json()) == w
    assert ErrorStats.from_json(error_stats(np.ones(2), np.ones(2)).to_json()).sqnr_db == math.inf


def test_check_directions():
    assert Check("cosine", 0.995, 0.99).passed and not Check("cosine", 0.98, 0.99).passed
    assert Check("max_abs", 0.5, 0.5).passed and not Check("max_abs", 0.51, 0.5).passed
    assert Check("sqnr_db", 19.5, 20).describe() == "sqnr_db = 19.5 (threshold >= 20)"


RAW = {"precisions": {"w8a8": {
    "faithful": {"default": {"cosine": 0.99, "sqnr_db": 20},
                 "outputs": {"decoder/present.*": {"sqnr_db": 15}, "decoder/*": {"max_abs": 1.0}}},
    "drift": {"default": {"sqnr_db": 25}},
    "task": {"max_accuracy_drop": 0.05}}}}


def test_threshold_resolution():
    t = thresholds_from_dict(RAW)
    assert t.bounds("w8a8", "faithful", "vision", "image_features") == {"cosine": 0.99, "sqnr_db": 20}
    assert t.bounds("w8a8", "faithful", "decoder", "present.0.key") == {"cosine": 0.99, "sqnr_db": 15}  # first match
    assert t.bounds("w8a8", "faithful", "decoder", "logits") == {"cosine": 0.99, "sqnr_db": 20, "max_abs": 1.0}
    assert t.bounds("w8a8", "fast", "vision", "x") == {"cosine": 0.99, "sqnr_db": 20}  # falls back to faithful
    assert t.bounds("w8a8", "drift", "vision", "x") == {"sqnr_db": 25}
    assert t.task_bounds("w8a8") == {"max_accuracy_drop": 0.05}
    checks = t.check("w8a8", "faithful", "vision", "x", ErrorStats(1, 1, 1, 1, 0.995, 18.0))
    assert [(c.stat, c.passed) for c in checks] == [("cosine", True), ("sqnr_db", False)]
    with pytest.raises(QvlmError, match="no section for precision 'w6a6'"):
        t.bounds("w6a6", "faithful", "vision", "x")


@pytest.mark.parametrize("raw, match", [
    ({"precisions": {"w8a8": {"faithful": {"default": {"cosin": 0.9}}}}}, "unknown statistic 'cosin'"),
    ({"precisions": {"w8a8": {"faithfull": {}}}}, "unknown key 'faithfull'"),
    ({"precisions": {"w8a8": {"faithful": {"default": {"cosine": "high"}}}}}, "bound must be a number"),
    ({"precisions": {"w8a8": {"task": {"max_drop": 1}}}}, "unknown key 'max_drop'"),
    ({"version": 9, "precisions": {}}, "version 9"),
    ([], "'precisions' section"),
])
def test_threshold_errors_are_one_actionable_line(raw, match):
    with pytest.raises(QvlmError, match=match) as info:
        thresholds_from_dict(raw)
    assert "\n" not in str(info.value)


def test_packaged_thresholds_cover_every_deployable_setting(tmp_path):
    from qvlm_export.quant.recipe import SETTINGS

    t = load_thresholds()
    for setting, (_, _, _, deployable, _) in SETTINGS.items():
        if deployable:
            assert t.bounds(setting, "faithful", "decoder", "logits"), setting
            assert t.task_bounds(setting), setting
    bad = tmp_path / "t.yaml"
    bad.write_text("precisions: [1,\n")
    with pytest.raises(QvlmError, match="not valid YAML"):
        load_thresholds(bad)
    with pytest.raises(QvlmError, match="does not exist"):
        load_thresholds(tmp_path / "missing.yaml")


def test_search_diagnostics_reads_the_qvlm_extras_in_unit_order():
    from qvlm_export.validate.layers import search_diagnostics

    extras = {"qvlm": {"config": {"p": 0.35}, "partition": [[0, 1], [2]],
                       "probes": {"units": ["v.0", "v.1", "lm.0"], "entropy": {"lm.0": 6.5, "v.0": 5.0, "v.1": 5.5},
                                  "normalised_dependency": [0.7, None]}}}
    d = search_diagnostics(extras)
    assert d["names"] == ["v.0", "v.1", "lm.0"] and d["values"] == [5.0, 5.5, 6.5]
    assert d["blocks"] == [[0, 1], [2]] and d["p"] == 0.35
    assert d["dependency"][0] == 0.7 and math.isnan(d["dependency"][1])
    assert search_diagnostics({"search_seconds": 3.0}) is None  # an RTN state: nothing to plot
