"""Export fidelity layer by layer: each graph layer fed the same input as its simulated layer.

Whole-graph fidelity (:mod:`.fidelity`) compares the graph's outputs with the simulated model's
on the same feeds. With int8 activations an element within float noise of a rounding boundary
rounds differently in the two pipelines; through 30 layers of a real LM with massive
activations such flips grow until a correct export can fall under its bound (on SmolLM2 RTN
W8A8: 11.16 dB against 11.38). Here the flips cannot accumulate: every transformer layer's
input tensor and output tensor are tapped from the ONNX graph (extra graph outputs), the
simulated model runs with each layer's input *replaced* by the graph's own input for that
layer (forward pre-hooks), and each layer's output is compared with the graph's. The tail
(final norm + lm_head) is checked the same way from the graph's last layer output, and each
decoder layer's ``present`` key and value with the layer. A wrong
weight, scale, rounding or operator inside any layer shows in that layer; rounding flips show
as a few ulps.

Layer boundaries are found by name: the exporter names each quantized Linear's nodes after
the module (``<...>.layers.<i>.mlp.down_proj/MatMul``); the layer's output is the residual
``Add`` that consumes that Linear's output (after its bias ``Add``, if any).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stats import ErrorStats, error_stats, worst

LAST_LINEAR = r"(mlp\.down_proj|mlp\.fc2)"
# A layer of a correct export against its simulated layer on the same input: float reassociation and,
# with int8 activations, the rare input element that rounds to the neighbouring code. Measured: 85-153 dB
# on the embedded model; one weight channel x4 or one activation scale x2 in a layer: 45-51 dB.
LAYER_BOUND_DB = 60.0
TAIL = "tail"


@dataclass(frozen=True)
class LayerFidelity:
    """One layer against its simulated layer: whole-tensor statistics and the per-token figure that judges it.

    ``token_sqnr_db`` is the median over tokens of each token's SQNR (the lowest such median over the
    layer's tensors and feeds). A rounding flip moves one element of one token: on a real LM's
    massive-activation layer (an int8 step of 26) that one token costs the whole tensor ~43 dB, yet the
    median token is untouched. A wrong weight, scale or operator moves every token.
    """

    graph: str
    layer: str  # "<index>" or "tail"
    stats: ErrorStats
    bound_db: float
    token_sqnr_db: float | None = None

    @property
    def judged_db(self) -> float:
        return float(self.stats.sqnr_db) if self.token_sqnr_db is None else float(self.token_sqnr_db)

    @property
    def passed(self) -> bool:
        return bool(self.stats.nonfinite == 0 and self.judged_db >= self.bound_db)

    def describe(self) -> str:
        return (f"{self.graph} layer {self.layer}: median token sqnr_db = {self.judged_db:.4g} against its simulated "
                f"layer on the same input (threshold >= {self.bound_db:g}; whole tensor {float(self.stats.sqnr_db):.4g})")

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "layer": self.layer, "stats": self.stats.to_json(), "bound_db": self.bound_db,
                "token_sqnr_db": self.token_sqnr_db, "passed": self.passed}


def token_rows(graph: str, output: str, feed: Mapping[str, np.ndarray], value: np.ndarray) -> np.ndarray:
    """``[tokens, features]`` of the real (non-padding) tokens of one tensor (see :func:`.fidelity.valid_positions`)."""
    value = np.asarray(value, dtype=np.float64)
    if graph != "decoder":
        return value.reshape(-1, value.shape[-1])
    mask = np.asarray(feed["attention_mask"]).astype(bool)
    if output.startswith("present."):  # [batch, kv_heads, total, head_dim]
        rows = value.transpose(0, 2, 1, 3)[mask[:, :value.shape[2]]]
        return rows.reshape(rows.shape[0], -1)
    return value[mask[:, -value.shape[1]:]]


def median_token_sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    signal = (want ** 2).sum(axis=1)
    noise = ((want - got) ** 2).sum(axis=1)
    with np.errstate(divide="ignore"):
        per_token = 10.0 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))
    return float(np.median(per_token)) if per_token.size else float("inf")


def layer_outputs(model, prefix: str) -> dict[int, str]:
    """``{layer index: output tensor name}`` of the layers whose last Linear the exporter lowered."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\." + LAST_LINEAR + r"/MatMul$")
    found = {}
    for node in model.graph.node:
        match = pattern.match(node.name)
        if not match:
            continue
        tensor = node.output[0]
        while len(consumers.get(tensor, [])) == 1 and consumers[tensor][0].op_type == "Add":
            add = consumers[tensor][0]
            other = [i for i in add.input if i != tensor]
            tensor = add.output[0]
            if not other or other[0] not in constants:  # the residual Add: the layer's output
                found[int(match.group(1))] = tensor
                break
    return found


def _tapped_session(path: Path, taps: Sequence[str], scratch: Path, threads: int | None):
    import onnx

    from ..runtime.ort_runner import make_session

    model = onnx.load(str(path))
    dtype = model.graph.input[0].type.tensor_type.elem_type
    existing = {o.name for o in model.graph.output}
    for name in taps:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    out = Path(tempfile.mkdtemp(dir=scratch)) / path.name
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > 1_500_000_000)
    return make_session(out, "faithful", threads)


