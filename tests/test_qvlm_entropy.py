"""Q-VLM's entropy proxy, dependency and partition on hand-made inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.search.qvlm import entropy as E
from qvlm_export.search.qvlm.config import config_from_args
from qvlm_export.search.qvlm.partition import partition_units


def h2(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_entropy_of_uniform_and_point_masses():
    assert E.entropy(torch.tensor([-2, -1, 0, 1] * 25), bits=4) == pytest.approx(2.0, abs=1e-12)
    assert E.entropy(torch.full((50,), 3), bits=4) == 0.0
    # p = (1/2, 1/4, 1/4): 1.5 bits
    assert E.entropy(torch.tensor([0, 0, 1, 2] * 10), bits=8) == pytest.approx(1.5, abs=1e-12)


def test_entropy_ignores_masked_tokens():
    codes = torch.tensor([[[0, 1], [5, 5]], [[2, 3], [7, 7]]])  # [batch 2, tokens 2, channels 2]
    mask = torch.tensor([[True, False], [True, False]])
    assert E.entropy(codes, bits=4, mask=mask) == pytest.approx(2.0, abs=1e-12)  # codes 0,1,2,3 once each


def test_conditional_entropy_known_values():
    a = torch.tensor([0, 1] * 400)
    assert E.conditional_entropy(a, a.clone(), bits=4) == pytest.approx(0.0, abs=1e-12)  # determined
    assert E.conditional_entropy(a, -a, bits=4) == pytest.approx(0.0, abs=1e-12)  # any bijection
    # Independent: b uniform on 4 values for each a -> H(b|a) = H(b) = 2 bits.
    a_ind = torch.tensor([0, 1]).repeat_interleave(4).repeat(50)
    b_ind = torch.tensor([0, 1, 2, 3]).repeat(2).repeat(50)
    assert E.conditional_entropy(a_ind, b_ind, bits=4) == pytest.approx(2.0, abs=1e-12)
    # Binary symmetric channel with flip probability 1/4: H(b|a) = h2(1/4) = 0.8113 bits.
    a_bsc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]).repeat(25)
    b_bsc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0]).repeat(25)
    assert E.conditional_entropy(a_bsc, b_bsc, bits=2) == pytest.approx(h2(0.25), abs=1e-12)


def test_joint_histogram_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="one shape"):
        E.joint_histogram(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), bits=4)


def test_probe_codes_clamp_and_round():
    codes = E.probe_codes(torch.tensor([-10.0, -0.26, 0.24, 0.76, 10.0]), 0.5, bits=4)
    assert codes.tolist() == [-8, -1, 0, 2, 7]


def test_soft_entropy_matches_hard_entropy_on_integral_codes_and_has_gradient():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0] * 25)
    assert float(E.soft_entropy(x, torch.tensor(1.0), 4)) == pytest.approx(2.0, abs=1e-6)
    # Off-grid inputs: the gradient w.r.t. the step is finite and pushes towards fewer levels.
    y = torch.linspace(-3.3, 3.3, 401)
    step = torch.tensor(0.7, requires_grad=True)
    h = E.soft_entropy(y, step, 4)
    h.backward()
    assert 2.5 < float(h.detach()) < 4.0
    assert float(step.grad) < 0  # a larger step merges codes: entropy decreases


def test_partition_threshold_depth_and_stacks():
    stacks = ["vision"] * 4 + ["projector"] + ["decoder"] * 4
    dep = [0.9, 0.9, 0.9, None, None, 0.2, 0.6, 0.6]
    assert partition_units(stacks, dep, p=0.5, max_depth=3) == [[0, 1, 2], [3], [4], [5], [6, 7, 8]]
    assert partition_units(stacks, dep, p=0.5, max_depth=2) == [[0, 1], [2, 3], [4], [5], [6, 7], [8]]
    assert partition_units(stacks, dep, p=0.7, max_depth=3) == [[0, 1, 2], [3], [4], [5], [6], [7], [8]]
    assert partition_units(stacks, dep, p=1.0, max_depth=3) == [[i] for i in range(9)]  # layer-wise
    # threshold is strict: d == p does not join
    assert partition_units(["v", "v"], [0.5], p=0.5, max_depth=3) == [[0], [1]]
    for blocks in (partition_units(stacks, dep, p=0.0, max_depth=d) for d in (1, 2, 3, 4)):
        assert sorted(i for b in blocks for i in b) == list(range(9))
        assert all(len({stacks[i] for i in b}) == 1 for b in blocks)  # never across a stack boundary
    assert max(len(b) for b in partition_units(stacks, dep, p=0.0, max_depth=4)) == 4


def test_config_rejects_bad_options_with_one_line():
    with pytest.raises(QvlmError, match="unknown Q-VLM option 'depth'"):
        config_from_args({"depth": 3})
    with pytest.raises(QvlmError, match="p must be in"):
        config_from_args({"p": 1.5})
    assert config_from_args({"beta": [10, 2]}).beta == (10.0, 2.0)
