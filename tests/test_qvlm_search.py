"""Q-VLM search on a tiny random LLaVA: block search beats RTN, plan records its analysis, resume is exact."""

from __future__ import annotations

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.qvlm.block_search import search_block
from qvlm_export.search.qvlm.config import QVLMConfig
from qvlm_export.search.registry import get_method

FAST = {"iterations": 8, "progress": False}


def _recipe(setting: str, **args):
    return recipe_from_dict({"method": "qvlm", "setting": setting, "method_args": {**FAST, **args},
                             "calibration": {"samples": 16, "batch_size": 8}})


@pytest.fixture(scope="module")
def calib():
    return load_dataset("builtin:calib:16")


def test_block_search_lowers_block_error_below_rtn(tiny_model_dir, calib):
    """One decoder layer at W4A4: the searched block error must be well under plain RTN's."""
    vlm = load_vlm(tiny_model_dir)
    cal = SequentialCalibrator(vlm, calib, _recipe("w4a4"), batch_size=8)
    seen = {}

    def block_fn(ctx):
        if ctx.units[0].name == "model.language_model.layers.1":
            masks = [b.attention_mask.bool() for b in cal.batches]
            seen.update(search_block(ctx, QVLMConfig(iterations=60, progress=False), masks, seed=0))
            seen["layers"] = dict(ctx.layers)

    cal.run(block_fn)
    assert seen["error"] < 0.7 * seen["rtn_error"], seen
    assert seen["error"] < seen["init_error"]
    # the committed hard codes are integers within the 4-bit range, with static per-tensor input steps
    q = seen["layers"]["model.language_model.layers.1.mlp.down_proj"]
    assert q.weight_codes.dtype == torch.int8 and int(q.weight_codes.min()) >= -8 and int(q.weight_codes.max()) <= 7
    assert q.input_scale.shape == () and float(q.input_scale) > 0


def _run(model_dir, calib, recipe, checkpoint_dir=None, stop_after=None):
    vlm = load_vlm(model_dir)
    cal = SequentialCalibrator(vlm, calib, recipe, batch_size=8, checkpoint_dir=checkpoint_dir)
    method = get_method("qvlm")(recipe)
    partition = method.plan(cal)
    calls = []

    def block_fn(ctx):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # the search is killed here
        calls.append(ctx.units[0].name)
        method.block(ctx)

    try:
        state = cal.run(block_fn, partition)
    except KeyboardInterrupt:
        return None, calls, partition
    return state, calls, partition


def test_plan_records_entropy_dependency_and_partition(tiny_model_dir, calib):
    recipe = _recipe("w8a8", p=0.0, iterations=0)
    vlm = load_vlm(tiny_model_dir)
    cal = SequentialCalibrator(vlm, calib, recipe, batch_size=8)
    partition = get_method("qvlm")(recipe).plan(cal)
    extras = cal.extras["qvlm"]
    # p = 0 and max depth 3: vision 4 layers -> [3, 1], projector alone, decoder 4 layers -> [3, 1]
    assert partition == [[0, 1, 2], [3], [4], [5, 6, 7], [8]]
    probes = extras["probes"]
    assert probes["bits"] == 8 and len(probes["dependency"]) == 8
    assert probes["dependency"][3] is None and probes["dependency"][4] is None  # across stacks
    for name, h in probes["entropy"].items():
        assert 0.5 < h <= 8.0, (name, h)
    for k, d in enumerate(probes["dependency"]):
        if d is not None:  # conditional entropy is bounded by the target's entropy
            assert 0.0 <= d <= probes["entropy"][probes["units"][k + 1]] + 1e-9
    assert len(probes["sample_entropy"][probes["units"][0]]) == 16
    assert set(extras["jacobian_weights"]) == {f"model.vision_tower.encoder.layers.{i}" for i in range(4)}
    assert sum(extras["jacobian_weights"].values()) == pytest.approx(4.0)


def test_resume_after_kill_equals_uninterrupted_run(tiny_model_dir, calib, tmp_path):
    recipe = _recipe("w4a8", p=0.3)
    full, full_calls, partition = _run(tiny_model_dir, calib, recipe)
    assert len(partition) < len(full_calls) + 1 and any(len(b) > 1 for b in partition)

    killed, calls, _ = _run(tiny_model_dir, calib, recipe, checkpoint_dir=tmp_path, stop_after=3)
    assert killed is None and len(calls) == 3
    resumed, resumed_calls, _ = _run(tiny_model_dir, calib, recipe, checkpoint_dir=tmp_path)
    assert resumed_calls == full_calls[3:]  # finished blocks were replayed, not searched again

    assert sorted(resumed.layers) == sorted(full.layers)
    for name, a in full.layers.items():
        b = resumed.layers[name]
        assert torch.equal(a.weight_codes, b.weight_codes), name
        assert torch.equal(a.weight_scale, b.weight_scale), name
        assert torch.equal(a.input_scale, b.input_scale), name
    assert resumed.extras["qvlm"]["partition"] == full.extras["qvlm"]["partition"]


# -- issue 4's acceptance claim, guarded on the embedded trained model ---------------------------------
def test_embedded_qvlm_beats_rtn_at_w4a4(embedded_model_dir, tmp_path):
    """The shipped qvlm-w4a4 recipe against RTN on the same calibration set: the results table's
    headline (92.2 vs 84.4 on 500 questions), here on 100 questions and the logit SQNR
    (measured: accuracy 0.92 vs 0.83, SQNR 16.2 vs 10.2 dB, search 38 s on 2 cores)."""
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.backends import make_answerer
    from qvlm_export.evaluate.logits import LOGIT_SQNR_DATA, logit_sqnr_db, next_token_logits
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.search.api import quantize

    questions, logit_samples = load_dataset("builtin:eval:100"), load_dataset(LOGIT_SQNR_DATA)
    ref = next_token_logits(load_vlm(embedded_model_dir), logit_samples)
    acc, sqnr = {}, {}
    for method in ("rtn", "qvlm"):
        state = quantize(model=embedded_model_dir, recipe=f"{method}-w4a4", out=tmp_path / method, progress=False)
        acc[method] = evaluate(make_answerer(quant=str(state))[0], questions, progress=False).overall
        sqnr[method] = logit_sqnr_db(ref, next_token_logits(load_simulated(state)[0], logit_samples))
    assert acc["qvlm"] >= acc["rtn"] + 0.05 and acc["qvlm"] >= 0.88, acc
    assert sqnr["qvlm"] > sqnr["rtn"] + 4.0, sqnr
