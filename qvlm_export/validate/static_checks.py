"""Exact checks of a candidate bundle that need no inference.

* **weights = quant state**: every quantized layer's integer codes, weight scales, activation
  scale and zero points in the graph equal the quant state's, element for element (scales
  compared after the cast to the graph's float type). Catches a wrong scale on any single
  channel or block, flipped codes, a transposed weight and a nonzero zero point, at any
  model size, with no tolerance to tune.
* **runtime metadata = reference**: ``bundle.json``'s model description (image token, special
  tokens, cache geometry, image size) and the processor files equal the FP reference bundle's:
  both come from the same model, so any difference is an export or packaging fault.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runtime.bundle import GRAPHS, BundleInfo

WEIGHT_SUFFIXES = ("weight_quantized", "weight_scale", "input_scale", "input_zero_point", "weight_t")


def _graph_initializers(info: BundleInfo) -> dict[str, np.ndarray]:
    """Every quantization initializer of the three graphs (the ones the QDQ pass names ``<layer>.<suffix>``)."""
    import onnx
    from onnx import numpy_helper

    found: dict[str, np.ndarray] = {}
    for graph in GRAPHS:
        model = onnx.load(str(info.graph_path(graph)), load_external_data=True)
        for tensor in model.graph.initializer:
            if tensor.name.rsplit(".", 1)[-1] in WEIGHT_SUFFIXES:
                found[tensor.name] = numpy_helper.to_array(tensor)
    return found


def _laid_out(graph_value: np.ndarray, expected: np.ndarray) -> np.ndarray | None:
    """The state's tensor in the graph's dtype and layout; None if the sizes differ.

    The QDQ pass stores MatMul weights as [in, out] (codes, and group scales [in/group, out]);
    the state keeps PyTorch's [out, in].
    """
    expected = np.asarray(expected).astype(graph_value.dtype)
    if expected.size != graph_value.size:
        return None
    return (expected.T if expected.ndim == 2 else expected).reshape(graph_value.shape)


def _same(graph_value: np.ndarray, expected: np.ndarray) -> bool:
    laid_out = _laid_out(graph_value, expected)
    return laid_out is not None and bool(np.array_equal(graph_value, laid_out))


def weights_match_state(info: BundleInfo, state) -> list[str]:
    """One line per layer whose graph tensors differ from the quant state's (empty: all equal)."""
    inits = _graph_initializers(info)
    kept = info.quant.get("kept_out_of_int4") or {}
    problems = []
    for name, layer in sorted(state.layers.items()):
        if kept.get(name, {}).get("as") == "float":  # a ragged int4 layer TensorRT cannot parse: exact float weight
            problems += _float_weight_matches(name, layer, inits.get(f"{name}.weight_t"))
            continue
        if kept.get(name, {}).get("as") == "int8":  # re-quantized per channel at export; fidelity compares it
            continue
        codes, scale = inits.get(f"{name}.weight_quantized"), inits.get(f"{name}.weight_scale")
        if codes is None or scale is None:
            problems.append(f"layer {name!r}: no integer weight in the graphs")
            continue
        expected = {"weight codes": (codes, layer.weight_codes.numpy()),
                    "weight scale": (scale, layer.weight_scale.float().numpy())}
        if layer.input_scale is not None and layer.act_bits is not None:
            expected["activation scale"] = (inits.get(f"{name}.input_scale"),
                                            layer.input_scale.float().reshape(()).numpy())
        zero_point = inits.get(f"{name}.input_zero_point")
        if zero_point is not None:
            expected["activation zero point"] = (zero_point, np.zeros_like(zero_point))
        for what, (got, want) in expected.items():
            if got is None:
                problems.append(f"layer {name!r}: {what} missing from the graph")
            elif not _same(np.asarray(got), want):
                problems.append(f"layer {name!r}: {what} differs from the quant state "
                                f"({_first_difference(np.asarray(got), want)})")
    return problems


def _float_weight_matches(name: str, layer, weight_t) -> list[str]:
    """A layer kept out of int4 in float must hold the state's dequantized weight, bit for bit."""
    if weight_t is None:
        return [f"layer {name!r}: kept out of int4 as float, but no float weight in the graphs"]
    weight_t = np.asarray(weight_t)
    want = layer.dequantized_weight().numpy().T.astype(weight_t.dtype)
    if weight_t.shape != want.shape or not np.array_equal(weight_t, want):
        return [f"layer {name!r}: float weight (kept out of int4) differs from the quant state's dequantized weight "
                f"({_first_difference(weight_t, want)})"]
    return []


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    laid_out = _laid_out(got, want)
    if laid_out is None:
        return f"shape {list(got.shape)} vs {list(np.asarray(want).shape)}"
    diff = np.argwhere(got != laid_out)
    index = tuple(int(i) for i in diff[0])
    return f"{len(diff)} of {got.size} elements, first at {list(index)}: {got[index]} vs {laid_out[index]}"


def processor_files(info: BundleInfo) -> dict[str, str]:
    """Hashes of what the processor reads: its directory, or at a bundle's root (HF layout) the top-level
    files besides bundle.json, with config.json less its per-file transformers.js dtypes (those differ)."""
    import hashlib
    import json

    from ..export.hf_layout import JS_CONFIG_KEY
    from ..manifest import hash_tree
    from ..runtime.bundle import BUNDLE_FILE

    root = Path(info.path) / info.processor
    if info.processor not in (".", ""):
        return hash_tree(root)
    files = {n: h for n, h in hash_tree(root).items() if "/" not in n and n not in (BUNDLE_FILE, "config.json")}
    if (root / "config.json").is_file():
        config = {k: v for k, v in json.loads((root / "config.json").read_text()).items() if k != JS_CONFIG_KEY}
        files["config.json"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return files


def metadata_matches(reference: BundleInfo, candidate: BundleInfo) -> list[str]:
    """One line per runtime-metadata field or processor file that differs from the FP reference bundle's."""
    problems = []
    ref_model, cand_model = asdict(reference.model), asdict(candidate.model)
    for key in sorted(ref_model):
        if ref_model[key] != cand_model.get(key):
            problems.append(f"bundle.json model.{key} is {cand_model.get(key)!r}, the reference's is {ref_model[key]!r}")
    ref_files, cand_files = processor_files(reference), processor_files(candidate)
    for name in sorted(set(ref_files) | set(cand_files)):
        if ref_files.get(name) != cand_files.get(name):
            state = "missing" if name not in cand_files else ("extra" if name not in ref_files else "differs")
            problems.append(f"processor file {name!r} {state} (vs the reference bundle's)")
    return problems
