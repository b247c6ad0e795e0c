"""Decode path and its measurement: IO-bound KV equals session.run bit for bit, the profile
summary accounts for every microsecond, and validate reports decode tokens/s against FP."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402

from qvlm_export.runtime.bundle import read_bundle  # noqa: E402
from qvlm_export.runtime.decode_speed import runner_step, time_decode  # noqa: E402
from qvlm_export.runtime.ort_decode import OrtKV, bound_decode  # noqa: E402
from qvlm_export.runtime.ort_profile import node_kind, summarise_trace  # noqa: E402
from qvlm_export.runtime.ort_runner import make_session, ort_runner, session_options  # noqa: E402
from qvlm_export.validate.speed import speed_note, with_ratio  # noqa: E402


def _steps(info, prompt: int = 6, steps: int = 3):
    rng = np.random.default_rng(1)
    hidden = info.model.hidden_size
    feeds = [(rng.standard_normal((1, prompt, hidden)).astype(np.float32), prompt, 0)]
    feeds += [(rng.standard_normal((1, 1, hidden)).astype(np.float32), prompt + i + 1, prompt + i) for i in range(steps)]
    return [(e, np.ones((1, total), np.int64), np.arange(start, total, dtype=np.int64)[None]) for e, total, start in feeds]


@pytest.mark.parametrize("setting", ["w8a8", "w4a16"])
def test_bound_decode_equals_session_run_bit_for_bit(setting):
    info = read_bundle(H.bundle(setting))
    session = make_session(info.graph_path("decoder"), "fast", threads=1)
    names = info.past_names()
    past_run, past_bound = info.empty_past(1), info.empty_past(1)
    for embeds, mask, positions in _steps(info):
        out = session.run(None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                                 **dict(zip(names, past_run))})
        logits_bound, past_bound = bound_decode(session, info, embeds, mask, positions, past_bound)
        past_run = out[1:]
        assert np.array_equal(out[0], logits_bound)
        assert all(isinstance(p, OrtKV) for p in past_bound)
        for a, b in zip(past_run, past_bound):
            assert b.shape == a.shape and np.array_equal(a, np.asarray(b))


def test_ort_runner_keeps_kv_in_onnxruntime_and_generates_like_plain_feeds():
    info = read_bundle(H.bundle("w8a8"))
    with ort_runner(info, "faithful", threads=1) as runner:
        past = info.empty_past(1)
        for embeds, mask, positions in _steps(info):
            logits, past = runner.decode(embeds, mask, positions, past)
        # a numpy past (what TensorRT-shaped callers pass) gives the same step as the bound one
        again, _ = runner.decode(embeds, mask, positions, [np.asarray(p)[:, :, :-1] for p in past])
    assert isinstance(past[0], OrtKV) and past[0].shape[2] == mask.shape[1]
    assert np.array_equal(logits, again)


def test_node_kinds():
    assert node_kind("MatMul", [[1, 1, 64], [64, 32]], [[1, 1, 32]]) == "weights"
    assert node_kind("MatMulNBits", [[1, 1, 64], [32, 1, 16], [32]], [[1, 1, 32]]) == "weights"
    assert node_kind("MatMul", [[1, 4, 1, 8], [1, 4, 8, 9]], [[1, 4, 1, 9]]) == "attention"
    assert node_kind("FusedMatMul", [[1, 4, 1, 8], [1, 4, 9, 8]], [[1, 4, 1, 9]]) == "attention"
    assert node_kind("Concat", [[1, 4, 8, 8], [1, 4, 1, 8]], [[1, 4, 9, 8]]) == "kv"
    assert node_kind("Concat", [[1, 4, 1, 4], [1, 4, 1, 4]], [[1, 4, 1, 8]]) == "other"  # rotary halves
    assert node_kind("DynamicQuantizeLinear", [[1, 1, 64]], [[1, 1, 64]]) == "qdq"


def test_profile_summary_accounts_for_each_run_and_layer():
    info = read_bundle(H.bundle("w8a8"))
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options("fast", threads=1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(str(info.graph_path("decoder")), options, providers=["CPUExecutionProvider"])
        time_decode(lambda e, m, p, past: bound_decode(session, info, e, m, p, past)[1], info, 6, 5, repeats=1)
        trace = json.loads(Path(session.end_profiling()).read_text())
    summary = summarise_trace(trace, skip_runs=2)
    assert summary["runs"] == 4  # 1 prefill + 5 steps, 2 skipped
    kinds = summary["kinds_ms"]
    assert sum(kinds.values()) == pytest.approx(summary["run_ms"], rel=1e-6)
    assert kinds["weights"] > 0 and kinds["kv"] > 0
    assert sum(summary["ops_ms"].values()) == pytest.approx(summary["run_ms"] - kinds["session"], rel=1e-6)
    assert sorted(summary["layers_ms"]) == list(range(info.model.num_layers))
    assert sum(summary["layers_ms"].values()) < summary["run_ms"] - kinds["session"]  # lm_head is outside layers


def test_time_decode_counts_steps_and_repeats():
    info = read_bundle(H.bundle("fp"))
    calls = []
    with ort_runner(info, "fast", threads=1) as runner:
        step = runner_step(runner)
        timing = time_decode(lambda *a: calls.append(a[1].shape[1]) or step(*a), info, prompt=5, steps=4, repeats=2)
    assert calls == [5, 6, 7, 8, 9] * 2  # mask grows one column a step, from the prompt
    assert len(timing.step_s) == 2 and timing.spread >= 1.0 and timing.tokens_per_s == 1 / min(timing.step_s)


def test_speed_ratio_and_small_model_note():
    ref = {"tokens_per_s": 200.0, "decoder_weight_bytes": 3 * 2**20}
    assert with_ratio({"tokens_per_s": 300.0}, ref)["x_fp"] == pytest.approx(1.5)
    assert with_ratio(None, ref) is None and with_ratio({"tokens_per_s": 1.0}, None) == {"tokens_per_s": 1.0}
    assert "3.0 MiB" in speed_note(ref) and "bench_decode" in speed_note(ref)
    assert speed_note({"tokens_per_s": 1.0, "decoder_weight_bytes": 2**30}) is None
