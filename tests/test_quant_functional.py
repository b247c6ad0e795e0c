"""Quantizer maths against hand-computed values (quant/functional.py)."""

from __future__ import annotations

import math

import pytest
import torch

from qvlm_export.quant import functional as F

X = torch.tensor([[-1.0, 0.5], [0.25, 3.5]])


@pytest.mark.parametrize("bits,symmetric,expected", [
    (2, True, (-2, 1)), (3, True, (-4, 3)), (4, True, (-8, 7)), (8, True, (-128, 127)),
    (2, False, (0, 3)), (4, False, (0, 15)), (8, False, (0, 255)),
])
def test_qrange(bits, symmetric, expected):
    assert F.qrange(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [1, 9])
def test_qrange_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="2..8"):
        F.qrange(bits, True)


def test_symmetric_per_tensor_4bit_by_hand():
    scale, zp = F.choose_qparams(X, 4, True, "tensor")
    assert scale.item() == pytest.approx(3.5 / 7) and zp.item() == 0
    q = F.quantize(X, scale, zp, 4, True, "tensor")
    # -1/0.5 = -2, 0.5/0.5 = 1, 0.25/0.5 = 0.5 -> 0 (half to even), 3.5/0.5 = 7
    assert q.tolist() == [[-2, 1], [0, 7]]
    assert F.dequantize(q, scale, zp, "tensor").tolist() == [[-1.0, 0.5], [0.0, 3.5]]


def test_symmetric_per_tensor_8bit_scale():
    scale, _ = F.choose_qparams(X, 8, True, "tensor")
    assert scale.item() == pytest.approx(3.5 / 127)
    assert F.quantize(X, scale, torch.tensor(0), 8).tolist() == [[-36, 18], [9, 127]]


def test_asymmetric_per_tensor_2bit_by_hand():
    scale, zp = F.choose_qparams(X, 2, False, "tensor")
    # range [-1, 3.5] on codes 0..3: scale 1.5, zero point 0 - round(-1/1.5) = 1
    assert scale.item() == pytest.approx(1.5) and zp.item() == 1
    q = F.quantize(X, scale, zp, 2, False, "tensor")
    assert q.tolist() == [[0, 1], [1, 3]]
    assert torch.allclose(F.dequantize(q, scale, zp, "tensor"), torch.tensor([[-1.5, 0.0], [0.0, 3.0]]))


def test_per_channel_3bit_by_hand():
    scale, zp = F.choose_qparams(X, 3, True, "channel")
    assert scale.tolist() == pytest.approx([1 / 3, 3.5 / 3]) and scale.shape == (2,)
    q = F.quantize(X, scale, zp, 3, True, "channel")
    # row 0: -3, 1.5 -> 2; row 1: 0.214 -> 0, 3
    assert q.tolist() == [[-3, 2], [0, 3]]


def test_per_group_with_ragged_last_group_by_hand():
    w = torch.tensor([[0.25, -3.5, 7.0, 2.5, -1.75], [0.0, 0.0, 3.5, -0.75, 3.5]])
    scale, zp = F.choose_qparams(w, 4, True, "group", group_size=2)
    assert scale.shape == (2, 3) and zp.shape == (2, 3) and int(zp.abs().max()) == 0
    # groups {0,1}, {2,3}, {4} (ragged): absmax / 7, an all-zero group gets the eps floor
    assert torch.allclose(scale, torch.tensor([[0.5, 1.0, 0.25], [1e-8, 0.5, 0.5]]))
    q = F.quantize(w, scale, zp, 4, True, "group", group_size=2)
    # 0.25/0.5 = 0.5 -> 0 and 2.5/1 -> 2 and -0.75/0.5 = -1.5 -> -2 (half to even)
    assert q.tolist() == [[0, -7, 7, 2, -7], [0, 0, 7, -2, 7]]
    assert F.expand_param(scale, w.shape, "group", 2).shape == w.shape
    deq = F.dequantize(q, scale, zp, "group", group_size=2)
    assert torch.equal(deq, torch.tensor([[0.0, -3.5, 7.0, 2.0, -1.75], [0.0, 0.0, 3.5, -1.0, 3.5]]))


