"""Loading a local Hugging Face LLaVA-family directory, exactly as users load llava-hf models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QvlmError
from ..families import FAMILIES, family_for

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava-shapes"


def resolve_model_path(model: str | Path | None) -> Path:
    """The model directory to use: ``model`` if given, else the embedded default."""
    if isinstance(model, str) and model.startswith("builtin:"):
        from .real_weights import builtin_model_dir

        return builtin_model_dir(model.removeprefix("builtin:"))
    path = Path(model) if model is not None else EMBEDDED_MODEL_DIR
    if not path.exists():
        raise QvlmError(f"model path {str(path)!r} does not exist; pass --model with a local Hugging Face directory")
    if not path.is_dir():
        raise QvlmError(f"model path {str(path)!r} is a file; pass --model with a Hugging Face model directory")
    if (path / "bundle.json").is_file():  # an exported bundle has config.json but no weights
        raise QvlmError(f"{str(path)!r} is an ONNX bundle, not a Hugging Face model directory; pass it as --bundle "
                        "(or pass --model with the directory it was exported from)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QvlmError(f"{str(path)!r} has no config.json; it is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise QvlmError(f"{config_file} is not valid JSON ({exc.msg}); re-save the model") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    quantized = config.get("quantization_config") if isinstance(config, dict) else None
    if quantized:  # transformers would load it through bitsandbytes/GPTQ kernels and refuse .float()
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise QvlmError(f"{str(path)!r} is an already-quantized checkpoint (config.json quantization_config, "
                        f"{method}); pass the unquantized FP16/BF16/FP32 model it was made from")
    if model_type not in FAMILIES:
        raise QvlmError(
            f"{str(path)!r} is a {model_type!r} model, not a LLaVA-family model "
            f"(config.json model_type must be one of {sorted(FAMILIES)})"
        )
    return path


@dataclass
class LoadedVLM:
    """A model, its processor, and where they came from."""

    model: Any  # the family's HF class (transformers.LlavaForConditionalGeneration, ...)
    processor: Any  # its processor (transformers.LlavaProcessor, ...)
    path: Path

    @property
    def family(self):
        return family_for(self.model.config.model_type)

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_vlm(model: str | Path | None = None, device: str = "cpu", dtype: str = "fp32") -> LoadedVLM:
    """Load processor and model through the family's processor and HF class (``families/``).

    ``dtype``: fp32 | fp16 | bf16 (or a torch dtype name). Loading straight into the dtype
    a stage computes in avoids a converted second copy of every weight.
    """
    import torch
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model)
    family = family_for(json.loads((path / "config.json").read_text()).get("model_type"))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        processor = family.load_processor(path)
        vlm = family.model_class().from_pretrained(path, dtype=getattr(torch, TORCH_DTYPES.get(dtype, dtype)))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QvlmError(f"could not load the model in {str(path)!r}: {first}") from None
    except RuntimeError as exc:
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise QvlmError(f"the weights in {str(path)!r} do not match its config.json (tensor shapes differ from "
                        f"what the config describes); re-save the model or fix config.json") from None
    processor.tokenizer.padding_side = "left"
    return LoadedVLM(model=vlm.to(device).eval(), processor=processor, path=path)


def check_question(processor, question: str) -> None:
    """One-line errors for questions no prompt can hold: empty, or carrying the image placeholder."""
    if not isinstance(question, str) or not question.strip():
        raise QvlmError("the question is empty; ask something about the image")
    token = getattr(processor, "image_token", None) or "<image>"
    if token in question:  # the processor would count one image per placeholder and refuse the batch
        raise QvlmError(f"the question contains the image placeholder {token!r}; remove it (the chat template "
                        "inserts the image)")


def check_context(prompt_tokens: int, max_new_tokens: int, max_positions: int | None) -> None:
    """Refuse a prompt that, with the tokens to generate, runs past the model's position range."""
    if max_positions is not None and prompt_tokens + max_new_tokens > max_positions:
        raise QvlmError(f"the prompt is {prompt_tokens} tokens (image included); with {max_new_tokens} new tokens it "
                        f"exceeds the model's {max_positions} positions; shorten the question")


def build_prompt(processor, question: str) -> str:
    """The model's own chat format for one image and one question."""
    check_question(processor, question)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"USER: {image_token}\n{question} ASSISTANT:"
