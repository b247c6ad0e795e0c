"""Export fidelity: does the bundle compute what its quant state says it computes?

Quality (candidate vs the FP reference) cannot tell a broken graph from quantization error:
a x4 weight scale costs about as many dB as 4-bit rounding. Fidelity compares the candidate's
faithful ONNX Runtime graphs with the quant state's own simulated model (PyTorch, the same
fake-quant arithmetic the QDQ graph lowers) on the reference's per-graph feeds. A correct
graph matches it to float rounding, whatever the model or the method, so the bounds come from
the arithmetic, not from calibration on one model:

* weight-only graphs (no activation is rounded): 60 dB for fp32 (measured 119-124 dB on the
  embedded model's W4A16 bundles of four methods), 25 dB for fp16 graphs against the fp32
  simulation (fp16's 11-bit mantissa);
* graphs with int8 activations: two float pipelines that differ by an ulp before a
  QuantizeLinear round the rare element on a boundary differently (one step of error, which
  cascades). Measured 50.8-133 dB on the embedded model and 40.6 dB at the logits of one
  LLaVA-1.5-7B-width decoder layer, where quantization itself costs 27.5 dB. So the bound is
  relative to the output's quantization error: 6 dB under it, capped at 40 dB
  (:func:`fidelity_bound`).

Faults of ``tools/fault_injection.py`` that change structure land at 31 dB and far below; faults on
one channel or block (41-51 dB) are the exact weight check's (:mod:`.static_checks`) to catch.

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
# Float rounding only: weight-only graphs (no activation is rounded, so nothing can flip).
EXACT_BOUND_DB = {"fp32": 60.0, "fp16": 25.0}
# With int8 activations, an element within float noise of a rounding boundary rounds the other way in one
# pipeline: one step of error where quantization already costs ~step^2/12 per element. The flips' error
# power is 12 x (flipped share) of the quantization error's, so a correct graph stays well under the
# quantization error itself; the bound asks for 6 dB under it (flips of 2% of all elements would be
# needed to break it), capped at 40 dB where quantization is that fine.
ACTIVATION_BOUND_DB = 40.0
UNDER_QUANTIZATION_DB = 6.0


def fidelity_bound(dtype: str, activations_quantized: bool, quantization_sqnr_db: float) -> float:
    """The SQNR a correct faithful graph keeps against its simulated model, for one output."""
    exact = EXACT_BOUND_DB.get(dtype, EXACT_BOUND_DB["fp16"])
    if not activations_quantized:
        return exact
    return min(exact, ACTIVATION_BOUND_DB, quantization_sqnr_db + UNDER_QUANTIZATION_DB)


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


def masked_error(graph: str, output: str, feed: Mapping[str, np.ndarray], reference: np.ndarray,
                 candidate: np.ndarray) -> ErrorStats:
    """Error statistics over the real (non-padding) positions of one output."""
    return error_stats(valid_positions(graph, output, feed, np.asarray(reference)),
                       valid_positions(graph, output, feed, np.asarray(candidate)))


def recorded_sources(artifact: Path) -> dict[str, Any]:
    """The model and quant-state paths ``export`` recorded in a bundle's manifest (empty when none)."""
    from ..manifest import read_manifest

    if not (Path(artifact) / "manifest.json").is_file():
        return {}
    return read_manifest(Path(artifact)).get("sources") or {}


def fidelity_checks(bound_db: float, stats: ErrorStats) -> tuple[Check, ...]:
    return (Check("sqnr_db", float(stats.sqnr_db), round(float(bound_db), 2)), Check("nonfinite", stats.nonfinite, 0))


class SimulatedGraphs:
    """The quant state's simulated model behind the three graphs' interfaces (fp32, PyTorch)."""

    def __init__(self, source: SimulatedSource):
        # Runs on the process's torch threads (validate's ``threads`` is ONNX Runtime's).
        from ..export.wrappers import DecoderGraph, EmbedGraph, VisionGraph
        from ..quant.simulate import load_simulated

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
                     reference: Mapping[str, Sequence[Mapping]], threads: int | None = None
                     ) -> dict[str, tuple[OutputParity, ...]]:
    """Per graph: each output of the faithful ORT graph against the simulated model, worst iteration.

    ``reference`` holds the FP reference's outputs per graph and feed: the simulated model's own
    distance to them (its quantization error) sets the bound where activations are quantized.
    """
    from ..runtime.ort_runner import OrtGraphSet

    act_quantized = info.quant.get("act_bits") is not None
    graphs = OrtGraphSet(info, "faithful", threads).activate()
    out: dict[str, tuple[OutputParity, ...]] = {}
    try:
        for graph in GRAPHS:
            names = info.graphs[graph].outputs
            records: dict[str, list[ErrorStats]] = {n: [] for n in names}
            quantization: dict[str, list[ErrorStats]] = {n: [] for n in names}
            for feed, fp in zip(feeds[graph], reference[graph], strict=True):
                got, want = graphs.run(graph, dict(feed)), simulated.run(graph, feed, names)
                for name in names:
                    if name not in got:
                        raise QvlmError(f"graph {graph!r} of {str(info.path)!r} has no output {name!r}")
                    records[name].append(masked_error(graph, name, feed, want[name], got[name]))
                    quantization[name].append(masked_error(graph, name, feed, fp[name], want[name]))
            out[graph] = tuple(
                _parity(graph, name, records[name],
                        fidelity_bound(info.dtype, act_quantized, float(worst(quantization[name]).sqnr_db)))
                for name in names)
    finally:
        graphs.deactivate()
    return out


def _parity(graph: str, output: str, per_iter: list[ErrorStats], bound_db: float) -> OutputParity:
    stats = worst(per_iter)
    return OutputParity(graph=graph, output=output, comparison=FIDELITY, against=SIMULATED, stats=stats,
                        per_iteration=tuple(per_iter), checks=fidelity_checks(bound_db, stats))


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

    sources = recorded_sources(bundle)
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