def test_ragged_group_range_ignores_padding():
    lo, hi = F.reduce_minmax(torch.tensor([[1.0, 2.0, 3.0]]), "group", group_size=2)
    assert lo.tolist() == [[1.0, 3.0]] and hi.tolist() == [[2.0, 3.0]]


@pytest.mark.parametrize("granularity,shape", [("tensor", ()), ("channel", (6,)), ("group", (6, 3))])
def test_param_shapes_per_granularity(granularity, shape):
    w = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))
    scale, zp = F.choose_qparams(w, 4, True, granularity, group_size=8)
    assert tuple(scale.shape) == shape and tuple(zp.shape) == shape


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_roundtrip_error_is_at_most_half_a_step(bits, symmetric, granularity):
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(bits))
    scale, zp = F.choose_qparams(w, bits, symmetric, granularity, group_size=16)
    q = F.quantize(w, scale, zp, bits, symmetric, granularity, 16)
    qmin, qmax = F.qrange(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (F.dequantize(q, scale, zp, granularity, 16) - w).abs()
    step = F.expand_param(scale, w.shape, granularity, 16)
    assert bool((err <= step / 2 + 1e-6).all())
    assert F.sqnr_db(w, F.dequantize(q, scale, zp, granularity, 16)) > 6.02 * bits - 12


def test_round_half_to_even_like_onnx():
    q = F.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), torch.tensor(1.0), torch.tensor(0), 8)
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_ste_gradient_passes_inside_range_and_stops_outside():
    x = torch.tensor([0.3, -2.6, 10.0, -20.0], requires_grad=True)
    F.fake_quantize(x, torch.tensor(1.0), torch.tensor(0), 4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_lsq_scale_gradient_by_hand():
    x = torch.tensor([0.3, 10.0])
    s = torch.tensor(1.0, requires_grad=True)
    out = F.fake_quantize(x, s, torch.tensor(0), 4)
    assert out.tolist() == pytest.approx([0.0, 7.0])
    out.sum().backward()
    # d/ds: round(x/s) - x/s inside the range (-0.3), the clamp level outside (7);
    # LSQ gradient scale 1/sqrt(N * qmax) = 1/sqrt(2 * 7)
    assert s.grad.item() == pytest.approx((7 - 0.3) / math.sqrt(14), rel=1e-5)


def test_adaround_h_and_init():
    assert F.adaround_h(torch.tensor([0.0, 50.0, -50.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])
    w, s = torch.tensor([[0.3, 1.75, -0.4]]), torch.tensor([1.0])
    v = F.adaround_init(w, s, "channel")
    # h(v) reproduces the fractional part of w / s: 0.3, 0.75, 0.6 (floor(-0.4) = -1)
    assert torch.allclose(F.adaround_h(v), torch.tensor([[0.3, 0.75, 0.6]]), atol=1e-5)
    soft = F.adaround_weight(w, v, s, torch.tensor([0]), 4, granularity="channel")
    assert torch.allclose(soft, w, atol=1e-5)


def test_adaround_hard_decision_at_init_is_round_to_nearest():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    scale, zp = F.choose_qparams(w, 4, True, "group", group_size=8)
    v = F.adaround_init(w, scale, "group", 8)
    codes = F.adaround_codes(w, v, scale, zp, 4, True, "group", 8)
    assert torch.equal(codes, F.quantize(w, scale, zp, 4, True, "group", 8))
    hard = F.adaround_weight(w, v, scale, zp, 4, True, "group", 8, hard=True)
    assert torch.equal(hard, F.dequantize(codes, scale, zp, "group", 8))


def test_adaround_regularizer_by_hand():
    v = torch.tensor([0.0, 50.0, -50.0])  # h = 0.5, 1, 0
    assert F.adaround_regularizer(v, beta=2.0).item() == pytest.approx(1.0)


def test_sqnr_by_hand():
    assert F.sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(20.0)
    assert F.sqnr_db(torch.ones(3), torch.ones(3)) == float("inf")
