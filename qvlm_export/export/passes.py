"""Graph passes from the traced graph to the deployable one, with enforced pre/postconditions.

A pass (:class:`GraphPass`) is a named rewrite ``(model, ctx) -> detail`` that edits ``model``
in place, with the conditions it ``requires`` before and ``ensures`` after (onnx-ir's
``requires()``/``ensures()``). Calling it checks them around the rewrite and returns a
:class:`PassResult` saying what changed. :func:`run_passes` runs passes in order and turns any
failure into one line naming the pass, the graph and, for a condition, the condition, because
an exporter bug surfacing later as a TensorRT parser error is unactionable.

``lower_linears`` is the heart: every ``qvlm.QLinear(x, W[N,K], layer=name)`` node left by
:mod:`.qlinear` is first proved to be its layer (pattern and check), then becomes (rewrite)

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


@dataclass(frozen=True)
class Condition:
    """A property of the graph: ``check`` returns None when it holds, else what is wrong."""

    name: str
    check: Callable[[onnx.ModelProto, PassContext], str | None]


@dataclass(frozen=True)
class PassResult:
    """What one pass did: node and initializer counts before and after, and its own ``detail``."""

    name: str
    nodes: tuple[int, int]
    initializers: tuple[int, int]
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.nodes[0] != self.nodes[1] or self.initializers[0] != self.initializers[1] or bool(self.detail)


@dataclass(frozen=True)
class GraphPass:
    name: str
    rewrite: Callable[[onnx.ModelProto, PassContext], dict[str, Any] | None]
    requires: tuple[Condition, ...] = ()
    ensures: tuple[Condition, ...] = ()

    @property
    def __name__(self) -> str:  # what error messages and logs call it
        return self.name

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        _enforce("precondition", self.requires, model, ctx)
        before = (len(model.graph.node), len(model.graph.initializer))
        detail = self.rewrite(model, ctx) or {}
        _enforce("postcondition", self.ensures, model, ctx)
        return PassResult(self.name, (before[0], len(model.graph.node)), (before[1], len(model.graph.initializer)),
                          detail)


def _enforce(kind: str, conditions: Sequence[Condition], model: onnx.ModelProto, ctx: PassContext) -> None:
    for condition in conditions:
        problem = condition.check(model, ctx)
        if problem is not None:
            raise PassError(f"{kind} {condition.name!r} does not hold: {problem}")


def run_passes(model: onnx.ModelProto, ctx: PassContext, passes: Sequence[GraphPass], graph: str) -> list[PassResult]:
    results = []
    for graph_pass in passes:
        try:
            results.append(graph_pass(model, ctx))
        except (PassError, ValueError) as exc:
            raise QvlmError(f"export pass {graph_pass.__name__} failed on the {graph} graph: {exc}") from None
    return results


def _annotated(model: onnx.ModelProto) -> list:
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info, *model.graph.initializer]
    return [*model.graph.node, *values, model.graph, model]


def _no_metadata(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    left = [getattr(x, "name", "") or type(x).__name__ for x in _annotated(model) if x.doc_string or x.metadata_props]
    return f"{len(left)} carry doc_string or metadata_props (first {left[0]!r})" if left else None


def _strip_metadata(model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """Drop doc strings and exporter metadata (stack traces, source paths), so the file depends
    only on the model and the quant state (determinism) and stays small."""
    stripped = sum(1 for x in _annotated(model) if x.doc_string or x.metadata_props)
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
    return {"stripped": stripped} if stripped else {}


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _qlinears(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == QDOMAIN]


def _layer_name(node: onnx.NodeProto) -> str:
    layer = _attr(node, "layer")
    return layer.decode() if isinstance(layer, bytes) else layer


def _qlinears_well_formed(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    """Each qvlm node is a QLinear with a ``layer`` and a constant 2-D weight in the graph's float type
    (read from the tensor's header: no weight is loaded)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in _qlinears(model):
        if node.op_type != QOP or not _attr(node, "layer"):
            return f"unexpected {node.domain}.{node.op_type} node {node.name!r}"
        layer = _layer_name(node)
        if node.input[1] not in inits:
            return f"layer {layer!r}: weight {node.input[1]!r} is not a constant initializer"
        t = inits[node.input[1]]
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype != ctx.float_dtype or len(t.dims) != 2:
            return f"layer {layer!r}: weight is {dtype}{list(t.dims)}, expected a 2-D {ctx.float_dtype} tensor"
    return None


def _no_qvlm_left(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    left = [n.name for n in _qlinears(model)]
    if left:
        return f"{len(left)} qvlm nodes remain after lowering (first {left[0]!r})"
    return "a qvlm opset import remains" if any(o.domain == QDOMAIN for o in model.opset_import) else None


def _prove_layer(weight: np.ndarray, layer: str, quant: LayerQuant, ctx: PassContext) -> None:
    """The check: the traced weight is the state's dequantized weight bit for bit, so the node is ``layer``."""
    n_out, k_in = weight.shape
    if tuple(quant.weight_codes.shape) != (n_out, k_in):
        raise PassError(f"layer {layer!r}: quant-state codes {list(quant.weight_codes.shape)} vs graph weight "
                        f"{[n_out, k_in]}; the state was made for another model")
    expected = quant.dequantized_weight().numpy().astype(ctx.float_dtype)
    if not np.array_equal(expected, weight):
        raise PassError(f"layer {layer!r}: the traced weight is not the state's dequantized weight "
                        f"(max diff {float(np.abs(expected.astype(np.float32) - weight).max()):.3g}); "
                        "the Linear -> MatMul mapping is wrong")


def _float_matmul(x: str, out: str, weight: np.ndarray, layer: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    w_name = f"{layer}.weight_t"
    return ([helper.make_node("MatMul", [x, w_name], [out], name=f"{layer}/MatMul")],
            [_const(w_name, np.ascontiguousarray(weight.T))])


def _qdq_matmul(x: str, out: str, quant: LayerQuant, layer: str, weight: np.ndarray, ctx: PassContext
                ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The rewrite of a proved quantized layer (a ragged int4 layer as ``ctx.ragged_int4`` says)."""
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


def _lower_one(node: onnx.NodeProto, weight: np.ndarray, layer: str, ctx: PassContext
               ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Nodes and initializers replacing one QLinear (``weight`` is its traced float ``[N, K]`` weight)."""
    x, out = node.input[0], node.output[0]
    ctx.linear_fp16_bytes += weight.shape[0] * weight.shape[1] * 2
    quant = ctx.layers.get(layer)
    if quant is None:
        ctx.linear_bytes += weight.nbytes
        return _float_matmul(x, out, weight, layer)
    _prove_layer(weight, layer, quant, ctx)
    return _qdq_matmul(x, out, quant, layer, weight, ctx)


def _lower_linears(model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """Replace every ``qvlm.QLinear`` by float or QDQ MatMul (module docstring); drop the qvlm opset."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    lowered = []
    for node in graph.node:
        if node.domain != QDOMAIN:
            new_nodes.append(node)
            continue
        layer = _layer_name(node)
        weight = numpy_helper.to_array(inits[node.input[1]], base_dir=ctx.base_dir)
        nodes, new_inits = _lower_one(node, weight, layer, ctx)
        del weight  # large graphs: one traced weight in memory at a time
        if ctx.store is not None:
            new_inits = [ctx.store.offload(t) for t in new_inits]
        new_nodes += nodes
        graph.initializer.extend(new_inits)
        lowered.append(layer)
    ctx.lowered += lowered
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [o for o in model.opset_import if o.domain != QDOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return {"lowered": len(lowered), "quantized": sum(name in ctx.layers for name in lowered)} if lowered else {}


def _used_names(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}


def _all_initializers_read(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    used = _used_names(model)
    unread = [t.name for t in model.graph.initializer if t.name not in used]
    return f"{len(unread)} initializers no node reads (first {unread[0]!r})" if unread else None


def _remove_unused_initializers(model: onnx.ModelProto, ctx: PassContext) -> None:
    """Drop initializers no node reads (the traced float weights of quantized layers)."""
    graph = model.graph
    used = _used_names(model)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _unique_initializers(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    names = [t.name for t in model.graph.initializer]
    return "duplicate initializer names" if len(set(names)) != len(names) else None


def _initializers_sorted(model: onnx.ModelProto, ctx: PassContext) -> str | None:
    names = [t.name for t in model.graph.initializer]
    return None if names == sorted(names) else "initializers are not in name order"


def _sort_initializers(model: onnx.ModelProto, ctx: PassContext) -> dict[str, Any]:
    """Order initializers by name so the file layout never depends on trace order details."""
    graph = model.graph
    order = [t.name for t in graph.initializer]
    tensors = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(tensors)
    return {"reordered": True} if order != sorted(order) else {}


NO_METADATA = Condition("no doc strings or metadata", _no_metadata)
QLINEARS_WELL_FORMED = Condition("qvlm nodes are QLinears with a constant 2-D float weight", _qlinears_well_formed)
NO_QVLM_LEFT = Condition("no qvlm nodes or opset", _no_qvlm_left)
ALL_INITIALIZERS_READ = Condition("every initializer is read", _all_initializers_read)
UNIQUE_INITIALIZERS = Condition("initializer names are unique", _unique_initializers)
INITIALIZERS_SORTED = Condition("initializers in name order", _initializers_sorted)

strip_metadata = GraphPass("strip_metadata", _strip_metadata, ensures=(NO_METADATA,))
lower_linears = GraphPass("lower_linears", _lower_linears, requires=(QLINEARS_WELL_FORMED,), ensures=(NO_QVLM_LEFT,))
remove_unused_initializers = GraphPass("remove_unused_initializers", _remove_unused_initializers,
                                       ensures=(ALL_INITIALIZERS_READ,))
sort_initializers = GraphPass("sort_initializers", _sort_initializers, requires=(UNIQUE_INITIALIZERS,),
                              ensures=(INITIALIZERS_SORTED, UNIQUE_INITIALIZERS))

DEFAULT_PASSES: tuple[GraphPass, ...] = (strip_metadata, lower_linears, remove_unused_initializers, sort_initializers)
