"""Export fidelity: does the bundle compute what its quant state says it computes?

Quality (candidate vs the FP reference) cannot tell a broken graph from quantization error:
a x4 weight scale costs about as many dB as 4-bit rounding. Fidelity compares the candidate's
faithful ONNX Runtime graphs with the quant state's own simulated model (PyTorch, the same
fake-quant arithmetic the QDQ graph lowers) on the reference's per-graph feeds. A correct
graph matches it to float rounding, whatever the model or the method, so the bounds are
fixed numbers derived from the arithmetic, not calibrated per model:

* fp32 graphs: measured 50.8-133 dB (worst output) on the embedded model's RTN, GPTQ, AWQ
  and Q-VLM bundles at W8A8 and W4A16. The one discontinuity is int8 activation rounding: two
  float pipelines that differ by an ulp before a QuantizeLinear pick different codes for the
  rare element on a rounding boundary (one step of error, cascading through the vision
  tower: the 50.8). Structural faults of ``tools/fault_injection.py`` land at 31 dB and far
  below; faults on one channel or block (41-51 dB) are the exact weight check's to catch.
* fp16 graphs (the TensorRT interface) against the fp32 simulation: fp16's 11-bit mantissa
  makes ~60 dB per op; 25 dB.

Padding positions are excluded: prompts are left-padded, and a fully masked attention row is
undefined (PyTorch's SDPA and the exported softmax give different, unused values there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from ..runtime.bundle import GRAPHS, BundleInfo
from .parity import GraphParity, OutputParity
from .stats import ErrorStats, error_stats, worst
from .thresholds import Check

FIDELITY = "fidelity"
SIMULATED = "simulated"
FIDELITY_BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"sqnr_db": 40.0, "nonfinite": 0},
    "fp16": {"sqnr_db": 25.0, "nonfinite": 0},
}


@dataclass(frozen=True)
class SimulatedSource:
    """Where the candidate's simulated model comes from: the quant state and the model it was made for."""

    quant: Path
    model: Path


def valid_positions(graph: str, output: str, feed: Mapping[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """The elements of ``value`` that belong to real (non-padding) tokens, flattened."""
    value = np.asarray(value)
    if graph != "decoder":
        return value.ravel()
    mask = np.asarray(feed["attention_mask"]).astype(bool)
    if output == "logits":  # [batch, seq, vocab]: the last seq positions of the mask
        return value[mask[:, -value.shape[1]:]].ravel()
    # present.{i}.{key,value}: [batch, kv_heads, total, head_dim]
    return value.transpose(0, 2, 1, 3)[mask[:, :value.shape[2]]].ravel()


def fidelity_checks(dtype: str, stats: ErrorStats) -> tuple[Check, ...]:
    bounds = FIDELITY_BOUNDS.get(dtype, FIDELITY_BOUNDS["fp16"])
    return tuple(Check(stat, float(getattr(stats, stat)), float(bound)) for stat, bound in bounds.items())


class SimulatedGraphs:
    """The quant state's simulated model behind the three graphs' interfaces (fp32, PyTorch)."""

    def __init__(self, source: SimulatedSource, threads: int | None = None):
        import torch

        from ..export.wrappers import DecoderGraph, EmbedGraph, VisionGraph
        from ..quant.simulate import load_simulated

        if threads:
            torch.set_num_threads(threads)
        vlm, _ = load_simulated(source.quant, str(source.model))
        model = vlm.model.float().eval()
        model.set_attn_implementation("sdpa")
        self.vlm = vlm  # for greedy answers (TorchAnswerer) on the same simulated model
        self.wrappers = {"vision": VisionGraph(model), "embed": EmbedGraph(model), "decoder": DecoderGraph(model)}

    def run(self, graph: str, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.asarray(v)) for v in feed.values()]
        args = [a.float() if a.is_floating_point() else a for a in args]
        with torch.inference_mode():
            out = self.wrappers[graph](*args)
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.float().numpy() for name, t in zip(names, out, strict=True)}


def compare_fidelity(info: BundleInfo, simulated: SimulatedGraphs, feeds: Mapping[str, Sequence[Mapping]],
                     threads: int | None = None) -> dict[str, tuple[OutputParity, ...]]:
    """Per graph: each output of the faithful ORT graph against the simulated model, worst iteration."""
    from ..runtime.ort_runner import OrtGraphSet

    graphs = OrtGraphSet(info, "faithful", threads).activate()
    out: dict[str, tuple[OutputParity, ...]] = {}
    try:
        for graph in GRAPHS:
            names = info.graphs[graph].outputs
            records: dict[str, list[ErrorStats]] = {n: [] for n in names}
            for feed in feeds[graph]:
                got, want = graphs.run(graph, dict(feed)), simulated.run(graph, feed, names)
                for name in names:
                    if name not in got:
                        raise QvlmError(f"graph {graph!r} of {str(info.path)!r} has no output {name!r}")
                    records[name].append(error_stats(valid_positions(graph, name, feed, want[name]),
                                                     valid_positions(graph, name, feed, got[name])))
            out[graph] = tuple(_parity(graph, name, per_iter, info.dtype) for name, per_iter in records.items())
    finally:
        graphs.deactivate()
    return out


def _parity(graph: str, output: str, per_iter: list[ErrorStats], dtype: str) -> OutputParity:
    stats = worst(per_iter)
    return OutputParity(graph=graph, output=output, comparison=FIDELITY, against=SIMULATED, stats=stats,
                        per_iteration=tuple(per_iter), checks=fidelity_checks(dtype, stats))


def with_fidelity(parity: GraphParity, outputs: tuple[OutputParity, ...]) -> GraphParity:
    import dataclasses

    return dataclasses.replace(parity, outputs=(*outputs, *parity.outputs))


def resolve_source(bundle: Path, info: BundleInfo, quant: Path | None) -> SimulatedSource | str:
    """The candidate's quant state and model, or the reason fidelity cannot be checked.

    ``quant`` (``--quant``) wins; otherwise the paths export recorded in the bundle's manifest.
    A state whose hash differs from the one the bundle records is never used.
    """
    import json

    from ..manifest import digest, hash_tree

    sources: dict[str, Any] = {}
    manifest = Path(bundle) / "manifest.json"
    if manifest.is_file():
        sources = json.loads(manifest.read_text()).get("sources", {}) or {}
    state = Path(quant) if quant is not None else (Path(sources["quant"]) if sources.get("quant") else None)
    if state is None or not (state / "state.json").is_file():
        return ("the quant state it was exported from is not available"
                + (f" ({str(state)!r} is gone)" if state is not None else "") + "; pass --quant")
    expected = info.quant.get("state_sha256")
    if quant is None and expected and digest(hash_tree(state)) != expected:
        return f"the quant state at {str(state)!r} changed since export; pass --quant with the original"
    meta = json.loads((state / "state.json").read_text())
    model = meta.get("model_path") or sources.get("model")
    if not model or not (Path(model) / "config.json").is_file():
        return f"the model the quant state was made for ({model!r}) is not available; pass --quant with a state " \
               "whose model_path exists"
    return SimulatedSource(quant=state, model=Path(model))
