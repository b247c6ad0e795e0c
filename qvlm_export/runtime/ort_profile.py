"""Where ONNX Runtime's time goes: its profiler trace summarised by kind of work and by decoder layer.

ORT writes one ``Node`` event per kernel run (op type, input shapes, microseconds) and one
``Session``/``model_run`` event per ``run`` call. A decode step's time splits into

``weights``    matrix products with a 2-D constant operand (the Linears: MatMul, MatMulNBits,
               MatMulIntegerToFloat, ...): reading the weights;
``attention``  matrix products of two activations (Q K^T, P V), Softmax, attention kernels;
``kv``         the KV-cache Concat (present = past + new, copied whole every step);
``qdq``        activation Quantize/Dequantize/DynamicQuantize kernels;
``other``      norms, rotary, elementwise, reshapes;
``session``    ``model_run`` minus the kernels: feeding inputs, allocating and fetching outputs.

A node belongs to decoder layer ``i`` when its name says ``layers.i`` (or ``layers/i``);
nodes between two named ones inherit the layer of the last named node, because the
sequential executor runs a layer's nodes together.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

KINDS = ("weights", "attention", "kv", "qdq", "other", "session")
MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "QLinearMatMul", "MatMulInteger", "MatMulBnb4", "GatherBlockQuantized"}
ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipSoftmax"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
LAYER = re.compile(r"layers[./_](\d+)[./_]")


def _shapes(args: dict[str, Any], key: str) -> list[list[int]]:
    return [list(next(iter(entry.values()))) for entry in args.get(key, []) if entry]


def node_kind(op: str, input_shapes: list[list[int]], output_shapes: list[list[int]]) -> str:
    """The kind of work one kernel does (see the module docstring)."""
    if op in MATMUL_OPS:
        # weights are 2-D (or packed) constants; both operands 3-D/4-D means activation x activation
        rank_b = len(input_shapes[1]) if len(input_shapes) > 1 else 0
        return "weights" if rank_b <= 2 or op not in {"MatMul", "FusedMatMul"} else "attention"
    if op in ATTENTION_OPS:
        return "attention"
    if op in QDQ_OPS:
        return "qdq"
    if op == "Concat" and output_shapes and len(output_shapes[0]) == 4 and output_shapes[0][2] > 1:
        return "kv"
    return "other"


def read_trace(path: Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def _runs(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")


def summarise_trace(events: list[dict[str, Any]], skip_runs: int = 1) -> dict[str, Any]:
    """Per-run mean milliseconds by kind, by op type and by decoder layer, over the runs after ``skip_runs``
    (the prefill and warm-up steps)."""
    runs = _runs(events)[skip_runs:]
    if not runs:
        raise ValueError("the ORT profile has no model_run after the skipped ones")
    kinds: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    layers: dict[int, float] = defaultdict(float)
    layer = None
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    run_index, total_nodes = 0, 0.0
    for event in nodes:
        while run_index < len(runs) and event["ts"] >= runs[run_index][1]:
            run_index += 1
        if run_index >= len(runs) or event["ts"] < runs[run_index][0]:
            continue
        args = event.get("args", {})
        op = args.get("op_name", "?")
        kind = node_kind(op, _shapes(args, "input_type_shape"), _shapes(args, "output_type_shape"))
        match = LAYER.search(event["name"])
        if match:
            layer = int(match.group(1))
        micro = float(event["dur"])
        kinds[kind] += micro
        ops[op] += micro
        total_nodes += micro
        if layer is not None and "lm_head" not in event["name"]:
            layers[layer] += micro
    n = len(runs)
    run_total = sum(end - start for start, end in runs)
    kinds["session"] = max(run_total - total_nodes, 0.0)
    ms = 1e-3 / n
    return {"runs": n, "run_ms": run_total * ms, "kinds_ms": {k: kinds.get(k, 0.0) * ms for k in KINDS},
            "ops_ms": {k: v * ms for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
            "layers_ms": {i: v * ms for i, v in sorted(layers.items())}}
