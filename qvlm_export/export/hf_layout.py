"""The Hugging Face ONNX layout of a bundle: what transformers.js loads unchanged.

A bundle is laid out the way transformers.js (and optimum) expect a LLaVA ONNX model::

    onnx/vision_encoder{sfx}.onnx  onnx/embed_tokens{sfx}.onnx  onnx/decoder_model_merged{sfx}.onnx
    onnx/<file>.onnx_data          ONNX external data, for graphs over ExportConfig.external_data_bytes
    config.json                    the model config + a "transformers.js_config" block (per-file dtype,
                                   external-data files)
    generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja
    processor_config.json, preprocessor_config.json   (image-token count agreed, see below)

``{sfx}`` is transformers.js's dtype suffix for what the file holds: ``""`` fp32 and
``_fp16`` for float graphs (the FP reference, and the embedding of every bundle), ``_int8``
for 8-bit weights (W8A8: int8 QDQ), ``_q4`` / ``_q4f16`` for weights in 4-bit containers
(W4A16, W4A8, W3A16) with an fp32 / fp16 interface.

Image tokens: Python transformers' ``LlavaProcessor`` expands ``<image>`` to
``(H/p)(W/p) + num_additional_image_tokens`` tokens, less one for the ``default`` feature
strategy (the CLS the vision graph drops); transformers.js does not subtract. The bundle's
processor therefore folds the subtraction into ``num_additional_image_tokens`` and says
``full``: both libraries count the same tokens, and Python prompts are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ONNX_DIR = "onnx"
HF_NAMES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q4": "_q4", "q4f16": "_q4f16"}
JS_CONFIG_KEY = "transformers.js_config"


def js_dtype(float_dtype: str, weight_bits: int | None) -> str:
    """transformers.js's dtype for one graph: its float interface and its weights' container (None: float)."""
    if weight_bits is None:
        return "fp16" if float_dtype == "fp16" else "fp32"
    if weight_bits == 8:
        return "int8"
    return "q4f16" if float_dtype == "fp16" else "q4"


def graph_file(graph: str, dtype: str) -> str:
    """The graph's path inside the bundle, e.g. ``onnx/decoder_model_merged_q4.onnx``."""
    return f"{ONNX_DIR}/{HF_NAMES[graph]}{SUFFIXES[dtype]}.onnx"


def data_file(graph_path: Path) -> Path:
    """The external-data file transformers.js loads beside a graph: ``<file>.onnx_data``."""
    return graph_path.with_name(f"{graph_path.name}_data")


def dtype_of(graph: str, file: str) -> str:
    """The transformers.js dtype a graph file's name declares (the inverse of :func:`graph_file`)."""
    suffix = Path(file).name.removesuffix(".onnx").removeprefix(HF_NAMES[graph])
    return next(d for d, s in SUFFIXES.items() if s == suffix)


def js_config(files: dict[str, str], with_data: set[str]) -> dict[str, Any]:
    """The ``transformers.js_config`` block: per-file dtype, and which files have external data."""
    block: dict[str, Any] = {"dtype": {HF_NAMES[g]: dtype_of(g, f) for g, f in sorted(files.items())}}
    if with_data:
        block["use_external_data_format"] = {Path(files[g]).name: 1 for g in sorted(with_data)}
    return block


def _write_json(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def agree_image_tokens(processor_config: dict[str, Any]) -> dict[str, Any]:
    """``processor_config`` with the CLS subtraction folded in, so Python and transformers.js agree."""
    raw = dict(processor_config)
    extra = int(raw.get("num_additional_image_tokens") or 0)
    if raw.get("vision_feature_select_strategy") == "default":
        extra -= 1
    raw["num_additional_image_tokens"], raw["vision_feature_select_strategy"] = extra, "full"
    return raw


def write_hf_files(vlm, out_dir: Path, files: dict[str, str], with_data: set[str]) -> None:
    """config.json (+ transformers.js_config), generation config, tokenizer, chat template, processor files."""
    out_dir = Path(out_dir)
    vlm.processor.save_pretrained(out_dir)
    processor_file = out_dir / "processor_config.json"
    raw = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    _write_json(processor_file, agree_image_tokens(raw))
    image = getattr(vlm.processor, "image_processor", None)
    if image is not None and not (out_dir / "preprocessor_config.json").is_file():
        # transformers.js reads the image processor from here only (and the processor class, without
        # which its AutoProcessor has no tokenizer); Python reads it from either file
        _write_json(out_dir / "preprocessor_config.json",
                    {**(raw.get("image_processor") or image.to_dict()), "processor_class": type(vlm.processor).__name__})
    template, tokenizer_file = out_dir / "chat_template.jinja", out_dir / "tokenizer_config.json"
    if template.is_file() and tokenizer_file.is_file():
        # transformers.js's LlavaProcessor takes the chat template from its tokenizer only
        _write_json(tokenizer_file, {**json.loads(tokenizer_file.read_text()), "chat_template": template.read_text()})
    config = vlm.model.config.to_dict()
    config[JS_CONFIG_KEY] = js_config(files, with_data)
    _write_json(out_dir / "config.json", config)
    generation = getattr(vlm.model, "generation_config", None)
    if generation is not None:
        _write_json(out_dir / "generation_config.json", generation.to_diff_dict())
