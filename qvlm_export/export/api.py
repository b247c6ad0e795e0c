"""``export_bundle``: the export stage's one Python entry point (the CLI's ``export`` calls it).

model (+ quant state) -> simulated weights -> every Linear marked (:mod:`.qlinear`) ->
three traced graphs (:mod:`.trace`) -> graph passes (:mod:`.passes`) -> checked ONNX files
under ``onnx/`` with the config, processor and tokenizer files transformers.js loads
(:mod:`.hf_layout`), ``bundle.json`` and ``manifest.json``, written atomically.
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


def check_exportable(state) -> None:
    """Refuse states no integer kernel can run, with the reason."""
    recipe = state.recipe
    if recipe.simulated_by is not None:
        raise QvlmError(f"this {recipe.method} state is simulated only: {recipe.simulated_by} "
                        "(or evaluate it with 'eval --quant')")
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


def _model_difference(quant: Path | None, model_path: Path) -> str:
    """What tells the state's model from ``model_path``: the content digest the state recorded, if any."""
    import json

    manifest = None if quant is None else Path(quant) / "manifest.json"
    if manifest is None or not manifest.is_file():
        return "the state has no manifest to compare model digests"
    recorded = json.loads(manifest.read_text()).get("inputs", {}).get("model")
    here = digest(hash_tree(model_path))
    if recorded == here:
        return f"yet the state records this very model (digest {here[:12]}): the state was edited after quantize"
    return (f"the state was made for a model with digest {str(recorded)[:12]}, this one is {here[:12]}: "
            "pass the --model the state was made for")


def check_state_fits(model, state, model_path: Path, quant: Path | None = None) -> None:
    """Every quantized layer exists in ``model`` with the state's shape (else a state for another model).

    The error names the first layer that differs, how, and whether the model's content
    digest differs from the one the state recorded, so the user can tell "wrong --model"
    apart from "same model, incompatible state".
    """
    modules = dict(model.named_modules())
    for name, lq in sorted(state.layers.items()):
        weight = getattr(modules.get(name), "weight", None)
        if weight is None or tuple(weight.shape) != tuple(lq.weight_codes.shape):
            found = "missing" if weight is None else f"shape {list(weight.shape)}"
            raise QvlmError(f"the quant state's layer {name!r} ({list(lq.weight_codes.shape)}) is {found} in "
                            f"{str(model_path)!r}; {_model_difference(quant, model_path)}")


def drop_unused_layers(model, state) -> dict[str, str]:
    """Remove from ``state`` the layers no graph contains (vision layers past ``vision_feature_layer``).

    States written before the calibrator skipped those layers quantized them; their
    output feeds nothing, so leaving them out changes no output. Returns name -> why.
    """
    from ..quant.modules import in_unused_layer, unused_layers

    unused = unused_layers(model.config)
    dropped = {name: next(iter(unused.values())) for name in state.layers if in_unused_layer(name, unused)}
    for name in dropped:
        del state.layers[name]
    return dropped


def _linear_names(model) -> list[str]:
    from torch import nn

    from ..quant.modules import QuantLinear

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear | QuantLinear)]


def resolve_export_dtype(dtype: str, model_dir: Path) -> str:
    """Graph dtype: fp32 | fp16, or ``auto``: fp16 for fp16/bf16 checkpoints (no fp32 detour), else fp32."""
    from ..memory import resolve_load_dtype

    if dtype == "auto":
        return "fp32" if resolve_load_dtype("auto", model_dir) == "fp32" else "fp16"
    if dtype == "bf16":
        raise QvlmError("bf16 graphs are not exported (ONNX Runtime CPU has no bf16 MatMul); use --dtype fp16 "
                        "(TensorRT) or fp32, or auto")
    return dtype


