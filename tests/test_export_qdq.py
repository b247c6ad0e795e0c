"""The QDQ maths and the lowering pass on hand-built one-Linear graphs (no torch.export: fast)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qvlm_export.errors import QvlmError
from qvlm_export.export.passes import DEFAULT_PASSES, PassContext, run_passes
from qvlm_export.export.qdq import activation_scale, weight_qdq
from qvlm_export.export.qlinear import QDOMAIN, QOP, translation_table
from qvlm_export.quant.modules import QuantLinear, rtn_layer
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.runtime.ort_runner import session_options

N, K = 8, 40  # K not a multiple of the group: a ragged last block


def layer(setting: str, group: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    weight = torch.randn(N, K)
    recipe = recipe_from_dict({"method": "rtn", "setting": setting, "weights": {"group_size": group}})
    scale = torch.tensor(0.02) if recipe.activations.bits else None
    return weight, rtn_layer(weight, recipe, input_scale=scale)


def dequantized(w) -> np.ndarray:
    """What DequantizeLinear computes from the exported operands (independent re-implementation)."""
    codes, scale = w.codes.astype(np.float32), w.scale.astype(np.float32)
    if w.block_size:
        scale = np.repeat(scale, w.block_size, axis=0)[: codes.shape[0]]
    return codes * scale


@pytest.mark.parametrize(("setting", "container", "axis"), [("w8a8", np.int8, 1), ("w4a16", ml_dtypes.int4, 0),
                                                             ("w3a16", ml_dtypes.int4, 0), ("w4a8", ml_dtypes.int4, 0)])
def test_weight_operands_reproduce_the_state_exactly(setting, container, axis):
    _, lq = layer(setting)
    w = weight_qdq(lq, np.dtype(np.float32))
    assert w.codes.dtype == np.dtype(container) and w.codes.shape == (K, N) and w.axis == axis
    assert np.array_equal(dequantized(w), lq.dequantized_weight().numpy().T)  # bit-exact, incl. 3-bit codes
    if axis == 0:
        assert w.block_size == 16 and w.scale.shape == (3, N)
        assert w.stored_bytes() == K * N // 2 + 3 * N * 4
    else:
        assert w.block_size is None and w.scale.shape == (N,) and w.stored_bytes() == K * N + N * 4
    assert weight_qdq(lq, np.dtype(np.float16)).scale.dtype == np.float16


def test_bad_layers_are_refused():
    _, lq = layer("w4a16")
    lq.weight_codes[0, 0] = 9
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        weight_qdq(lq, np.dtype(np.float32))
    _, lq = layer("w8a8")
    lq.act_bits = 6
    with pytest.raises(ValueError, match="6-bit activations"):
        activation_scale(lq, np.dtype(np.float32))


def qlinear_graph(weight: np.ndarray, name: str = "fc") -> onnx.ModelProto:
    """x[?, K] -> qvlm.QLinear(x, W[N, K], layer=name) -> Add(bias) -> y: what tracing a MarkedLinear yields."""
    translation_table()  # registers the qvlm.QLinear schema
    nodes = [helper.make_node(QOP, ["x", "w"], ["mm"], domain=QDOMAIN, layer=name, name="q"),
             helper.make_node("Add", ["mm", "bias"], ["y"], name="bias_add")]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.linspace(-1, 1, N, dtype=weight.dtype), "bias")]
    ftype = TensorProto.FLOAT16 if weight.dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", ftype, ["b", K])],
                              [helper.make_tensor_value_info("y", ftype, ["b", N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(QDOMAIN, 1)])


@pytest.mark.parametrize("setting", ["fp", "w8a8", "w4a16", "w3a16"])
def test_lowered_graph_computes_the_simulated_linear(setting):
    weight, lq = layer("w8a8" if setting == "fp" else setting)
    simulated = QuantLinear(lq, torch.linspace(-1, 1, N)) if setting != "fp" else None
    traced = weight if setting == "fp" else simulated.weight
    model = qlinear_graph(traced.numpy())
    # ragged_int4="int4": this test is about ONNX's ragged last block (ONNX Runtime runs it; export's
    # default keeps such layers in float for TensorRT, tests/test_export_ragged.py)
    ctx = PassContext(np.dtype(np.float32), {} if setting == "fp" else {"fc": lq}, ragged_int4="int4")
    run_passes(model, ctx, DEFAULT_PASSES, "test")
    onnx.checker.check_model(model, full_check=True)
    assert ctx.lowered == ["fc"] and all(n.domain == "" for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""]
    x = torch.randn(5, K) * 0.5
    session = ort.InferenceSession(model.SerializeToString(), session_options("faithful", 1))
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = (x @ weight.T + torch.linspace(-1, 1, N)) if setting == "fp" else simulated(x)
    assert np.abs(got - want.numpy()).max() < 1e-5
    bits = {"fp": 32, "w8a8": 8, "w4a16": 4, "w3a16": 4}[setting]
    assert ctx.linear_fp16_bytes == N * K * 2 and ctx.linear_bytes <= N * K * bits / 8 + 3 * N * 4
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == (1 if setting == "w8a8" else 0)


def test_mapping_check_names_the_pass_and_graph():
    _, lq = layer("w8a8")
    model = qlinear_graph(lq.dequantized_weight().numpy() * 1.01)  # not the state's weight: wrong mapping
    with pytest.raises(QvlmError, match=r"export pass lower_linears failed on the decoder graph: layer 'fc'.*mapping"):
        run_passes(model, PassContext(np.dtype(np.float32), {"fc": lq}), DEFAULT_PASSES, "decoder")
    model = qlinear_graph(np.zeros((N + 1, K), np.float32))
    with pytest.raises(QvlmError, match="made for another model"):
        run_passes(model, PassContext(np.dtype(np.float32), {"fc": lq}), DEFAULT_PASSES, "vision")