def _replace_inputs(layers, inputs: Mapping[int, Any], captured: dict[int, Any]):
    """Hooks: layer i reads ``inputs[i]`` instead of its predecessor's output; every output is captured."""
    handles = []
    for i, layer in enumerate(layers):
        if i in inputs:
            def pre(_m, args, kwargs, x=inputs[i]):
                if args:
                    return (x.to(args[0].dtype), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x.to(kwargs["hidden_states"].dtype)}
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    return handles


def _compare(graph: str, feed, name: str, want, got) -> tuple[ErrorStats, float]:
    rows_want, rows_got = token_rows(graph, name, feed, want), token_rows(graph, name, feed, got)
    return error_stats(rows_want.ravel(), rows_got.ravel()), median_token_sqnr_db(rows_want, rows_got)


def compare_layers(info, simulated, feeds: Mapping[str, Sequence[Mapping]],
                   threads: int | None = None) -> list[LayerFidelity]:
    """Per transformer layer (vision and decoder) and the decoder's tail, worst feed."""
    with tempfile.TemporaryDirectory(prefix="qvlm-layers-") as scratch:
        return _compare_layers(info, simulated, feeds, Path(scratch), threads)


def _compare_layers(info, simulated, feeds, scratch: Path, threads: int | None) -> list[LayerFidelity]:
    import onnx
    import torch

    from ..families import family_for

    model = simulated.vlm.model
    family = family_for(model.config.model_type)
    results: list[LayerFidelity] = []
    for graph, prefix in (("vision", family.vision_layers), ("decoder", family.decoder_layers)):
        path = info.graph_path(graph)
        outputs = layer_outputs(onnx.load(str(path), load_external_data=False), prefix)
        if not outputs:
            continue
        session = _tapped_session(path, list(outputs.values()), scratch, threads)
        names = [o.name for o in session.get_outputs()]
        layers = model.get_submodule(prefix)
        per_layer: dict[str, list[tuple[ErrorStats, float]]] = {}
        for feed in feeds[graph]:
            got = dict(zip(names, session.run(None, dict(feed)), strict=True))
            inputs = {i + 1: torch.from_numpy(got[t]) for i, t in outputs.items() if i + 1 < len(layers)}
            if graph == "decoder":
                inputs[0] = torch.from_numpy(np.asarray(feed["inputs_embeds"]))
            captured: dict[int, Any] = {}
            handles = _replace_inputs(layers, inputs, captured)
            last = max(outputs)
            if graph == "decoder" and last == len(layers) - 1:
                norm = model.model.language_model.norm
                handles.append(norm.register_forward_pre_hook(
                    lambda _m, args, x=torch.from_numpy(got[outputs[last]]): (x.to(args[0].dtype),)))
            try:
                with torch.inference_mode():
                    sim = simulated.run(graph, feed, info.graphs[graph].outputs)
            finally:
                for h in handles:
                    h.remove()
            for i, tensor in outputs.items():
                per_layer.setdefault(str(i), []).append(_compare(graph, feed, "hidden", captured[i].float().numpy(),
                                                                 got[tensor]))
            if graph == "decoder" and last == len(layers) - 1:
                per_layer.setdefault(TAIL, []).append(_compare(graph, feed, "logits", sim["logits"], got["logits"]))
            for name in (n for n in sim if n.startswith("present.")):  # a layer's cache, from the same input
                per_layer.setdefault(name.split(".")[1], []).append(_compare(graph, feed, name, sim[name], got[name]))
        results += [LayerFidelity(graph, layer, worst([x[0] for x in pairs]), LAYER_BOUND_DB,
                                  min(x[1] for x in pairs)) for layer, pairs in per_layer.items()]
    return results


def excuse_accumulated_flips(fidelity: dict[str, tuple], layers: list[LayerFidelity]) -> tuple[dict[str, tuple], str]:
    """Whole-graph decoder fidelity that fails while every decoder layer and the tail pass is rounding flips
    grown through the depth, not an export fault: report it without gating on it (and say so)."""
    import dataclasses

    decoder = [layer for layer in layers if layer.graph == "decoder"]
    if not decoder or not any(x.layer == TAIL for x in decoder) or not all(x.passed for x in decoder):
        return fidelity, ""
    failing = [o for o in fidelity.get("decoder", ()) if not o.passed]
    if not failing:
        return fidelity, ""
    names = ", ".join(f"{o.output} {float(o.stats.sqnr_db):.4g} dB" for o in failing)
    note = (f"decoder whole-graph fidelity below its bound ({names}) while each of its {len(decoder) - 1} layers and "
            f"the tail match their simulated layers on the same input (worst "
            f"median token {min(x.judged_db for x in decoder):.4g} dB): int8 rounding flips accumulated through the "
            "depth, not an export fault; reported, not gated")
    excused = tuple(dataclasses.replace(o, checks=()) if not o.passed else o for o in fidelity["decoder"])
    return {**fidelity, "decoder": excused}, note
