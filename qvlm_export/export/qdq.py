"""Graph passes that turn marked float MatMul weights into QDQ with real integer initializers.

Input: an ONNX graph whose quantized Linears are ``MatMul(X, W)`` with ``W`` a named
``[K, N]`` float initializer (see :mod:`.linear`), and the quant state's layers keyed by
those initializer names. Output (DESIGN sections 5-6, the rules ``check-trt`` enforces):

* weight ``bits > 4``: int8 initializer ``[K, N]`` -> ``DequantizeLinear(axis=1)`` (output
  channel; no axis for a per-tensor scale);
* weight ``bits <= 4``: int4 initializer ``[K, N]`` -> ``DequantizeLinear(axis=0,
  block_size=G)`` for groups along K (3-bit codes fit int4 exactly);
* activations (``act_bits == 8``): ``QuantizeLinear -> DequantizeLinear`` on ``X`` with a
  scalar scale and an int8 zero point 0;
* no Q/DQ on biases, nothing touched outside the listed MatMuls;
* scales in the graph's float type (fp16 graph -> fp16 scales).

Preconditions are checked and a failure names the pass and the layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import QvlmError
from ..quant.state import LayerQuant

PASS = "qdq"


@dataclass(frozen=True)
class QuantizedWeight:
    """The integer initializer, its scale and the DequantizeLinear attributes of one weight."""

    codes: np.ndarray  # [K, N] int8 values (int4 range when container == "int4")
    scale: np.ndarray  # [] | [N] | [ceil(K/G), N]
    container: str  # "int8" | "int4"
    axis: int | None
    block_size: int | None


def quantized_weight(layer: LayerQuant) -> QuantizedWeight:
    """Transpose a quant-state layer (``[N, K]`` codes) to the ``[K, N]`` ONNX layout."""
    if not layer.symmetric or bool((layer.weight_zero_point != 0).any()):
        raise QvlmError("asymmetric weights (non-zero zero points) are not deployable: TensorRT needs zero point 0; "
                        "re-quantize with weights.symmetric: true")
    codes = layer.weight_codes.to(dtype=layer.weight_codes.dtype).numpy().astype(np.int8).T
    scale = layer.weight_scale.float().numpy()
    container = "int4" if layer.weight_bits <= 4 else "int8"
    if layer.granularity == "tensor":
        return QuantizedWeight(np.ascontiguousarray(codes), scale.reshape(()), container, None, None)
    if layer.granularity == "channel":
        return QuantizedWeight(np.ascontiguousarray(codes), scale.reshape(-1), container, 1, None)
    return QuantizedWeight(np.ascontiguousarray(codes), np.ascontiguousarray(scale.T), container, 0, layer.group_size)


def _tensor(array: np.ndarray, name: str, container: str | None = None) -> onnx.TensorProto:
    if container == "int4":
        import ml_dtypes

        return numpy_helper.from_array(array.astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _consumers(graph: onnx.GraphProto, name: str) -> list[tuple[int, onnx.NodeProto]]:
    return [(i, n) for i, n in enumerate(graph.node) if name in n.input]


def float_type(graph: onnx.GraphProto) -> np.dtype:
    """The graph's compute float type, read from its float initializers (fp16 bundle -> float16)."""
    kinds = {t.data_type for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    return np.dtype(np.float16) if kinds == {TensorProto.FLOAT16} else np.dtype(np.float32)


def quantize_matmul_weights(model: onnx.ModelProto, layers: Mapping[str, LayerQuant]) -> dict[str, dict[str, int]]:
    """Apply the QDQ pass in place to ``model`` for ``layers`` keyed by initializer name.

    Returns per initializer ``{"stored", "fp16"}`` byte counts (integer codes + scales vs fp16).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dtype = float_type(graph)
    sizes: dict[str, dict[str, int]] = {}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for name in sorted(layers):
        layer = layers[name]
        if name not in inits:
            raise QvlmError(f"export pass {PASS!r}: weight {name!r} is not an initializer of the graph; "
                            "re-export from the model the quant state was made for")
        users = _consumers(graph, name)
        if len(users) != 1 or users[0][1].op_type != "MatMul" or list(users[0][1].input).index(name) != 1:
            raise QvlmError(f"export pass {PASS!r}: weight {name!r} must feed exactly one MatMul as B, "
                            f"found {[n.op_type for _, n in users]}")
        index, matmul = users[0]
        weight = numpy_helper.to_array(inits[name])
        qw = quantized_weight(layer)
        if qw.codes.shape != weight.shape:
            raise QvlmError(f"export pass {PASS!r}: {name!r} has shape {list(weight.shape)} in the graph but "
                            f"{list(qw.codes.shape)} in the quant state; the state belongs to another model")
        nodes = _weight_nodes(graph, name, qw, dtype, matmul)
        if layer.act_bits is not None and layer.input_scale is not None:
            nodes = _activation_nodes(graph, name, layer, dtype, matmul) + nodes
        new_nodes[index] = nodes
        graph.initializer.remove(inits[name])
        sizes[name] = {"stored": int(qw.codes.size // (2 if qw.container == "int4" else 1) + qw.scale.size * dtype.itemsize),
                       "fp16": int(weight.size * 2)}
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.extend(new_nodes.get(i, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return sizes


def _weight_nodes(graph: onnx.GraphProto, name: str, qw: QuantizedWeight, dtype: np.dtype,
                  matmul: onnx.NodeProto) -> list[onnx.NodeProto]:
    q_name, s_name, out = f"{name}_quantized", f"{name}_scale", f"{name}_dequantized"
    graph.initializer.extend([_tensor(qw.codes, q_name, qw.container), _tensor(qw.scale.astype(dtype), s_name)])
    attrs = {} if qw.axis is None else {"axis": qw.axis}
    if qw.block_size is not None:
        attrs["block_size"] = qw.block_size
    matmul.input[1] = out
    return [onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=f"{name}/DequantizeLinear",
                                  **attrs)]


def _activation_nodes(graph: onnx.GraphProto, name: str, layer: LayerQuant, dtype: np.dtype,
                      matmul: onnx.NodeProto) -> list[onnx.NodeProto]:
    if layer.act_bits != 8:
        raise QvlmError(f"export pass {PASS!r}: {name!r} has {layer.act_bits}-bit activations; ONNX QDQ runs "
                        "int8 activations only (this setting is simulated-only)")
    prefix = name.removesuffix(".weight_t") + ".input"
    s_name, z_name, q_out, dq_out = f"{prefix}_scale", f"{prefix}_zero_point", f"{prefix}_quantized", f"{prefix}_qdq"
    scale = float(layer.input_scale.float().reshape(()))
    if not np.isfinite(scale) or scale <= 0:
        raise QvlmError(f"export pass {PASS!r}: {name!r} has input scale {scale}; scales must be finite and > 0")
    graph.initializer.extend([numpy_helper.from_array(np.array(scale, dtype=dtype), s_name),
                              numpy_helper.from_array(np.array(0, dtype=np.int8), z_name)])
    x = matmul.input[0]
    matmul.input[0] = dq_out
    return [onnx.helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], name=f"{prefix}/QuantizeLinear"),
            onnx.helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                  name=f"{prefix}/DequantizeLinear")]
