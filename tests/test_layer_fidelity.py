"""Layer-by-layer export fidelity: whole-graph flips excused only when every decoder layer and the tail pass."""

from __future__ import annotations

import dataclasses

from qvlm_export.validate.layer_fidelity import TAIL, LayerFidelity, excuse_accumulated_flips
from qvlm_export.validate.parity import OutputParity
from qvlm_export.validate.stats import ErrorStats
from qvlm_export.validate.thresholds import Check


def _stats(db: float) -> ErrorStats:
    return ErrorStats(max_abs=1.0, mean_abs=0.1, median_abs=0.1, p99_abs=0.5, cosine=0.99, sqnr_db=db)


def _output(db: float, bound: float) -> OutputParity:
    return OutputParity(graph="decoder", output="logits", comparison="fidelity", against="simulated",
                        stats=_stats(db), per_iteration=(_stats(db),), checks=(Check("sqnr_db", db, bound),))


def _layers(*dbs: float) -> list[LayerFidelity]:
    out = [LayerFidelity("decoder", str(i), _stats(db), 30.0) for i, db in enumerate(dbs[:-1])]
    return [*out, LayerFidelity("decoder", TAIL, _stats(dbs[-1]), 30.0)]


def test_flips_grown_through_depth_are_reported_not_gated():
    fidelity = {"decoder": (_output(11.16, 11.38),)}
    excused, note = excuse_accumulated_flips(fidelity, _layers(55.0, 48.2, 61.0))
    assert excused["decoder"][0].passed and excused["decoder"][0].stats.sqnr_db == 11.16
    assert "11.16 dB" in note and "median token 48.2 dB" in note and "2 layers" in note


def test_a_failing_layer_keeps_the_whole_graph_gate():
    fidelity = {"decoder": (_output(11.16, 11.38),)}
    excused, note = excuse_accumulated_flips(fidelity, _layers(55.0, 12.0, 61.0))
    assert not excused["decoder"][0].passed and note == ""


def test_without_the_tail_nothing_is_excused():
    fidelity = {"decoder": (_output(11.16, 11.38),)}
    layers = [x for x in _layers(55.0, 48.0, 61.0) if x.layer != TAIL]
    assert excuse_accumulated_flips(fidelity, layers) == (fidelity, "")


def test_layer_verdict_uses_its_bound_and_finiteness():
    assert LayerFidelity("decoder", "0", _stats(30.0), 30.0).passed
    assert not LayerFidelity("decoder", "0", _stats(29.9), 30.0).passed
    bad = dataclasses.replace(_stats(90.0), nonfinite=1)
    assert not LayerFidelity("decoder", "0", bad, 30.0).passed


def test_one_flipped_token_does_not_fail_a_layer_but_a_wrong_channel_does():
    import numpy as np

    from qvlm_export.validate.layer_fidelity import median_token_sqnr_db

    rng = np.random.default_rng(0)
    want = rng.normal(size=(64, 32)) * 4
    flipped = want.copy()
    flipped[5, 3] += 26.0  # one element of one token one int8 step (a massive-activation step) off
    assert median_token_sqnr_db(want, flipped) > 140
    wrong = want.copy()
    wrong[:, 3] *= 4  # one channel x4 in every token
    assert median_token_sqnr_db(want, wrong) < 20
