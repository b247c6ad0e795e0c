"""``export_bundle``: the export stage's one Python entry point (the CLI's ``export`` calls it).

model (+ quant state) -> simulated weights -> every Linear marked (:mod:`.qlinear`) ->
three traced graphs (:mod:`.trace`) -> graph passes (:mod:`.passes`) -> checked ONNX files,
``processor/``, ``bundle.json`` and ``manifest.json``, written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from ..manifest import atomic_directory, build_manifest, digest, hash_tree, sha256_file, write_manifest
from ..runtime.bundle import BundleInfo, GraphIO, ModelSpec, write_bundle_json
from .config import ExportConfig

BUNDLE_KIND = "onnx-bundle"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin for the graph itself


def check_exportable(state) -> None:
    """Refuse states no integer kernel can run, with the reason."""
    recipe = state.recipe
    if not recipe.deployable:
        raise QvlmError(f"setting {recipe.setting} is simulated only ({recipe.runs_on}): ONNX and TensorRT have no "
                        f"{recipe.weights.bits}-bit weight x {recipe.activations.bits}-bit activation kernels; "
                        "evaluate it with 'eval --quant', or re-quantize as w8a8 / w4a16 to export")
    if not recipe.weights.symmetric or not recipe.activations.symmetric:
        raise QvlmError("asymmetric quantization cannot be exported: TensorRT Q/DQ needs zero point 0; "
                        "re-quantize with weights.symmetric: true and activations.symmetric: true")
    odd = sorted({lq.act_bits for lq in state.layers.values() if lq.act_bits not in (None, 8)})
    if odd:
        raise QvlmError(f"{odd[0]}-bit activations cannot be exported (QuantizeLinear has int8, not int{odd[0]}); "
                        "use 8-bit activations or none")


def check_state_fits(model, state, model_path: Path) -> None:
    """Every quantized layer exists in ``model`` with the state's shape (else a state for another model)."""
    modules = dict(model.named_modules())
    for name, lq in sorted(state.layers.items()):
        weight = getattr(modules.get(name), "weight", None)
        if weight is None or tuple(weight.shape) != tuple(lq.weight_codes.shape):
            found = "missing" if weight is None else f"shape {list(weight.shape)}"
            raise QvlmError(f"the quant state's layer {name!r} ({list(lq.weight_codes.shape)}) is {found} in "
                            f"{str(model_path)!r}; pass the --model the state was made for")


def _linear_names(model) -> list[str]:
    from torch import nn

    from ..quant.modules import QuantLinear

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear | QuantLinear)]


def prepare_model(model: str | Path | None, quant: str | Path | None, config: ExportConfig):
    """(loaded VLM with simulated weights and marked Linears in the export dtype, quant state or None)."""
    from ..load.model import load_vlm
    from ..quant.modules import apply_quant_state
    from ..quant.state import load_state
    from .qlinear import mark_linears

    state = load_state(Path(quant)) if quant is not None else None
    if state is not None:
        check_exportable(state)
    vlm = load_vlm(model if model is not None else (state.model_path if state is not None else None))
    if state is not None:
        check_state_fits(vlm.model, state, vlm.path)
        apply_quant_state(vlm.model, state)
    vlm.model.set_attn_implementation(config.attn_implementation)
    mark_linears(vlm.model, _linear_names(vlm.model))
    if config.dtype == "fp16":
        vlm.model.half()
    return vlm, state


def model_spec(vlm) -> ModelSpec:
    from .wrappers import kv_geometry

    cfg, tok = vlm.model.config, vlm.tokenizer
    tcfg = cfg.text_config
    kv_heads, head_dim = kv_geometry(tcfg)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tcfg.eos_token_id
    eos = eos[0] if isinstance(eos, list | tuple) else eos
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    image_token = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    return ModelSpec(image_token_id=int(image_token), eos_token_id=int(eos), pad_token_id=int(pad),
                     num_layers=tcfg.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                     hidden_size=tcfg.hidden_size, vocab_size=tcfg.vocab_size,
                     image_seq_length=int(cfg.image_seq_length), image_size=int(cfg.vision_config.image_size),
                     max_positions=getattr(tcfg, "max_position_embeddings", None))


def quant_summary(state, quant: str | Path | None) -> dict[str, Any]:
    if state is None:
        return {"setting": "fp", "method": "fp", "deployable": True, "runs_on": "TensorRT; ONNX Runtime",
                "weight_bits": None, "act_bits": None, "group_size": None, "layers": 0, "state_sha256": None}
    r = state.recipe
    return {"setting": r.setting, "method": r.method, "deployable": r.deployable, "runs_on": r.runs_on,
            "weight_bits": r.weights.bits, "act_bits": r.activations.bits,
            "group_size": r.weights.group_size if r.weights.granularity == "group" else None,
            "layers": len(state.layers), "state_sha256": digest(hash_tree(Path(quant)))}


