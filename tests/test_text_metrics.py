"""Perplexity / next-token agreement maths and the absolute bounds of the thresholds file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.evaluate.text import (
    TextScores,
    TextSpec,
    compare_text,
    english_text,
    log_softmax_nll,
    score_text,
    text_windows,
)
from qvlm_export.validate.stats import ErrorStats
from qvlm_export.validate.text_parity import TextReference, text_parity
from qvlm_export.validate.thresholds import load_thresholds, thresholds_from_dict


def test_nll_equals_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 50)).astype(np.float32) * 5
    targets = rng.integers(0, 50, size=(2, 7))
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double().reshape(-1, 50),
                                             torch.from_numpy(targets).reshape(-1), reduction="none")
    np.testing.assert_allclose(log_softmax_nll(logits, targets).ravel(), want.numpy(), rtol=1e-12, atol=1e-12)


def test_score_text_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    windows = np.arange(12).reshape(2, 6) % 5
    scores = score_text(lambda ids: np.zeros((*ids.shape, 5), dtype=np.float32), windows)
    assert scores.nll.shape == (2, 5)  # the first position of a window is not scored
    assert scores.perplexity == pytest.approx(5.0, rel=1e-12)


def test_compare_text_ratio_and_agreement():
    rng = np.random.default_rng(1)
    ref = TextScores(nll=rng.uniform(1, 4, size=(4, 128)), top1=rng.integers(0, 100, size=(4, 128)))
    same = compare_text(ref, ref)
    assert same.perplexity_ratio == pytest.approx(1.0) and same.agreement == 1.0
    assert same.ratio_interval == pytest.approx((1.0, 1.0))
    top1 = ref.top1.copy()
    top1[:, ::4] += 1  # a quarter of the argmaxes differ
    worse = compare_text(ref, TextScores(nll=ref.nll + 0.1, top1=top1))
    assert worse.perplexity_ratio == pytest.approx(math.exp(0.1), rel=1e-9)
    assert worse.agreement == pytest.approx(0.75)
    lo, hi = worse.ratio_interval
    assert lo == pytest.approx(math.exp(0.1), rel=1e-9) and hi == pytest.approx(math.exp(0.1), rel=1e-9)
    assert worse.agreement_interval[0] <= 0.75 <= worse.agreement_interval[1]


def test_the_corpus_is_real_english_text_on_this_machine():
    text = english_text()
    assert "Apache License" in text and "GNU GENERAL PUBLIC LICENSE" in text
    assert len(text.split()) > 5000


def test_a_toy_tokenizer_is_refused_with_a_reason():
    from qvlm_export.load.model import load_vlm

    tokenizer = load_vlm().tokenizer  # the embedded model's 39-word vocabulary
    with pytest.raises(QvlmError, match="natural-language tokenizer"):
        text_windows(tokenizer)


def test_windows_refuse_more_tokens_than_the_text_has():
    class Chars:  # one token per character, no BOS
        unk_token_id = None
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    windows = text_windows(Chars(), TextSpec(tokens=64, window=16), text="x" * 100)
    assert windows.shape == (4, 16)
    with pytest.raises(QvlmError, match="fewer than"):
        text_windows(Chars(), TextSpec(tokens=256, window=16), text="x" * 100)


def test_absolute_bounds_are_packaged_and_merged_over_relative_ones():
    packaged = load_thresholds()
    assert packaged.absolute_bounds("w8a8")["max_perplexity_ratio"] == 1.1
    assert packaged.absolute_bounds("w4a16")["max_perplexity_ratio"] == 1.25
    t = thresholds_from_dict({
        "precisions": {"w8a8": {"faithful": {"default": {"cosine": 0.5, "sqnr_db": 3}},
                                "task": {"min_identical_answers": 0.1}}},
        "absolute": {"default": {"min_cosine": 0.9, "min_identical_answers": 0.8}}})
    stats = ErrorStats(max_abs=1.0, mean_abs=0.1, median_abs=0.05, p99_abs=0.5, cosine=0.555, sqnr_db=-0.07, nonfinite=0)
    checks = {c.stat: c for c in t.check("w8a8", "faithful", "decoder", "logits", stats)}
    assert checks["cosine"].bound == 0.9 and not checks["cosine"].passed  # RTN-like bounds alone would pass it
    assert checks["sqnr_db"].passed is False
    assert t.check("w8a8", "drift", "decoder", "logits", stats) == []  # drift is not against FP
    assert t.task_bounds("w8a8")["min_identical_answers"] == 0.8


def test_text_parity_fails_a_candidate_far_from_fp():
    t = thresholds_from_dict({"precisions": {}, "absolute": {"default": {"max_perplexity_ratio": 1.25,
                                                                         "min_next_token_agreement": 0.75}}})
    rng = np.random.default_rng(2)
    ref = TextScores(nll=rng.uniform(1, 4, size=(2, 256)), top1=rng.integers(0, 9, size=(2, 256)))
    far = TextScores(nll=ref.nll + math.log(2.2), top1=(ref.top1 + (rng.random((2, 256)) < 0.5)))
    parity = text_parity("faithful", TextReference(windows=None, scores=ref), far, "w8a8", t)
    assert not parity.passed
    assert {c.stat for c in parity.checks if not c.passed} == {"perplexity_ratio", "next_token_agreement"}
    assert parity.comparison.perplexity_ratio == pytest.approx(2.2, rel=1e-9)
    near = text_parity("faithful", TextReference(windows=None, scores=ref),
                       TextScores(nll=ref.nll + 0.01, top1=ref.top1), "w8a8", t)
    assert near.passed


@pytest.mark.parametrize("bad", [{"default": {"max_perplexity": 1.2}}, {"w8a8": {"min_cosine": "high"}}, [1]])
def test_bad_absolute_sections_are_refused(bad):
    with pytest.raises(QvlmError, match="absolute"):
        thresholds_from_dict({"precisions": {}, "absolute": bad})
