"""LLaVA-OneVision (``model_type: llava_onevision``, SigLIP + Qwen2): NeXT's tiles, shrunk past a patch budget.

Packing differs from NeXT in one step: an unpadded feature map larger than
``vision_aspect_ratio`` (``anyres_max_N``) tiles' worth is bilinearly resized
(``families/anyres.py``). The processor differs in where it can be built:
``LlavaOnevisionProcessor`` needs a video processor, and the video processor needs
torchvision, whose registry wheels are built against CUDA torch (``torchvision::nms does
not exist`` on the CPU build). :class:`OnevisionImageTextProcessor` is the image-and-text
half of it, made of the repo's own files (``preprocessor_config.json`` with the PIL image
processor, the tokenizer, ``processor_config.json``, the chat template); it counts image
tokens with HF's processor arithmetic itself, so prompts get the same token counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .llava_next import LlavaNextFamily

PROCESSOR_FILE = "processor_config.json"


def _aspect_budget(vision_aspect_ratio: str) -> int:
    return int(str(vision_aspect_ratio).removeprefix("anyres_max_"))


class OnevisionImageTextProcessor:
    """``LlavaOnevisionProcessor`` for images and text only: same outputs, same files, no video processor."""

    def __init__(self, image_processor: Any, tokenizer: Any, num_image_tokens: int,
                 vision_feature_select_strategy: str = "full", vision_aspect_ratio: str = "anyres_max_9",
                 chat_template: str | None = None, image_token: str = "<image>"):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.num_image_tokens, self.vision_aspect_ratio = int(num_image_tokens), vision_aspect_ratio
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = getattr(tokenizer, "image_token", None) or image_token

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OnevisionImageTextProcessor:
        from transformers import AutoTokenizer, LlavaOnevisionImageProcessor

        path = Path(path)
        raw = json.loads((path / PROCESSOR_FILE).read_text()) if (path / PROCESSOR_FILE).is_file() else {}
        template = path / "chat_template.jinja"
        return cls(LlavaOnevisionImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                   num_image_tokens=raw["num_image_tokens"],
                   vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "full"),
                   vision_aspect_ratio=raw.get("vision_aspect_ratio", "anyres_max_9"),
                   chat_template=template.read_text() if template.is_file() else raw.get("chat_template"),
                   image_token=raw.get("image_token", "<image>"))

    def save_pretrained(self, out: str | Path) -> None:
        out = Path(out)
        self.image_processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template)
        raw = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": self.num_image_tokens,
               "vision_feature_select_strategy": self.vision_feature_select_strategy,
               "vision_aspect_ratio": self.vision_aspect_ratio, "image_token": self.image_token}
        (out / PROCESSOR_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")

    def apply_chat_template(self, conversation: list, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def image_token_count(self, image_size: tuple[int, int], tile_shape: tuple[int, int]) -> int:
        """HF's own count (``LlavaOnevisionProcessor._get_number_of_features``), called on a bare instance."""
        from transformers import LlavaOnevisionProcessor

        counter = object.__new__(LlavaOnevisionProcessor)
        counter.image_processor, counter.num_image_tokens = self.image_processor, self.num_image_tokens
        counter.vision_aspect_ratio = self.vision_aspect_ratio
        count = counter._get_number_of_features(int(image_size[0]), int(image_size[1]), *tile_shape)
        return count - int(self.vision_feature_select_strategy == "default")

    def __call__(self, images: Any = None, text: Any = None, return_tensors: str | None = None,
                 padding: bool | str = False, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        data: dict[str, Any] = {}
        if images is not None:
            data = dict(self.image_processor(images, return_tensors=return_tensors))
            tile_shape = tuple(data["pixel_values"][0][0].shape[-2:])
            counts = iter(self.image_token_count(tuple(size), tile_shape) for size in data["image_sizes"])
            texts = [self._expand(t, counts) for t in texts]
        if texts:
            data.update(self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand(self, text: str, counts: Any) -> str:
        parts = text.split(self.image_token)
        return "".join(p + (self.image_token * next(counts) if i < len(parts) - 1 else "") for i, p in enumerate(parts))

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)


class LlavaOnevisionFamily(LlavaNextFamily):
    model_type = "llava_onevision"
    hf_class = "LlavaOnevisionForConditionalGeneration"

    def max_patches(self, config: Any) -> int | None:
        return _aspect_budget(config.vision_aspect_ratio)

    def load_processor(self, path: Path) -> Any:
        try:
            return super().load_processor(path)
        except (AttributeError, ImportError, OSError, ValueError, RuntimeError):
            return OnevisionImageTextProcessor.from_pretrained(path)

    def _hf_pack(self, model: Any, per_image: Any, image_sizes: Any) -> Any:
        return model.model.pack_image_features(per_image, image_sizes, image_newline=model.model.image_newline,
                                               vision_aspect_ratio=model.config.vision_aspect_ratio)