def save_graph(model, path: Path) -> None:
    """Write one graph (weights in a side file when protobuf's 2 GB limit needs it) and check it fully."""
    import onnx

    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QvlmError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from None


def export_graphs(vlm, state, config: ExportConfig, out_dir: Path,
                  log: Callable[[str], None] | None = None) -> dict[str, GraphIO]:
    """Trace, lower and save the three graphs; returns their I/O and weight bytes."""
    from onnx import TensorProto

    from .passes import DEFAULT_PASSES, PassContext, run_passes
    from .qlinear import translation_table
    from .trace import graph_specs, trace_graph

    float_dtype = np.dtype(np.float16 if config.dtype == "fp16" else np.float32)
    layers = dict(state.layers) if state is not None else {}
    graphs, lowered = {}, set()
    for spec in graph_specs(vlm.model, config):
        if log:
            log(f"exporting {spec.name}")
        model = trace_graph(spec, config, translation_table())
        ctx = PassContext(float_dtype, layers)
        run_passes(model, ctx, DEFAULT_PASSES, spec.name)
        lowered |= set(ctx.lowered)
        path = out_dir / f"{spec.name}.onnx"
        save_graph(model, path)
        total = sum(_tensor_bytes(t) for t in model.graph.initializer if t.data_type != TensorProto.UNDEFINED)
        graphs[spec.name] = GraphIO(file=path.name, inputs=tuple(spec.input_names), outputs=tuple(spec.output_names),
                                    sha256=sha256_file(path),
                                    weight_bytes={"total": total, "linear": ctx.linear_bytes,
                                                  "linear_fp16": ctx.linear_fp16_bytes})
    missing = sorted(set(layers) - lowered)
    if missing:
        raise QvlmError(f"quant-state layer {missing[0]!r} (and {len(missing) - 1} more) is in none of the exported "
                        "graphs; the state was made for another model")
    return graphs


def _tensor_bytes(tensor) -> int:
    from onnx import TensorProto, helper

    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def export_identity(model_path: Path, quant: str | Path | None, config: ExportConfig) -> tuple[dict, dict]:
    """The (config, inputs) a bundle's manifest records: what ``run`` compares to skip a redo."""
    inputs = {"model": digest(hash_tree(model_path))}
    if quant is not None:
        inputs["quant"] = digest(hash_tree(Path(quant)))
    return {"export": config.to_dict()}, inputs


def export_model_path(model: str | Path | None, quant: str | Path | None) -> Path:
    """The model directory :func:`export_bundle` loads: ``model``, else the state's model, else the embedded one."""
    import json

    from ..load.model import resolve_model_path

    if model is None and quant is not None and (Path(quant) / "state.json").is_file():
        model = json.loads((Path(quant) / "state.json").read_text()).get("model_path")
    return resolve_model_path(model)


def export_bundle(model: str | Path | None = None, quant: str | Path | None = None, out: str | Path = "bundle",
                  dtype: str | None = None, config: ExportConfig | None = None,
                  log: Callable[[str], None] | None = None) -> Path:
    """Export ``model`` (default: the model the quant state records, else the embedded one) to an ONNX bundle.

    Without ``quant`` the bundle is the FP reference. ``dtype`` (fp32 | fp16) overrides
    ``config.dtype``. Returns ``out``.
    """
    import dataclasses

    config = config or ExportConfig()
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    vlm, state = prepare_model(model, quant, config)
    spec = model_spec(vlm)
    with atomic_directory(Path(out)) as tmp:
        graphs = export_graphs(vlm, state, config, tmp, log)
        vlm.processor.save_pretrained(tmp / "processor")
        info = BundleInfo(path=tmp, dtype=config.dtype, opset=config.opset, graphs=graphs, model=spec,
                          quant=quant_summary(state, quant))
        write_bundle_json(info, tmp)
        recorded, inputs = export_identity(vlm.path, quant, config)
        # Where the bundle came from: validate rebuilds the quant state's simulated model from these to
        # check the graphs compute what the state says (the hashes in `inputs` guard against a changed state).
        sources = {"model": str(Path(vlm.path).resolve()), "quant": None if quant is None else str(Path(quant).resolve())}
        write_manifest(tmp, build_manifest(BUNDLE_KIND, recorded, inputs, tmp,
                                           extra={"setting": info.setting, "dtype": config.dtype, "sources": sources}))
    return Path(out)
