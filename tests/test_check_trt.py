"""The static TensorRT Q/DQ checker: clean graphs pass, each hand-broken rule is named with its node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvlm_export.cli import main
from qvlm_export.engine.check_trt import RULES, check_model, check_path
from qvlm_export.errors import QvlmError

NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _init(name, array, elem_type=None):
    if elem_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, elem_type, array.shape, array.ravel().tolist())
    return numpy_helper.from_array(array, name)


def linear_model(weights="int8", act="int8", dtype=TensorProto.FLOAT, opset=21, k=16, n=8, block=8,
                 w_axis=None, scale_dtype=None, x_zp=0, x_zp_type=TensorProto.INT8, x_scale=0.05,
                 x_scale_shape=(), w_scale_fill=0.01, bias_dq=False, gemm=False, w_shape=None):
    """x -> [Q -> DQ] -> MatMul(., DQ(w)) -> Add(bias) with named nodes; keyword arguments break one thing."""
    fdt = NP[dtype]
    sdt = NP[scale_dtype or dtype]
    w_shape = w_shape or ((n, k) if gemm else (k, n))
    inits, nodes = [], []
    x = "x"
    if act == "int8":
        inits += [numpy_helper.from_array(np.full(x_scale_shape, x_scale, sdt), "x_scale"),
                  _init("x_zp", np.full(x_scale_shape, x_zp, helper.tensor_dtype_to_np_dtype(x_zp_type)), x_zp_type)]
        axis = {"axis": 1} if x_scale_shape else {}
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q", **axis),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="x_dq", **axis)]
        x = "xdq"
    rng = np.random.default_rng(0)
    if weights == "int8":
        axis = (0 if gemm else 1) if w_axis is None else w_axis
        codes = rng.integers(-127, 128, w_shape).astype(np.int8)
        scale = np.full(w_shape[axis], w_scale_fill, sdt)
        inits += [_init("w", codes), _init("w_scale", scale), _init("w_zp", np.zeros(w_shape[axis], np.int8))]
        nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="w_dq", axis=axis))
    else:  # int4 blocked along K (axis 0 of a MatMul B[K, N])
        axis = 0 if w_axis is None else w_axis
        codes = rng.integers(-8, 8, w_shape).astype(np.int8)
        s_shape = tuple(-(-d // block) if i == axis else d for i, d in enumerate(w_shape)) if block else (w_shape[axis],)
        inits += [_init("w", codes, TensorProto.INT4), _init("w_scale", np.full(s_shape, w_scale_fill, sdt)),
                  _init("w_zp", np.zeros(s_shape, np.int8), TensorProto.INT4)]
        nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="w_dq",
                                      axis=axis, **({"block_size": block} if block else {})))
    if bias_dq:
        inits += [_init("b_codes", np.arange(n, dtype=np.int32)), _init("b_scale", np.array(0.001, sdt))]
        nodes.append(helper.make_node("DequantizeLinear", ["b_codes", "b_scale"], ["bias"], name="bias_dq"))
    else:
        inits.append(_init("bias", np.linspace(-1, 1, n).astype(fdt)))
    if gemm:
        nodes.append(helper.make_node("Gemm", [x, "wdq", "bias"], ["y"], name="gemm", transB=1))
    else:
        nodes += [helper.make_node("MatMul", [x, "wdq"], ["mm"], name="matmul"),
                  helper.make_node("Add", ["mm", "bias"], ["y"], name="bias_add")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", dtype, [2, k])],
                              [helper.make_tensor_value_info("y", dtype, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def found(model) -> set[tuple[str, str]]:
    return {(v.node, v.rule) for v in check_model(model).violations}


@pytest.mark.parametrize("kwargs", [
    {"weights": "int8", "act": "int8"},                                    # W8A8 fp32
    {"weights": "int8", "act": "int8", "dtype": TensorProto.FLOAT16},      # W8A8 fp16
    {"weights": "int4", "act": None, "dtype": TensorProto.FLOAT16},        # W4A16
    {"weights": "int4", "act": None},                                      # W4A16, fp32 graph (ORT CPU)
    {"weights": "int8", "act": "int8", "gemm": True},                      # Gemm transB=1: channel axis 0
], ids=["w8a8", "w8a8-fp16", "w4a16-fp16", "w4a16-fp32", "w8a8-gemm"])
def test_clean_graphs_pass_and_are_valid_onnx(kwargs):
    model = linear_model(**kwargs)
    onnx.checker.check_model(model, full_check=True)
    report = check_model(model)
    assert report.violations == []
    assert report.qdq_nodes == (3 if kwargs.get("act") == "int8" else 1)


@pytest.mark.parametrize("kwargs, expected", [
    ({"x_zp": 3}, {("x_q", "zero-point-zero"), ("x_dq", "zero-point-zero")}),
    ({"w_scale_fill": 0.0}, {("w_dq", "scale-positive-constant")}),
    ({"w_scale_fill": -0.01, "weights": "int4", "act": None}, {("w_dq", "scale-positive-constant")}),
    ({"x_scale_shape": (16,)}, {("x_q", "activation-per-tensor"), ("x_dq", "activation-per-tensor")}),
    ({"w_axis": 0}, {("w_dq", "per-channel-weight-axis")}),
    ({"gemm": True, "w_axis": 1}, {("w_dq", "per-channel-weight-axis")}),
    ({"x_zp_type": TensorProto.UINT8, "x_zp": 0}, {("x_q", "quantized-type"), ("x_dq", "quantized-type")}),
    ({"scale_dtype": TensorProto.FLOAT, "dtype": TensorProto.FLOAT16},
     {("x_q", "scale-dtype"), ("x_dq", "scale-dtype"), ("w_dq", "scale-dtype")}),
    ({"bias_dq": True}, {("bias_dq", "no-dq-on-bias")}),
    ({"weights": "int4", "act": None, "opset": 19}, {("w_dq", "opset-21-for-int4")}),
    ({"weights": "int4", "act": "int8"}, {("x_q", "w4a8-not-trt")}),
    # int4 rules: odd last dim, 3-D weight, wrong blocked axis, int8 blocked, int4 activations
    ({"weights": "int4", "act": None, "w_shape": (16, 7)}, {("w_dq", "int4-weight-only-blocked")}),
    ({"weights": "int4", "act": None, "w_shape": (2, 16, 8), "w_axis": 1}, {("w_dq", "int4-weight-only-blocked")}),
    ({"weights": "int4", "act": None, "block": 0, "w_axis": 1}, {("w_dq", "int4-weight-only-blocked")}),
    ({"x_zp_type": TensorProto.INT4}, {("x_q", "int4-weight-only-blocked"), ("x_dq", "int4-weight-only-blocked")}),
    # K = 20 in blocks of 8: a ragged last block of 4 (SigLIP's fc2: K = 4304 in blocks of 128)
    ({"weights": "int4", "act": None, "k": 20}, {("w_dq", "int4-even-blocks")}),
], ids=["zero-point", "scale-zero", "scale-negative-int4", "act-per-channel", "matmul-axis", "gemm-axis", "uint8",
        "fp32-scale-in-fp16", "bias-dq", "opset19-int4", "w4a8", "int4-odd", "int4-3d", "int4-unblocked",
        "int4-activation", "int4-ragged"])
def test_each_broken_rule_names_node_and_rule(kwargs, expected):
    assert found(linear_model(**kwargs)) == expected


def test_blocked_scale_with_two_blocked_axes_is_reported():
    model = linear_model(weights="int4", act=None)
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    scale.CopyFrom(numpy_helper.from_array(np.full((2, 4), 0.01, np.float32), "w_scale"))  # K and N both blocked
    report = check_model(model)
    assert [(v.node, v.rule) for v in report.violations] == [("w_dq", "int4-weight-only-blocked")]
    assert "expected [2, 8]" in report.violations[0].detail


def test_runtime_scale_and_missing_zero_point_defaults():
    model = linear_model()
    scale = next(t for t in model.graph.initializer if t.name == "x_scale")
    model.graph.initializer.remove(scale)
    model.graph.input.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []))
    assert found(model) == {("x_q", "scale-positive-constant"), ("x_dq", "scale-positive-constant")}
    model = linear_model()
    q = next(n for n in model.graph.node if n.name == "x_q")
    del q.input[2]  # no zero point and no output_dtype: ONNX quantizes to uint8
    assert ("x_q", "quantized-type") in found(model)


def test_unnamed_nodes_are_labelled_by_op_and_output():
    model = linear_model(w_axis=0)
    for node in model.graph.node:
        node.name = ""
    assert found(model) == {("DequantizeLinear(wdq)", "per-channel-weight-axis")}


def test_violation_text_says_rule_node_and_fix():
    (violation,) = check_model(linear_model(weights="int4", act="int8"), name="decoder.onnx").violations
    text = str(violation)
    assert text.startswith("decoder.onnx: x_q [w4a8-not-trt]")
    assert "not a TensorRT format" in text and "W4A16" in text
    assert set(RULES) >= {v.rule for v in check_model(linear_model(x_zp=1)).violations}


def test_check_path_on_bundle_dir_and_cli_exit_codes(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    (bundle / "fp16").mkdir(parents=True)
    onnx.save(linear_model(), bundle / "vision.onnx")
    onnx.save(linear_model(dtype=TensorProto.FLOAT16), bundle / "fp16" / "vision.onnx")
    report = check_path(bundle)
    assert report.ok and report.graphs == ["fp16/vision.onnx", "vision.onnx"] and report.qdq_nodes == 6
    # a folder without manifest.json is an unverifiable bundle: a failed check unless --no-verify says so
    assert main(["check-trt", str(bundle), "--json", str(tmp_path / "r.json")]) == 1
    assert f"{bundle / 'manifest.json'}' is missing" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert main(["check-trt", str(bundle), "--no-verify", "--json", str(tmp_path / "r.json")]) == 0
    onnx.save(linear_model(w_axis=0), bundle / "decoder.onnx")
    assert main(["check-trt", str(bundle), "--no-verify"]) == 1
    out = capsys.readouterr().out
    assert "w_dq" in out and "per-channel-weight-axis" in out and "decoder.onnx" in out
    assert main(["check-trt", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(QvlmError, match="no .onnx files"):
        check_path(tmp_path / "empty")


def test_ragged_int4_block_message_and_the_one_block_case():
    [violation] = check_model(linear_model(weights="int4", act=None, k=4304, n=8, block=128)).violations
    assert violation.detail == ("int4 weight [4304, 8]: K = 4304 is not a multiple of block_size 128 "
                                "(a ragged last block of 80); TensorRT's parser rejects it")
    # K <= block is one block covering K, which the parser infers correctly; K a multiple of 128 is fine
    assert check_model(linear_model(weights="int4", act=None, k=96, n=8, block=128)).violations == []
    assert check_model(linear_model(weights="int4", act=None, k=4352, n=8, block=128)).violations == []
