"""Static TensorRT compatibility check of QDQ ONNX graphs (no TensorRT needed).

TensorRT's strongly typed ONNX import accepts only a subset of what ONNX allows for
QuantizeLinear/DequantizeLinear (DESIGN section 6). Breaking a rule shows up on the GPU
machine as a parser or Myelin error far from the cause, or worse as a silently slow
engine; this check names the node, the rule and the fix on any machine, before a build.

    report = check_path("bundle_dir")     # or one .onnx file
    report.ok, report.violations          # [Violation(graph, node, rule, detail, fix), ...]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import QvlmError
from .qdq_graph import INT4_TYPES, GraphIndex, attribute, node_label, type_name

# rule id -> how to fix it (the detail of each violation says what is wrong)
RULES: dict[str, str] = {
    "zero-point-zero": "quantize symmetrically: every zero point must be a constant 0",
    "scale-positive-constant": "store scales as initializers with finite values > 0 (clamp empty channels to a tiny scale)",
    "activation-per-tensor": "use one static scalar scale per activation tensor; migrate per-channel activation "
                             "scales into the weights (SmoothQuant-style)",
    "per-channel-weight-axis": "put per-channel scales only on constant weights, along the output-channel axis "
                               "(MatMul B[K,N]: axis 1; Gemm transB=1 / Conv: axis 0)",
    "int4-weight-only-blocked": "use int4 only for constant 2-D weights with DequantizeLinear(block_size=G, one blocked "
                                "axis) and an even last dimension; keep activations in int8 or float",
    "int4-even-blocks": "keep Linears whose K is not a multiple of the group size out of int4 (export with "
                        "ragged_int4: float, the default, or int8), or quantize with a group size that divides K",
    "quantized-type": "quantize to signed int8 (or int4 weights); TensorRT has no uint8/int16 Q/DQ",
    "scale-dtype": "cast scales to the graph's compute dtype (fp16 graph -> fp16 scales) so DQ outputs match "
                   "their consumers",
    "no-dq-on-bias": "keep biases in floating point: no DequantizeLinear in front of a bias add",
    "opset-21-for-int4": "export with opset >= 21 (int4 tensors and block_size need it)",
    "w4a8-not-trt": "W4A8 (int8 activations + int4 weights) is not a TensorRT format; deploy it on ONNX Runtime, "
                    "or re-quantize as W8A8 or W4A16 for TensorRT",
}
ALLOWED_QTYPES = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)
LINEAR_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class Violation:
    graph: str
    node: str
    op_type: str
    rule: str
    detail: str

    @property
    def fix(self) -> str:
        return RULES[self.rule]

    def to_json(self) -> dict[str, str]:
        return {**asdict(self), "fix": self.fix}

    def __str__(self) -> str:
        return f"{self.graph}: {self.node} [{self.rule}] {self.detail}; fix: {self.fix}"


@dataclass
class CheckReport:
    """Violations of every checked graph; ``ok`` when there are none."""

    graphs: list[str] = field(default_factory=list)
    qdq_nodes: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def rules_broken(self) -> list[str]:
        return sorted({v.rule for v in self.violations})

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "graphs": self.graphs, "qdq_nodes": self.qdq_nodes,
                "violations": [v.to_json() for v in self.violations]}

    def write_json(self, path: Path) -> None:
        from ..manifest import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


def quantized_type(ix: GraphIndex, node: onnx.NodeProto) -> int | None:
    """The integer/fp8 type a Q produces or a DQ consumes."""
    if node.op_type == "DequantizeLinear":
        return ix.elem_type(node.input[0])
    if len(node.input) > 2 and node.input[2]:
        return ix.elem_type(node.input[2])
    return attribute(node, "output_dtype") or TensorProto.UINT8  # ONNX default without a zero point


def output_channel_axis(ix: GraphIndex, tensor: str, rank: int) -> list[tuple[str, int | None]]:
    """For each consumer of a dequantized weight: (consumer label, its output-channel axis or None if unknown)."""
    found: list[tuple[str, int | None]] = []
    for node, slot in ix.consumers.get(tensor, []):
        label = f"{node.op_type} {node_label(node)}"
        if node.op_type in ("Identity", "Cast"):
            found += output_channel_axis(ix, node.output[0], rank)
        elif node.op_type == "Transpose":
            perm = list(attribute(node, "perm", list(range(rank))[::-1]))
            inner = output_channel_axis(ix, node.output[0], rank)
            found += [(lbl, None if ax is None else perm[ax]) for lbl, ax in inner]
        elif node.op_type == "MatMul" and slot == 1:
            found.append((label, rank - 1))
        elif node.op_type == "Gemm" and slot == 1:
            found.append((label, 0 if attribute(node, "transB", 0) else 1))
        elif node.op_type == "Conv" and slot == 1:
            found.append((label, 0))
        elif node.op_type == "ConvTranspose" and slot == 1:
            found.append((label, 1))
        else:
            found.append((label, None))
    return found


def feeds_bias(ix: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The consumer that uses this DQ's output as a bias, if any."""
    for consumer, slot in ix.consumers.get(node.output[0], []):
        if consumer.op_type in ("Gemm", "Conv", "ConvTranspose") and slot == 2:
            return node_label(consumer)
        if consumer.op_type == "Add":
            other = consumer.input[1 - slot] if len(consumer.input) == 2 else ""
            producer = ix.producer.get(other)
            if producer is not None and producer.op_type in LINEAR_OPS:
                return node_label(consumer)
    return None


