"""Polygraphy per-graph parity on hand-built ONNX graphs: FP reference, W8A8 QDQ candidate, broken copy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _onnx_models import activation_scales, feeds, fp_mlp, mlp_weights, w8a8_mlp  # noqa: E402

from qvlm_export.validate.parity import compare_graph, load_reference, run_reference  # noqa: E402
from qvlm_export.validate.stats import error_stats  # noqa: E402
from qvlm_export.validate.thresholds import thresholds_from_dict  # noqa: E402

THRESHOLDS = thresholds_from_dict({"precisions": {"w8a8": {
    "faithful": {"default": {"cosine": 0.999, "sqnr_db": 30}},
    "fast": {"default": {"cosine": 0.95, "sqnr_db": 15}},
    "drift": {"default": {"sqnr_db": 15}}}}})


def _runner(model, faithful: bool):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if faithful:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return OnnxrtRunner(lambda: ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w1, w2 = mlp_weights()
    data = feeds(3)
    xs, hs = activation_scales(w1, data)
    pg = tmp_path_factory.mktemp("polygraphy")
    reference = run_reference("mlp", _runner(fp_mlp(w1, w2), True), data, pg)
    return {"w": (w1, w2, xs, hs), "data": data, "pg": pg, "reference": reference}


def _compare(setup, **broken):
    w1, w2, xs, hs = setup["w"]
    model = w8a8_mlp(w1, w2, xs, hs, **broken)
    return compare_graph("mlp", setup["reference"], {"faithful": _runner(model, True), "fast": _runner(model, False)},
                         setup["data"], "w8a8", THRESHOLDS)


def test_correct_candidate_passes_and_statistics_match_direct_computation(setup):
    result = _compare(setup)
    assert result.passed, result.failures()
    assert result.polygraphy_passed == {"faithful": True, "fast": True, "drift": True}
    by_key = {(o.comparison, o.output): o for o in result.outputs}
    assert set(by_key) == {(c, o) for c in ("faithful", "fast", "drift") for o in ("y", "h")}
    y = by_key[("faithful", "y")]
    assert y.stats.sqnr_db > 30 and y.stats.cosine > 0.999
    # Worst iteration of the recorded statistics equals a direct computation on the ORT outputs.
    import onnxruntime as ort

    w1, w2, xs, hs = setup["w"]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    cand = ort.InferenceSession(w8a8_mlp(w1, w2, xs, hs).SerializeToString(), so)
    ref = ort.InferenceSession(fp_mlp(w1, w2).SerializeToString())
    direct = [error_stats(ref.run(["y"], d)[0], cand.run(["y"], d)[0]) for d in setup["data"]]
    assert y.stats.max_abs == pytest.approx(max(s.max_abs for s in direct), rel=1e-6)
    assert y.stats.sqnr_db == pytest.approx(min(s.sqnr_db for s in direct), rel=1e-6)


def test_fast_kernels_are_measured_separately_from_faithful(setup):
    result = _compare(setup)
    by_key = {(o.comparison, o.output): o for o in result.outputs}
    faithful, fast, drift = (by_key[(c, "y")] for c in ("faithful", "fast", "drift"))
    assert drift.against == "faithful" and fast.against == "reference"
    # Exact QDQ arithmetic vs fused integer kernels: not the same numbers.
    assert fast.stats != faithful.stats
    assert drift.stats.max_abs > 0
    assert set(result.runtime_ms) == {"reference", "faithful", "fast"}
    assert all(ms > 0 for ms in result.runtime_ms.values())


def test_broken_weight_scale_fails_naming_graph_output_statistic_and_threshold(setup):
    result = _compare(setup, broken_scale=(2, 3, 4.0))
    assert not result.passed
    assert result.polygraphy_passed["faithful"] is False
    failures = result.failures()
    assert any(line.startswith("graph 'mlp' output 'y' (faithful vs reference): sqnr_db = ") and "threshold >= 30" in line
               for line in failures), failures
    by_key = {(o.comparison, o.output): o for o in result.outputs}
    assert by_key[("faithful", "h")].passed  # the broken scale is in the second layer: h is untouched
    assert by_key[("faithful", "y")].stats.sqnr_db < 5


def test_saved_reference_reloads_identically(setup):
    loaded_feeds, loaded = load_reference("mlp", setup["pg"])
    assert len(loaded_feeds) == 3
    for a, b in zip(loaded_feeds, setup["data"]):
        assert np.array_equal(a["x"], b["x"])
    original = setup["reference"]["reference"]
    for it_a, it_b in zip(loaded["reference"], original):
        assert np.array_equal(it_a["y"], it_b["y"]) and np.array_equal(it_a["h"], it_b["h"])
    w1, w2, xs, hs = setup["w"]
    again = compare_graph("mlp", loaded, {"faithful": _runner(w8a8_mlp(w1, w2, xs, hs), True)}, loaded_feeds,
                          "w8a8", THRESHOLDS)
    first = {(o.comparison, o.output): o.stats for o in _compare(setup).outputs}
    assert all(first[(o.comparison, o.output)] == o.stats for o in again.outputs)


def test_fp16_candidate_is_fed_and_judged_in_float32(setup):
    """The cast wrapper (used for fp16 TensorRT engines) lets an fp16 graph join an fp32 comparison."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from qvlm_export.validate.runners import cast_runner

    w1, w2, _, _ = setup["w"]
    model = fp_mlp(w1, w2)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = 10  # FLOAT16
    fp16 = OnnxrtRunner(lambda: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]),
                        name="tensorrt")
    result = compare_graph("mlp", setup["reference"], {"tensorrt": cast_runner(fp16, np.dtype(np.float16))},
                           setup["data"], "w8a8", THRESHOLDS)
    y = next(o for o in result.outputs if o.output == "y")
    assert y.comparison == "tensorrt" and y.passed  # tensorrt falls back to the faithful bounds
    assert 40 < y.stats.sqnr_db < 90  # fp16 rounding: far better than int8, not bit-exact
