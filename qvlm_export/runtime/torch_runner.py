"""The PyTorch model (FP or simulated-quantized) behind the same runner interface as ORT and TensorRT.

:class:`TorchGraphSet` runs the export wrappers (:mod:`qvlm_export.export.wrappers`, the very
modules the ONNX graphs are traced from) eagerly, keyed by the graphs' ONNX input/output
names, so it is a :class:`~.runner.GraphSet`; :func:`torch_runner` wraps it in
:class:`~.runner.GraphSetRunner`. Greedy generation, image packing and text scoring then run
the same code on PyTorch, ONNX Runtime and TensorRT, and a difference between two backends
is the backends', not the drivers'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import QvlmError
from .bundle import BundleInfo, GraphIO
from .runner import GraphSetRunner


def torch_bundle_info(vlm, quant: dict[str, Any] | None = None) -> BundleInfo:
    """What a runtime needs to know about ``vlm``, in the shape ``bundle.json`` gives it for an export.

    The processor is the model directory's own; graph files are empty (nothing is on disk).
    """
    import torch

    from ..export.api import model_spec

    spec = model_spec(vlm)
    dtype = "fp16" if next(vlm.model.parameters()).dtype == torch.float16 else "fp32"
    info = BundleInfo(path=vlm.path, dtype=dtype, opset=0, graphs={}, model=spec,
                      quant=dict(quant or {"setting": "fp", "method": "fp"}), processor=".")
    # the I/O names export/trace.py gives the graphs
    graphs = {"vision": GraphIO("", ("pixel_values",), ("image_features",)),
              "embed": GraphIO("", ("input_ids",), ("inputs_embeds",)),
              "decoder": GraphIO("", ("inputs_embeds", "attention_mask", "position_ids", *info.past_names()),
                                 ("logits", *info.present_names()))}
    return dataclasses.replace(info, graphs=graphs)


class TorchGraphSet:
    """The three graphs of a loaded (possibly simulated-quantized) model, run in PyTorch (a GraphSet)."""

    def __init__(self, vlm, info: BundleInfo):
        self.vlm = vlm
        self.info = info
        self.modules: dict[str, Any] = {}

    def activate(self) -> TorchGraphSet:
        from ..export.wrappers import DecoderGraph, EmbedGraph, VisionGraph

        model = self.vlm.model.eval()
        self.modules = {"vision": VisionGraph(model), "embed": EmbedGraph(model), "decoder": DecoderGraph(model)}
        return self

    def deactivate(self) -> None:
        self.modules.clear()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        import torch

        if graph not in self.modules:
            raise QvlmError(f"PyTorch graph set is not active (or has no {graph!r} graph); call activate()")
        io = self.info.graphs[graph]
        missing = [name for name in io.inputs if name not in feeds]
        if missing:
            raise QvlmError(f"the {graph} graph needs input {missing[0]!r}, which was not given")
        dtype = next(self.vlm.model.parameters()).dtype
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in io.inputs]
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        with torch.inference_mode():
            out = self.modules[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.to(torch.float32).numpy().astype(self.info.float_dtype, copy=False)
                for name, t in zip(io.outputs, out, strict=True)}


def torch_runner(vlm, quant: dict[str, Any] | None = None, name: str = "torch") -> GraphSetRunner:
    """A :class:`~.runner.VLMRunner` over a loaded model (``load_vlm`` or ``load_simulated``)."""
    info = torch_bundle_info(vlm, quant)
    return GraphSetRunner(TorchGraphSet(vlm, info), info, name=name)

