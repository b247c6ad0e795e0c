"""Interval and paired-test code against published and closed-form values."""

import math

import pytest
import torch

from qvlm_export.evaluate.accuracy import score
from qvlm_export.evaluate.intervals import mcnemar_p, paired_difference_interval, sqnr_interval, wilson_interval
from qvlm_export.quant.functional import sqnr_db


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=6e-5) and got[1] == pytest.approx(hi, abs=6e-5)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(465, 500)  # 93% of 500: about +-2.3 points, as the results table says
    assert 0.90 < lo < 0.93 < hi < 0.955 and (hi - lo) / 2 == pytest.approx(0.0224, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(6, 5)


def test_mcnemar_exact_values():
    a = [True] * 5 + [False] * 1 + [True] * 10
    b = [False] * 5 + [True] * 1 + [True] * 10
    assert mcnemar_p(a, b) == pytest.approx(2 * 7 / 64)  # 5 vs 1 discordant: 2 * P(X <= 1 | n=6)
    assert mcnemar_p(a, a) == 1.0
    assert mcnemar_p([True] * 12, [False] * 12) == pytest.approx(2 / 2**12)


def test_paired_difference_interval():
    same = [True, False] * 50
    assert paired_difference_interval(same, same) == (0.0, 0.0)
    assert paired_difference_interval([True] * 40, [False] * 40) == (1.0, 1.0)
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(500, generator=gen) < 0.93).tolist()
    b = [x if torch.rand(1, generator=gen) > 0.05 else not x for x in a]
    lo, hi = paired_difference_interval(a, b)
    d = torch.tensor([float(x) - float(y) for x, y in zip(a, b)])
    half = 1.96 * float(d.std()) / math.sqrt(len(d))
    assert lo < float(d.mean()) < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_sqnr_interval_brackets_the_point_estimate():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(200, 64, generator=gen)
    approx = ref + 0.1 * torch.randn(200, 64, generator=gen)
    lo, hi = sqnr_interval(ref, approx)
    point = sqnr_db(ref, approx)
    assert lo < point < hi and hi - lo < 1.0 and point == pytest.approx(20.0, abs=0.3)


def test_score_keeps_per_question_correctness():
    from qvlm_export.data.synthetic import Sample

    samples = [Sample(image=None, question="q", answer=a, qtype="t") for a in ("red", "blue", "two")]
    result = score(samples, ["Red.", "green", "two"])
    assert result.correct == [True, False, True] and result.n == 3
    assert result.interval() == wilson_interval(2, 3)


def test_paired_sqnr_difference():
    from qvlm_export.evaluate.intervals import paired_sqnr_difference_interval, pooled_sqnr_db, sqnr_terms

    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(300, 32, generator=gen)
    a = ref + 0.05 * torch.randn(300, 32, generator=gen)
    b = ref + 0.10 * torch.randn(300, 32, generator=gen)
    signal, noise_a = sqnr_terms(ref, a)
    _, noise_b = sqnr_terms(ref, b)
    assert pooled_sqnr_db(signal, noise_a) == pytest.approx(sqnr_db(ref, a), abs=1e-9)
    lo, hi = paired_sqnr_difference_interval(signal, noise_a, noise_b)
    assert lo < 20 * math.log10(2) < hi and lo > 5  # halving the noise amplitude: +6.02 dB
    assert paired_sqnr_difference_interval(signal, noise_a, noise_a) == (0.0, 0.0)
