"""Tiny hand-built ONNX graphs for validation tests: an FP two-layer MLP and its W8A8 QDQ copy."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN, HIDDEN, OUT = 64, 64, 32


def mlp_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((IN, HIDDEN)).astype(np.float32) / 8,
            rng.standard_normal((HIDDEN, OUT)).astype(np.float32) / 8)


def _io(name: str, dim: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", dim])


def _model(nodes, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "mlp", [_io("x", IN)], [_io("y", OUT), _io("h", HIDDEN)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def fp_mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Relu", ["m1"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    return _model(nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])


def _quant_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output channel (axis 1 of [K, N])
    return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


def w8a8_mlp(w1: np.ndarray, w2: np.ndarray, x_scale: float, h_scale: float,
             broken_scale: tuple[int, int, float] | None = None) -> onnx.ModelProto:
    """QDQ MLP; ``broken_scale=(layer, channel, factor)`` multiplies one weight scale (a deliberate bug)."""
    inits, dq = [], {}
    for i, (w, act, s_act) in enumerate(((w1, "x", x_scale), (w2, "h", h_scale)), start=1):
        codes, scale = _quant_weight(w)
        if broken_scale is not None and broken_scale[0] == i:
            scale = scale.copy()
            scale[broken_scale[1]] *= broken_scale[2]
        inits += [numpy_helper.from_array(codes, f"w{i}_q"), numpy_helper.from_array(scale, f"w{i}_s"),
                  numpy_helper.from_array(np.zeros_like(codes[0]), f"w{i}_zp"),
                  numpy_helper.from_array(np.float32(s_act), f"{act}_s"), numpy_helper.from_array(np.int8(0), f"{act}_zp")]
        dq[i] = [helper.make_node("QuantizeLinear", [act, f"{act}_s", f"{act}_zp"], [f"{act}_q"]),
                 helper.make_node("DequantizeLinear", [f"{act}_q", f"{act}_s", f"{act}_zp"], [f"{act}_dq"]),
                 helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_zp"], [f"w{i}_dq"], axis=1)]
    nodes = [*dq[1], helper.make_node("MatMul", ["x_dq", "w1_dq"], ["m1"]), helper.make_node("Relu", ["m1"], ["h"]),
             *dq[2], helper.make_node("MatMul", ["h_dq", "w2_dq"], ["y"])]
    return _model(nodes, inits)


def feeds(n: int, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, IN)).astype(np.float32)} for _ in range(n)]


def activation_scales(w1: np.ndarray, data: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    x = np.concatenate([d["x"] for d in data])
    return float(np.abs(x).max() / 127), float(np.abs(np.maximum(x @ w1, 0)).max() / 127)
