"""Graph passes from the traced graph to the deployable one; each declares pre/postconditions.

A pass is a function ``(model, ctx) -> None`` that edits ``model`` in place. :func:`run_passes`
runs them in order and turns any failure into one line that names the pass and the graph,
because an exporter bug surfacing later as a TensorRT parser error is unactionable.

``lower_linears`` is the heart: every ``qvlm.QLinear(x, W[N,K], layer=name)`` node left by
:mod:`.qlinear` becomes

* float layer:      ``MatMul(x, W^T)``
* quantized weight: ``MatMul(x', DequantizeLinear(codes[K,N], scale[, zero_point]))`` (see :mod:`.qdq`)
* quantized input:  ``x' = DequantizeLinear(QuantizeLinear(x, s, 0:int8), s, 0:int8)``, scalar ``s``

with the original output name, so consumers (bias ``Add``, residuals) are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import QvlmError
from ..quant.state import LayerQuant
from .qdq import WeightQDQ, activation_scale, int8_channel_qdq, ragged_blocks, weight_qdq
from .qlinear import QDOMAIN, QOP


class PassError(Exception):
    """A violated pre/postcondition; :func:`run_passes` adds the pass and graph names."""


@dataclass
class PassContext:
    """What passes read (the quant layers, the float type) and what they report back."""

    float_dtype: np.dtype
    layers: dict[str, LayerQuant]
    linear_bytes: int = 0  # bytes of Linear weights as stored (codes + scales, or float)
    linear_fp16_bytes: int = 0  # the same weights in fp16
    lowered: list[str] = field(default_factory=list)
    base_dir: str = ""  # where the graph's external data lives (large graphs, see .save)
    store: Any = None  # an .save.ExternalStore: new tensors go to its file, not into the proto
    ragged_int4: str = "float"  # what int4 layers with a ragged last block become (ExportConfig.ragged_int4)
    kept_out_of_int4: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> {"as", "k", ...}


GraphPass = Callable[[onnx.ModelProto, PassContext], None]


def run_passes(model: onnx.ModelProto, ctx: PassContext, passes: Sequence[GraphPass], graph: str) -> None:
    for graph_pass in passes:
        try:
            graph_pass(model, ctx)
        except (PassError, ValueError) as exc:
            raise QvlmError(f"export pass {graph_pass.__name__} failed on the {graph} graph: {exc}") from None


def strip_metadata(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Drop doc strings and exporter metadata (stack traces, source paths).

    Post: no node, graph or model carries ``doc_string`` or ``metadata_props``, so the
    file depends only on the model and the quant state (determinism) and stays small.
    """
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer]:
        value.doc_string = ""
        del value.metadata_props[:]
    model.graph.doc_string = ""
    del model.graph.metadata_props[:]
    model.doc_string = ""
    del model.metadata_props[:]


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _lower_one(node: onnx.NodeProto, weight: np.ndarray, layer: str, ctx: PassContext
               ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers replacing one QLinear (``weight`` is its traced float ``[N, K]`` weight)."""
    x, out = node.input[0], node.output[0]
    n_out, k_in = weight.shape
    ctx.linear_fp16_bytes += n_out * k_in * 2
    quant = ctx.layers.get(layer)
    if quant is None:
        ctx.linear_bytes += weight.nbytes
        w_name = f"{layer}.weight_t"
        return ([helper.make_node("MatMul", [x, w_name], [out], name=f"{layer}/MatMul")],
                [_const(w_name, np.ascontiguousarray(weight.T))])
    if tuple(quant.weight_codes.shape) != (n_out, k_in):
        raise PassError(f"layer {layer!r}: quant-state codes {list(quant.weight_codes.shape)} vs graph weight "
                        f"{[n_out, k_in]}; the state was made for another model")
    expected = quant.dequantized_weight().numpy().astype(ctx.float_dtype)
    if not np.array_equal(expected, weight):
        raise PassError(f"layer {layer!r}: the traced weight is not the state's dequantized weight "
                        f"(max diff {float(np.abs(expected.astype(np.float32) - weight).max()):.3g}); "
                        "the Linear -> MatMul mapping is wrong")
    nodes, inits, w_name = _weight_nodes(layer, quant, weight, ctx)
    s = activation_scale(quant, ctx.float_dtype)
    if s is not None:
        inits += [_const(f"{layer}.input_scale", s), _const(f"{layer}.input_zero_point", np.zeros((), np.int8))]
        q_in = [x, f"{layer}.input_scale", f"{layer}.input_zero_point"]
        nodes += [helper.make_node("QuantizeLinear", q_in, [f"{layer}.input_q"], name=f"{layer}/input_q"),
                  helper.make_node("DequantizeLinear", [f"{layer}.input_q", *q_in[1:]], [f"{layer}.input_dq"],
                                   name=f"{layer}/input_dq")]
        x = f"{layer}.input_dq"
    nodes.append(helper.make_node("MatMul", [x, w_name], [out], name=f"{layer}/MatMul"))
    return nodes, inits


def _weight_nodes(layer: str, quant: LayerQuant, weight: np.ndarray, ctx: PassContext
                  ) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """(nodes, initializers, weight tensor name) of one quantized layer's ``[K, N]`` weight.

    A ragged int4 layer (:func:`.qdq.ragged_blocks`) follows ``ctx.ragged_int4``: ``float``
    stores the traced weight itself (equal to the state's dequantized weight, checked above),
    ``int8`` re-quantizes it per output channel, ``int4`` keeps the ragged blocks.
    """
    policy = ctx.ragged_int4 if ragged_blocks(quant) else "int4"
    if policy != "int4":
        ctx.kept_out_of_int4[layer] = {"as": policy, "k": int(weight.shape[1]), "group_size": quant.group_size}
    if policy == "float":
        ctx.linear_bytes += weight.nbytes
        name = f"{layer}.weight_t"
        return [], [_const(name, np.ascontiguousarray(weight.T))], name
    if policy == "int8":
        w, error = int8_channel_qdq(weight, ctx.float_dtype)
        ctx.kept_out_of_int4[layer]["max_abs_error"] = float(f"{error:.3g}")
    else:
        w = weight_qdq(quant, ctx.float_dtype)
    return (*_dq_nodes(layer, w, ctx), f"{layer}.weight_dq")


def _dq_nodes(layer: str, w: WeightQDQ, ctx: PassContext) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    ctx.linear_bytes += w.stored_bytes()
    inits = [numpy_helper.from_array(w.codes, f"{layer}.weight_quantized"), _const(f"{layer}.weight_scale", w.scale)]
    dq_inputs = [inits[0].name, inits[1].name]
    if w.zero_point is not None:
        inits.append(numpy_helper.from_array(w.zero_point, f"{layer}.weight_zero_point"))
        dq_inputs.append(inits[-1].name)
    attrs = {k: v for k, v in (("axis", w.axis), ("block_size", w.block_size)) if v is not None}
    return [helper.make_node("DequantizeLinear", dq_inputs, [f"{layer}.weight_dq"], name=f"{layer}/weight_dq",
                             **attrs)], inits


def lower_linears(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Replace every ``qvlm.QLinear`` by float or QDQ MatMul (module docstring).

    Pre: each QLinear has a ``layer`` attribute and a constant ``[N, K]`` weight in the
    graph's float type; for a quantized layer that weight equals the state's dequantized
    weight bit for bit (this proves the node is the layer it claims to be).
    Post: no node of domain ``qvlm`` and no ``qvlm`` opset import remain.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain != QDOMAIN:
            new_nodes.append(node)
            continue
        layer = _attr(node, "layer")
        if node.op_type != QOP or not layer:
            raise PassError(f"unexpected {node.domain}.{node.op_type} node {node.name!r}")
        layer = layer.decode() if isinstance(layer, bytes) else layer
        if node.input[1] not in inits:
            raise PassError(f"layer {layer!r}: weight {node.input[1]!r} is not a constant initializer")
        weight = numpy_helper.to_array(inits[node.input[1]], base_dir=ctx.base_dir)
        if weight.dtype != ctx.float_dtype or weight.ndim != 2:
            raise PassError(f"layer {layer!r}: weight is {weight.dtype}{list(weight.shape)}, expected a 2-D "
                            f"{ctx.float_dtype} tensor")
        nodes, new_inits = _lower_one(node, weight, layer, ctx)
        del weight  # large graphs: one traced weight in memory at a time
        if ctx.store is not None:
            new_inits = [ctx.store.offload(t) for t in new_inits]
        new_nodes += nodes
        graph.initializer.extend(new_inits)
        ctx.lowered.append(layer)
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in model.opset_import if o.domain != QDOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    left = [n.name for n in graph.node if n.domain == QDOMAIN]
    if left:
        raise PassError(f"{len(left)} qvlm nodes remain after lowering (first {left[0]!r})")


def remove_unused_initializers(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Drop initializers no node reads (the traced float weights of quantized layers).

    Post: every initializer is an input of some node or a graph output.
    """
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def sort_initializers(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Order initializers by name so the file layout never depends on trace order details.

    Post: initializer names are sorted and unique.
    """
    graph = model.graph
    tensors = sorted(graph.initializer, key=lambda t: t.name)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise PassError("duplicate initializer names")
    del graph.initializer[:]
    graph.initializer.extend(tensors)


DEFAULT_PASSES: tuple[GraphPass, ...] = (strip_metadata, lower_linears, remove_unused_initializers, sort_initializers)