def prepare_model(model: str | Path | None, quant: str | Path | None, config: ExportConfig,
                  log: Callable[[str], None] | None = None):
    """(loaded VLM with simulated weights and marked Linears in the export dtype, quant state or None).

    The model is loaded directly in the graph dtype and every edit below reuses its
    storage (MarkedLinear shares the weight), so the stage holds one copy of the model.
    """
    from ..load.model import load_vlm, resolve_model_path
    from ..memory import EXPORT_FACTOR, require_memory
    from ..quant.modules import apply_quant_state
    from ..quant.state import load_state
    from .qlinear import mark_linears

    state = load_state(Path(quant)) if quant is not None else None
    if state is not None:
        check_exportable(state)
    path = resolve_model_path(model if model is not None else (state.model_path if state is not None else None))
    require_memory("export", path, config.dtype, EXPORT_FACTOR)
    vlm = load_vlm(path, dtype=config.dtype)
    if state is not None:
        dropped = drop_unused_layers(vlm.model, state)
        if dropped and log:
            log(f"left out {len(dropped)} quantized layers no graph contains ({next(iter(dropped.values()))})")
        check_state_fits(vlm.model, state, vlm.path, None if quant is None else Path(quant))
        apply_quant_state(vlm.model, state)
    vlm.model.set_attn_implementation(config.attn_implementation)
    mark_linears(vlm.model, _linear_names(vlm.model))
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
    family = vlm.family
    return ModelSpec(image_token_id=int(image_token), eos_token_id=int(eos), pad_token_id=int(pad),
                     num_layers=tcfg.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                     hidden_size=tcfg.hidden_size, vocab_size=tcfg.vocab_size,
                     image_seq_length=family.tokens_per_tile(cfg), image_size=int(cfg.vision_config.image_size),
                     max_positions=getattr(tcfg, "max_position_embeddings", None), family=family.model_type,
                     image_layout=family.image_layout(vlm.model))


def quant_summary(state, quant: str | Path | None) -> dict[str, Any]:
    if state is None:
        return {"setting": "fp", "method": "fp", "deployable": True, "runs_on": "TensorRT; ONNX Runtime",
                "weight_bits": None, "act_bits": None, "group_size": None, "layers": 0, "state_sha256": None}
    r = state.recipe
    return {"setting": r.setting, "method": r.method, "deployable": r.deployable, "runs_on": r.runs_on,
            "weight_bits": r.weights.bits, "act_bits": r.activations.bits,
            "group_size": r.weights.group_size if r.weights.granularity == "group" else None,
            "layers": len(state.layers), "state_sha256": digest(hash_tree(Path(quant)))}


def _export_one(spec, config: ExportConfig, ctx, out_dir: Path, weight_bits: int | None) -> tuple[GraphIO, int]:
    """Trace, lower and save one graph (:mod:`.save` picks one file or external data); (I/O, float bytes).

    The file is named after what it holds (:mod:`.hf_layout`): ``weight_bits`` of the
    state's layers when the passes lowered any of them into this graph, else a float graph.
    """
    import shutil

    from onnx import TensorProto

    from .hf_layout import data_file, graph_file, js_dtype
    from .passes import DEFAULT_PASSES, run_passes
    from .qlinear import translation_table
    from .save import initializer_bytes, save_graph, stream_to_scratch, to_proto
    from .trace import trace_graph

    traced = trace_graph(spec, config, translation_table())
    traced_bytes = initializer_bytes(traced)
    scratch = out_dir / f".{spec.name}-scratch" if traced_bytes > config.external_data_bytes else None
    try:
        if scratch is None:
            model = to_proto(traced)
        else:
            model, ctx.store = stream_to_scratch(traced, scratch)
            ctx.base_dir = str(scratch)
        del traced  # the proto (small path) or the scratch files (large path) now hold the weights
        run_passes(model, ctx, DEFAULT_PASSES, spec.name)
        if ctx.store is not None:
            ctx.store.close()  # flushed before save_graph reads lowered.data back
        file = graph_file(spec.name, js_dtype(config.dtype, weight_bits if ctx.lowered else None))
        path = out_dir / file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_graph(model, path, scratch)
    finally:
        if ctx.store is not None:
            ctx.store.close()  # idempotent; also on a failed pass
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    total = sum(_tensor_bytes(t) for t in model.graph.initializer if t.data_type != TensorProto.UNDEFINED)
    data = data_file(path)
    io = GraphIO(file=file, inputs=tuple(spec.input_names), outputs=tuple(spec.output_names),
                 sha256=sha256_file(path), weight_bytes={"total": total, "linear": ctx.linear_bytes,
                                                         "linear_fp16": ctx.linear_fp16_bytes},
                 **({"data_file": str(data.relative_to(out_dir)), "data_sha256": sha256_file(data)}
                    if data.is_file() else {}))
    return io, traced_bytes


