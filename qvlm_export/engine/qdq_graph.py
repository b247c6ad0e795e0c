"""A read-only index of an ONNX graph for static Q/DQ analysis.

Answers the questions the TensorRT rules ask (is this tensor a constant, what is its
value and element type, who produces and consumes it) without loading external weight
data except for the small scale and zero-point tensors that are actually inspected.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
INT4_TYPES = (TensorProto.INT4, TensorProto.UINT4)
# ops that neither change values nor constness: a weight seen through them is still the weight
PASS_THROUGH = ("Identity",)


def type_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    return helper.tensor_dtype_to_np_dtype(elem_type).name


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or ``OpType(first output)`` for unnamed nodes, so a report can point at it."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class GraphIndex:
    """Producers, consumers, constants and element types of one ONNX model's main graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None):
        self.model = model
        self.graph = model.graph
        self.base_dir = str(base_dir) if base_dir is not None else ""
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        graph_inputs = {v.name for v in self.graph.input}
        # an initializer that is also a graph input can be overridden at run time: not a constant
        self.constants: dict[str, TensorProto] = {
            t.name: t for t in self.graph.initializer if t.name not in graph_inputs}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
            if node.op_type == "Constant" and node.output:
                tensor = _constant_tensor(node)
                if tensor is not None:
                    self.constants[node.output[0]] = tensor
        self.types = self._element_types()

    def _element_types(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False).graph
        except Exception:  # shape inference is a convenience; the graph's own annotations still count
            inferred = self.graph
        types = {}
        for value in [*inferred.input, *inferred.output, *inferred.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
        for name, tensor in self.constants.items():
            types[name] = tensor.data_type
        return types

    def resolve(self, name: str) -> str:
        """Follow pass-through ops back to the tensor they forward."""
        seen = set()
        while name in self.producer and self.producer[name].op_type in PASS_THROUGH and name not in seen:
            seen.add(name)
            name = self.producer[name].input[0]
        return name

    def is_constant(self, name: str) -> bool:
        return self.resolve(name) in self.constants

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.constants.get(self.resolve(name))
        return tuple(tensor.dims) if tensor is not None else None

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(self.resolve(name))
        if tensor is None:
            return None
        return numpy_helper.to_array(tensor, self.base_dir)

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name) or self.types.get(self.resolve(name))

    def compute_dtype(self) -> int | None:
        """The float type the graph computes in: the commonest float type of its inputs and outputs.

        The interface is what the exporter chose; inner tensors are only a fallback because a
        broken graph's inferred types follow its (possibly wrong) scales. Ties go to the lower
        precision: an fp32 graph has no fp16 interface tensors at all.
        """
        def commonest(values) -> int | None:
            counts: dict[int, int] = defaultdict(int)
            for value in values:
                elem = value.type.tensor_type.elem_type
                if elem in FLOAT_TYPES and value.name not in self.constants:
                    counts[elem] += 1
            return max(counts, key=lambda k: (counts[k], k != TensorProto.FLOAT)) if counts else None

        return commonest([*self.graph.input, *self.graph.output]) or commonest(self.graph.value_info)

    def uses_int4(self) -> bool:
        return any(t in INT4_TYPES for t in self.types.values())


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    value = attribute(node, "value")
    if isinstance(value, TensorProto):
        return value
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        raw = attribute(node, name)
        if raw is not None:
            return numpy_helper.from_array(np.asarray(raw, dtype=dtype), node.output[0])
    return None
