"""Tracing the three wrappers with ``torch.onnx.export(dynamo=True)`` into in-memory ONNX models.

Each graph is described by a :class:`GraphSpec` (example inputs, I/O names, dynamic axes
as ``torch.export.Dim``); :func:`trace_graph` exports it. Dims are shared by name across a
graph's inputs, so ONNX Runtime and TensorRT see one symbolic size per role; the attention
mask's length is its own axis, which the model ties to ``past + seq``. The names are
optimum's (``batch_size``, ``sequence_length``, ``past_sequence_length``,
``total_sequence_length``): transformers.js builds the first step's empty past tensors from
them and knows no others (an unknown name becomes size 0, a batch of 0).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import QvlmError
from .config import ExportConfig
from .wrappers import DecoderGraph, EmbedGraph, VisionGraph, kv_geometry


@dataclass
class GraphSpec:
    name: str
    module: nn.Module
    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[Any, ...]


DIM_NAMES = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
             "total": "total_sequence_length"}  # role -> the symbolic name written into the graphs


def _dims() -> dict[str, Any]:
    Dim, n = torch.export.Dim, DIM_NAMES
    return {"batch": Dim(n["batch"], min=1, max=4096), "seq": Dim(n["seq"], min=1, max=1 << 16),
            "past": Dim(n["past"], min=0, max=1 << 16), "total": Dim(n["total"], min=1, max=1 << 17)}


def graph_specs(model: nn.Module, config: ExportConfig) -> list[GraphSpec]:
    """The vision, embed and decoder graphs of ``model`` with example inputs in ``config.dtype``."""
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    b, s, p = config.example_batch, config.example_seq, config.example_past
    d = _dims()
    gen = torch.Generator().manual_seed(0)  # fixed example values: export must be deterministic

    pixels = torch.randn(b, vcfg.num_channels, vcfg.image_size, vcfg.image_size, generator=gen).to(dtype)
    vision = GraphSpec("vision", VisionGraph(model), (pixels,), ["pixel_values"], ["image_features"],
                       ({0: d["batch"]},))

    ids = torch.randint(0, tcfg.vocab_size, (b, s), generator=gen)
    embed = GraphSpec("embed", EmbedGraph(model), (ids,), ["input_ids"], ["inputs_embeds"],
                      ({0: d["batch"], 1: d["seq"]},))

    kv_heads, head_dim = kv_geometry(tcfg)
    layers = tcfg.num_hidden_layers
    past = tuple(torch.randn(b, kv_heads, p, head_dim, generator=gen).to(dtype) for _ in range(2 * layers))
    embeds = torch.randn(b, s, tcfg.hidden_size, generator=gen).to(dtype)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    positions = torch.arange(p, p + s, dtype=torch.int64).expand(b, s).contiguous()
    kv_names = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    decoder = GraphSpec(
        "decoder", DecoderGraph(model), (embeds, mask, positions, *past),
        ["inputs_embeds", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv_names)],
        ["logits", *(f"present.{n}" for n in kv_names)],
        ({0: d["batch"], 1: d["seq"]}, {0: d["batch"], 1: d["total"]}, {0: d["batch"], 1: d["seq"]},
         tuple({0: d["batch"], 2: d["past"]} for _ in past)),
    )
    return [vision, embed, decoder]


def trace_graph(spec: GraphSpec, config: ExportConfig, translation: dict | None = None):
    """Export one wrapper to an ``onnx_ir.Model`` whose initializers still share the torch parameters' memory.

    Exporter chatter is captured and shown only when the export fails. The caller decides
    how to serialise it (:mod:`.save`): asking the exporter for a ``ModelProto`` would copy
    every weight into one protobuf, which cannot exceed 2 GB.
    """
    log = io.StringIO()
    # The exporter logs one warning per missing torchvision op on every call, through a
    # handler bound before stderr is redirected; only errors concern the user.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            program = torch.onnx.export(
                spec.module.eval(), spec.args, dynamo=True, opset_version=config.opset, verbose=False,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=spec.dynamic_shapes, custom_translation_table=translation or {},
                external_data=False, optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the graph and the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QvlmError(f"torch.onnx.export of the {spec.name} graph failed: {first[:300]} "
                        f"(architecture not supported by the {spec.name} wrapper?)") from exc
    return program.model