def _check_scale_and_zero_point(ix: GraphIndex, node: onnx.NodeProto, compute: int | None) -> list[tuple[str, str]]:
    found = []
    scale_name = node.input[1]
    scale = ix.value(scale_name)
    if scale is None:
        found.append(("scale-positive-constant", f"scale {scale_name!r} is computed at run time, not a constant"))
    elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        found.append(("scale-positive-constant", f"scale {scale_name!r} has values <= 0 or non-finite "
                                                 f"(min {float(np.min(scale)):.3g})"))
    if len(node.input) > 2 and node.input[2]:
        zp = ix.value(node.input[2])
        if zp is None:
            found.append(("zero-point-zero", f"zero point {node.input[2]!r} is not a constant"))
        elif np.any(zp.astype(np.int64) != 0):
            nonzero = zp.astype(np.int64).ravel()
            found.append(("zero-point-zero", f"zero point {node.input[2]!r} has nonzero values "
                                             f"(e.g. {int(nonzero[nonzero != 0][0])})"))
    scale_type = ix.elem_type(scale_name)
    if compute is not None and scale_type is not None and scale_type != compute:
        found.append(("scale-dtype", f"scale {scale_name!r} is {type_name(scale_type)} but the graph computes in "
                                     f"{type_name(compute)}"))
    out_dtype = attribute(node, "output_dtype") if node.op_type == "DequantizeLinear" else None
    if out_dtype and scale_type is not None and out_dtype != scale_type:
        found.append(("scale-dtype", f"output_dtype {type_name(out_dtype)} differs from the scale's "
                                     f"{type_name(scale_type)}"))
    return found


