"""Fault injection: break a correct bundle in one known way, as a faulty exporter would.

Each fault copies a bundle and edits one thing in one graph or file, then rewrites the
bundle's recorded hashes (``bundle.json`` and ``manifest.json``) so the broken bundle is
internally consistent, exactly like one a buggy export would write: only validation, not
integrity checking, can catch it. ``tools/fault_injection.py`` runs every fault on bundles of
every method and measures what ``validate`` detects; the tests run a subset.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QvlmError
from ..runtime.bundle import BUNDLE_FILE, read_bundle, refresh_bundle


@dataclass(frozen=True)
class Fault:
    name: str
    target: str  # vision | embed | decoder | bundle.json | processor
    description: str
    apply: Callable[[Path], str]  # edits the copied bundle in place; returns what exactly it changed
    settings: tuple[str, ...] = ("w8a8", "w4a16", "w4a8", "w3a16")


def _graph_path(bundle: Path, graph: str) -> Path:
    from ..runtime.bundle import read_bundle

    return read_bundle(bundle, verify=False).graph_path(graph)


def _load(bundle: Path, graph: str):
    import onnx

    return onnx.load(str(_graph_path(bundle, graph)), load_external_data=True)


def _save(model, bundle: Path, graph: str) -> None:
    import onnx

    onnx.save(model, str(_graph_path(bundle, graph)))


def _initializer(model, suffix: str, layer_hint: str):
    """The first initializer named ``<layer>.<suffix>`` whose layer contains ``layer_hint`` (middle layers first)."""
    names = [t.name for t in model.graph.initializer if t.name.endswith("." + suffix) and layer_hint in t.name]
    if not names:
        raise QvlmError(f"no initializer '*{layer_hint}*.{suffix}' to break in this bundle")
    chosen = names[len(names) // 2]
    return next(t for t in model.graph.initializer if t.name == chosen)


def _edit_initializer(bundle: Path, graph: str, suffix: str, hint: str, edit: Callable[[np.ndarray], np.ndarray]) -> str:
    from onnx import numpy_helper

    model = _load(bundle, graph)
    tensor = _initializer(model, suffix, hint)
    value = numpy_helper.to_array(tensor)
    edited = edit(value.copy()).astype(value.dtype)
    new = numpy_helper.from_array(edited, tensor.name)
    if tensor.data_type != new.data_type:  # int4 arrays come back as int8: keep the graph's element type
        from onnx import helper

        new = helper.make_tensor(tensor.name, tensor.data_type, list(value.shape), edited.ravel().tolist())
    tensor.CopyFrom(new)
    _save(model, bundle, graph)
    return f"{graph}: {tensor.name}"


def _times(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda v: v * factor


def _channel_times4(v: np.ndarray) -> np.ndarray:
    v[..., v.shape[-1] // 3] *= 4  # scales are [out] or [in/group, out]: one output channel
    return v


def _negate_block(v: np.ndarray) -> np.ndarray:
    """Negate one block of codes: 128 inputs (one int4 group, or int8's first 128 rows) of one output channel."""
    col = v.shape[1] // 2
    block = slice(0, min(128, v.shape[0]))
    v[block, col] = -np.clip(v[block, col], -7 if v.max() <= 7 else -127, None)
    return v


def _transpose(v: np.ndarray) -> np.ndarray:
    if v.shape[0] != v.shape[1]:
        raise QvlmError("transposed-weight fault needs a square weight")
    return v.T.copy()


def _swap_presents(bundle: Path) -> str:
    """Graph outputs present.0.key and present.1.key carry each other's tensor (a mis-ordered output list)."""
    from onnx import helper

    model = _load(bundle, "decoder")
    a, b = "present.0.key", "present.1.key"
    inner = {a: a + ".inner", b: b + ".inner"}
    for node in model.graph.node:
        node.input[:] = [inner.get(i, i) for i in node.input]
        node.output[:] = [inner.get(o, o) for o in node.output]
    model.graph.node.extend([helper.make_node("Identity", [inner[a]], [b], name="fault/swap_a"),
                             helper.make_node("Identity", [inner[b]], [a], name="fault/swap_b")])
    _save(model, bundle, "decoder")
    return f"decoder: outputs {a} and {b} exchanged"


def _nonzero_zero_point(bundle: Path) -> str:
    """A zero point of 1 where TensorRT and the quant state say 0 (activations if quantized, else weights)."""
    from onnx import helper, numpy_helper

    model = _load(bundle, "decoder")
    inits = {t.name: t for t in model.graph.initializer}
    activation = [n for n in inits if n.endswith(".input_zero_point")]
    if activation:
        tensor = inits[activation[len(activation) // 2]]
        tensor.CopyFrom(numpy_helper.from_array(np.full((), 1, numpy_helper.to_array(tensor).dtype), tensor.name))
        _save(model, bundle, "decoder")
        return f"decoder: {tensor.name} = 1"
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("/weight_dq")]
    node = dqs[len(dqs) // 2]
    codes, scale = inits[node.input[0]], inits[node.input[1]]
    name = node.input[0].replace("weight_quantized", "weight_zero_point")
    model.graph.initializer.append(helper.make_tensor(name, codes.data_type, list(scale.dims),
                                                      [1] * int(np.prod(scale.dims))))
    node.input.append(name)
    _save(model, bundle, "decoder")
    return f"decoder: {name} = 1"


def _bundle_json(edit: Callable[[dict], str]) -> Callable[[Path], str]:
    def apply(bundle: Path) -> str:
        raw = json.loads((bundle / BUNDLE_FILE).read_text())
        what = edit(raw)
        (bundle / BUNDLE_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        return what
    return apply


def _image_token(raw: dict) -> str:
    raw["model"]["image_token_id"] = int(raw["model"]["image_token_id"]) - 1
    return f"bundle.json: image_token_id -> {raw['model']['image_token_id']}"


def _processor_image_size(bundle: Path) -> str:
    from ..runtime.bundle import read_bundle

    side = 0
    # processor_config.json (Python) and preprocessor_config.json (transformers.js) both hold it
    for path in sorted((bundle / read_bundle(bundle, verify=False).processor).glob("*processor_config.json")):
        raw = json.loads(path.read_text())
        proc = raw.get("image_processor", raw)
        side = int(proc.get("crop_size", {}).get("height", 64)) * 3 // 4
        proc["crop_size"] = {"height": side, "width": side}
        proc["size"] = {"shortest_edge": side}
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return f"processor: image size -> {side}"


FAULTS: tuple[Fault, ...] = (
    Fault("weight-scale-x4", "decoder", "one layer's whole weight scale x4",
          lambda b: _edit_initializer(b, "decoder", "weight_scale", "layers.", _times(4.0))),
    Fault("channel-scale-x4", "vision", "one output channel's weight scale x4",
          lambda b: _edit_initializer(b, "vision", "weight_scale", "encoder.layers.", _channel_times4)),
    Fault("block-codes-negated", "decoder", "one block of 128 codes of one output channel negated",
          lambda b: _edit_initializer(b, "decoder", "weight_quantized", "mlp.", _negate_block)),
    Fault("activation-scale-x2", "vision", "one activation scale x2",
          lambda b: _edit_initializer(b, "vision", "input_scale", "layers.", _times(2.0)), ("w8a8", "w4a8")),
    Fault("nonzero-zero-point", "decoder", "a zero point of 1 (activation, or weight when none)",
          _nonzero_zero_point),
    Fault("present-kv-swapped", "decoder", "present.0.key and present.1.key outputs exchanged", _swap_presents),
    Fault("weight-transposed", "vision", "a square weight's codes transposed",
          lambda b: _edit_initializer(b, "vision", "weight_quantized", "q_proj", _transpose)),
    Fault("image-token-id", "bundle.json", "bundle.json image_token_id off by one", _bundle_json(_image_token)),
    Fault("processor-image-size", "processor", "processor image size 3/4 of the model's", _processor_image_size),
    Fault("rope-theta", "decoder", "RoPE inverse frequencies of a 4x smaller theta",
          lambda b: _edit_initializer(b, "decoder", "inv_freq", "rotary", lambda v: v ** 0.75)),
    Fault("embedding-x2", "embed", "the token embedding table x2",
          lambda b: _edit_initializer(b, "embed", "weight", "embed_tokens", _times(2.0))),
)
FAULTS_BY_NAME = {f.name: f for f in FAULTS}


def inject(bundle: str | Path, fault: str | Fault, out: str | Path) -> str:
    """Copy ``bundle`` to ``out`` with ``fault`` applied (hashes rewritten); returns what was changed."""
    fault = FAULTS_BY_NAME[fault] if isinstance(fault, str) else fault
    read_bundle(Path(bundle))
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out)
    what = fault.apply(out)
    refresh_bundle(out)
    return what
