"""The one module of quantization primitives (quant/primitives.py), against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlm_export.quant import functional as F
from qvlm_export.quant.primitives import absmax_scale, grouped, qrange, round_clamp, sum_over_units


def test_functional_reads_its_range_and_rounding_from_the_primitives():
    assert F.qrange is qrange and F.round_clamp is round_clamp and F.grouped is grouped
    assert qrange(4, True) == (-8, 7) and qrange(3, False) == (0, 7)


def test_absmax_scale():
    assert absmax_scale(2.54, 8).dtype == torch.float32
    assert float(absmax_scale(2.54, 8)) == float(np.float32(2.54) / np.float32(127))
    assert float(absmax_scale(0.0, 4)) == float(np.float32(1e-8) / np.float32(7))  # never a zero step


def test_round_clamp_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0])
    assert round_clamp(x, -128, 127).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0]
    z = torch.tensor(3.0)
    assert round_clamp(torch.tensor([0.4, 13.0, -20.0]), 0, 15, z).tolist() == [3.0, 15.0, 0.0]


def test_grouped_and_sum_over_units_pad_ragged_groups_with_zeros():
    w = torch.arange(1.0, 11.0).reshape(2, 5)
    g = grouped(w, 2)
    assert g.shape == (2, 3, 2) and g[0, 2].tolist() == [5.0, 0.0] and g[1, 0].tolist() == [6.0, 7.0]
    assert sum_over_units(w, "group", 2).tolist() == [[3.0, 7.0, 5.0], [13.0, 17.0, 10.0]]
    assert sum_over_units(w, "channel").tolist() == [15.0, 40.0]
    assert float(sum_over_units(w, "tensor")) == 55.0


@pytest.mark.parametrize("in_f", [64, 70])
def test_awq_clip_ratio_does_not_depend_on_the_input_layout(in_f):
    """awq_clip_ratio groups through the primitives; a transposed (non-contiguous) input gives the same bits."""
    from qvlm_export.search.algorithms import awq_clip_ratio

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, in_f, generator=gen)
    x = torch.randn(in_f, 40, generator=gen)
    a = awq_clip_ratio(w, x.t(), 4, 32)
    b = awq_clip_ratio(w, x.t().contiguous(), 4, 32)
    assert a.shape == (8, 3 if in_f == 70 else 2) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {float(np.float32(1 - i / 20)) for i in range(10)}