def _check_granularity(ix: GraphIndex, node: onnx.NodeProto, qtype: int | None) -> list[tuple[str, str]]:
    block = attribute(node, "block_size", 0) or 0
    scale_shape = ix.shape(node.input[1])
    scale_size = int(np.prod(scale_shape)) if scale_shape is not None else 1
    is_weight = node.op_type == "DequantizeLinear" and ix.is_constant(node.input[0])
    int4 = qtype in INT4_TYPES
    if not is_weight:
        what = "an activation QuantizeLinear" if node.op_type == "QuantizeLinear" else "a DQ of a run-time tensor"
        if int4 or block:
            return [("int4-weight-only-blocked", f"{what} uses {'int4' if int4 else 'block_size'}; "
                                                 f"int4/blocked Q/DQ is weight-only in TensorRT")]
        if scale_size != 1:
            return [("activation-per-tensor", f"{what} has scale shape {list(scale_shape)}; activations need a "
                                              f"scalar scale")]
        return []
    shape = ix.shape(node.input[0]) or ()
    axis = attribute(node, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if int4 or block:
        return _check_blocked(node, qtype, shape, scale_shape or (), axis, block)
    if scale_size == 1:
        return []
    if scale_shape is None or len(scale_shape) != 1:
        return [("per-channel-weight-axis", f"weight scale shape {list(scale_shape or [])} is neither scalar nor 1-D")]
    problems = []
    for consumer, expected in output_channel_axis(ix, node.output[0], len(shape)):
        if expected is None:
            problems.append(("per-channel-weight-axis", f"per-channel weight feeds {consumer}, where TensorRT has "
                                                        f"no output-channel axis (only MatMul/Gemm/Conv weights)"))
        elif expected != axis:
            problems.append(("per-channel-weight-axis", f"per-channel axis {axis} but {consumer} has its output "
                                                        f"channels on axis {expected}"))
    return problems


def _check_blocked(node: onnx.NodeProto, qtype: int | None, shape: tuple[int, ...], scale_shape: tuple[int, ...],
                   axis: int, block: int) -> list[tuple[str, str]]:
    rule = "int4-weight-only-blocked"
    if qtype not in INT4_TYPES:
        return [(rule, f"block_size={block} on a {type_name(qtype)} weight; TensorRT blocks only int4")]
    if block <= 0:
        return [(rule, "int4 weight without block_size; TensorRT needs blocked int4 DequantizeLinear")]
    if len(shape) != 2:
        return [(rule, f"int4 weight has rank {len(shape)} (shape {list(shape)}); TensorRT blocks only 2-D weights")]
    if shape[-1] % 2:
        return [(rule, f"int4 weight shape {list(shape)} has an odd last dimension")]
    expected = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    if tuple(scale_shape) != expected:
        return [(rule, f"scale shape {list(scale_shape)} is not one blocked axis of weight {list(shape)} "
                       f"(axis {axis}, block {block}: expected {list(expected)})")]
    k = shape[axis]
    if k > block and k % block:
        # TensorRT's parser infers the block as K / scale rows and needs it whole and equal to block_size
        return [("int4-even-blocks", f"int4 weight {list(shape)}: K = {k} is not a multiple of block_size {block} "
                                     f"(a ragged last block of {k % block}); TensorRT's parser rejects it")]
    return []


def check_model(model: onnx.ModelProto, name: str = "model", base_dir: Path | None = None,
                compute_dtype: int | None = None) -> CheckReport:
    """Every TensorRT Q/DQ rule over one ONNX model's main graph."""
    ix = GraphIndex(model, base_dir)
    compute = compute_dtype if compute_dtype is not None else ix.compute_dtype()
    report = CheckReport(graphs=[name])
    int8_activation, int4_weight = None, None
    for node in ix.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        report.qdq_nodes += 1
        qtype = quantized_type(ix, node)
        found = _check_scale_and_zero_point(ix, node, compute)
        bias_user = feeds_bias(ix, node) if node.op_type == "DequantizeLinear" else None
        if bias_user is not None:
            # the fix removes this DQ altogether, so its granularity does not matter
            found.append(("no-dq-on-bias", f"output is the bias of {bias_user}"))
        else:
            if qtype is not None and qtype not in ALLOWED_QTYPES:
                found.append(("quantized-type", f"quantizes to {type_name(qtype)}"))
            found += _check_granularity(ix, node, qtype)
        if qtype in INT4_TYPES and ix.opset < 21:
            found.append(("opset-21-for-int4", f"int4 Q/DQ in an opset-{ix.opset} model"))
        if node.op_type == "QuantizeLinear" and qtype == TensorProto.INT8 and int8_activation is None:
            int8_activation = node
        if node.op_type == "DequantizeLinear" and qtype in INT4_TYPES and ix.is_constant(node.input[0]):
            int4_weight = int4_weight or node
        report.violations += [Violation(name, node_label(node), node.op_type, rule, detail) for rule, detail in found]
    if int8_activation is not None and int4_weight is not None:
        report.violations.append(Violation(
            name, node_label(int8_activation), int8_activation.op_type, "w4a8-not-trt",
            f"int8 activations (e.g. {node_label(int8_activation)}) with int4 weights "
            f"(e.g. {node_label(int4_weight)})"))
    return report


def check_onnx(path: Path, name: str | None = None) -> CheckReport:
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for a corrupt file
        raise QvlmError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__})") from None
    return check_model(model, name or path.name, base_dir=path.parent)


def check_path(path: str | Path, verify: bool | None = None) -> CheckReport:
    """Check one ``.onnx`` file, or every ``.onnx`` file under a bundle directory.

    A directory with a ``manifest.json`` is first checked against its hashes (``verify``
    None: the process-wide setting); a plain folder of ``.onnx`` files is checked as is.
    """
    from ..manifest import should_verify, verify_artifact

    path = Path(path)
    if path.is_file():
        return check_onnx(path)
    if not path.is_dir():
        raise QvlmError(f"{str(path)!r} does not exist; pass an ONNX bundle directory or an .onnx file")
    if should_verify(verify) and (path / "manifest.json").is_file():
        verify_artifact(path, verify=True)
    files = sorted(path.rglob("*.onnx"))
    if not files:
        raise QvlmError(f"{str(path)!r} contains no .onnx files; pass a bundle written by `qvlm-export export`")
    total = CheckReport()
    for file in files:
        one = check_onnx(file, name=str(file.relative_to(path)))
        total.graphs += one.graphs
        total.qdq_nodes += one.qdq_nodes
        total.violations += one.violations
    return total
