"""The TensorRT decoder's prefill returns last-token logits: a graph edit made at engine build time.

Full-sequence logits are ``batch x prompt x vocab`` elements: 16 x 1024 x 152064 (Qwen2's
vocabulary) is over TensorRT's 2^31-1 per tensor, and generation reads only the last
position. The ONNX bundle keeps full-sequence logits (ONNX Runtime scores text with them,
e.g. perplexity and log-likelihood), and its files stay untouched: ``build`` writes an edited
copy of the decoder graph next to the engine being built, where a
``Slice(hidden, starts=-1, axes=1)`` feeds the lm_head ``MatMul`` (in front of its activation
Q/DQ, if any). Every op between that MatMul and ``logits`` acts per position, so the engine's
``logits`` are exactly the last row of the bundle's: ``[batch, 1, vocab]`` in both phases.
The KV-cache outputs are unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import QvlmError

LOGITS = "logits"
# ops that may sit between the lm_head MatMul and ``logits`` (bias, dtype cast, logit soft-capping)
PER_POSITION = ("Add", "Cast", "Identity", "Mul", "Div", "Tanh")
QDQ = ("QuantizeLinear", "DequantizeLinear")
SUFFIX = "/last_position"


def _lm_head(graph: onnx.GraphProto, producer: dict[str, onnx.NodeProto], constants: set[str]) -> onnx.NodeProto:
    """The MatMul whose output becomes ``logits`` through per-position ops only."""
    name = LOGITS
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            break
        if node.op_type == "MatMul":
            return node
        dynamic = [i for i in node.input if i and i not in constants]
        if node.op_type not in PER_POSITION or len(dynamic) != 1:
            break
        name = dynamic[0]
    raise QvlmError("the decoder's logits do not come from a MatMul through per-position ops only; build with "
                    "decoder_logits: all in the profile")


def last_token_logits(model: onnx.ModelProto) -> str:
    """Edit ``model`` in place so ``logits`` holds the last position only; returns the sliced tensor's name."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    if any(out.endswith(SUFFIX) for n in graph.node for out in n.output):
        raise QvlmError("the decoder graph already returns last-token logits")
    target = _lm_head(graph, producer, constants)
    source = target.input[0]
    while source in producer and producer[source].op_type in QDQ:  # slice before the activation Q/DQ
        target = producer[source]
        source = target.input[0]
    sliced = f"{source}{SUFFIX}"
    bounds = [numpy_helper.from_array(np.array([value], np.int64), f"{sliced}/{what}")
              for what, value in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1))]
    graph.initializer.extend(bounds)
    node = helper.make_node("Slice", [source, *(b.name for b in bounds)], [sliced], name=f"{sliced}/Slice")
    target.input[0] = sliced
    nodes = list(graph.node)
    position = next(i for i, n in enumerate(nodes) if list(n.output) == list(target.output))
    nodes.insert(position, node)  # topological: ``source`` is computed before ``target``
    del graph.node[:]
    graph.node.extend(nodes)
    _forget_shapes_after(graph, sliced)
    for output in graph.output:
        if output.name == LOGITS and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].Clear()
            output.type.tensor_type.shape.dim[1].dim_value = 1
    return sliced


def _forget_shapes_after(graph: onnx.GraphProto, tensor: str) -> None:
    """Drop value_info of every tensor computed from ``tensor`` (its sequence axis is now 1)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stale, todo = set(), [tensor]
    while todo:
        for node in consumers.get(todo.pop(), []):
            for out in node.output:
                if out not in stale:
                    stale.add(out)
                    todo.append(out)
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def write_last_token_decoder(source: Path, out_dir: Path) -> Path:
    """An edited copy of ``source`` in ``out_dir`` (same file name).

    Its external data is hard-linked beside it (copied only across file systems): parsers
    resolve ``location`` inside the model's directory, and ONNX Runtime refuses a symlink
    that resolves outside it.
    """
    model = onnx.load(str(source), load_external_data=False)
    last_token_logits(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    for location in sorted({entry.value for t in model.graph.initializer for entry in t.external_data
                            if entry.key == "location"}):
        link = out_dir / location
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            try:
                os.link(source.parent / location, link)
            except OSError:  # another file system (or links not allowed): a copy
                shutil.copyfile(source.parent / location, link)
    path = out_dir / source.name
    onnx.save(model, str(path))
    return path