def export_graphs(vlm, state, config: ExportConfig, out_dir: Path, log: Callable[[str], None] | None = None,
                  kept_out_of_int4: dict[str, dict[str, Any]] | None = None) -> dict[str, GraphIO]:
    """Trace, lower and save the three graphs; returns their I/O and weight bytes.

    ``kept_out_of_int4`` (filled in when given): the ragged int4 layers lowered as float or int8.
    """
    from .passes import PassContext
    from .trace import graph_specs

    float_dtype = np.dtype(np.float16 if config.dtype == "fp16" else np.float32)
    layers = dict(state.layers) if state is not None else {}
    bits = state.recipe.weights.bits if state is not None else None
    graphs, lowered = {}, set()
    for spec in graph_specs(vlm.model, config):
        if log:
            log(f"exporting {spec.name}")
        ctx = PassContext(float_dtype, layers, ragged_int4=config.ragged_int4)
        graphs[spec.name], _ = _export_one(spec, config, ctx, out_dir, bits)
        lowered |= set(ctx.lowered)
        if kept_out_of_int4 is not None:
            kept_out_of_int4.update(ctx.kept_out_of_int4)
    missing = sorted(set(layers) - lowered)
    if missing:
        # Not "another model": check_state_fits proved every layer exists with its shape.
        raise QvlmError(f"quant-state layer {missing[0]!r} (and {len(missing) - 1} more) exists in the model but "
                        "in none of the traced graphs (the exporter dropped it as dead code); this is an exporter "
                        "bug, please report it with the model's config.json")
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

    from ..load.model import resolve_model_path
    from ..quant.state import load_state
    from .hf_layout import write_hf_files

    config = config or ExportConfig()
    if dtype is not None:
        if dtype == "auto":  # resolved here so the manifest records the dtype actually exported
            source = model if model is not None or quant is None else load_state(Path(quant)).model_path
            dtype = resolve_export_dtype(dtype, resolve_model_path(source))
        config = dataclasses.replace(config, dtype=resolve_export_dtype(dtype, Path(".")))
    vlm, state = prepare_model(model, quant, config, log)
    spec = model_spec(vlm)
    with atomic_directory(Path(out)) as tmp:
        kept: dict[str, dict[str, Any]] = {}
        graphs = export_graphs(vlm, state, config, tmp, log, kept)
        write_hf_files(vlm, tmp, {g: io.file for g, io in graphs.items()},
                       {g for g, io in graphs.items() if io.data_file})
        summary = quant_summary(state, quant)
        if kept:  # only then: other bundles' bundle.json stays byte-identical
            summary["kept_out_of_int4"] = {name: kept[name] for name in sorted(kept)}
            if log:
                log(f"kept {len(kept)} int4 layer(s) whose K is not a multiple of the group size as "
                    f"{config.ragged_int4} (TensorRT cannot parse a ragged last block), e.g. {min(kept)}")
        info = BundleInfo(path=tmp, dtype=config.dtype, opset=config.opset, graphs=graphs, model=spec,
                          quant=summary, processor=".")
        write_bundle_json(info, tmp)
        recorded, inputs = export_identity(vlm.path, quant, config)
        # Where the bundle came from: validate rebuilds the quant state's simulated model from these to
        # check the graphs compute what the state says (the hashes in `inputs` guard against a changed state).
        sources = {"model": str(Path(vlm.path).resolve()), "quant": None if quant is None else str(Path(quant).resolve())}
        write_manifest(tmp, build_manifest(BUNDLE_KIND, recorded, inputs, tmp,
                                           extra={"setting": info.setting, "dtype": config.dtype, "sources": sources}))
    return Path(out)
