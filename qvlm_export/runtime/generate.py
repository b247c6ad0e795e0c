"""Greedy generation with a KV cache over any :class:`~.runner.VLMRunner`.

Written once for every backend (ONNX Runtime, TensorRT). It reproduces what
``transformers``' ``generate(do_sample=False)`` does for a LLaVA model, so a faithful
bundle answers exactly like the PyTorch (simulated) model:

* prompts are left padded; positions count from each row's first real token and
  padding positions get 1 (:func:`position_ids`);
* image features (tiles packed by the model family, ``runtime/images.py``) replace the
  image-token embeddings in order (:func:`merge_image_features`);
* one prefill step with zero-length past, then one decode step per token; the mask grows
  by one column each step; a finished row keeps receiving the pad token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QvlmError
from .images import image_features
from .runner import VLMRunner


def position_ids(attention_mask: np.ndarray, past: int = 0) -> np.ndarray:
    """Left-padding-aware positions of the new tokens (columns ``past:``); padding gets 1, like transformers."""
    full = np.cumsum(attention_mask, axis=-1) - 1
    full = np.where(attention_mask == 0, 1, full)
    return full[:, past:].astype(np.int64)


def merge_image_features(inputs_embeds: np.ndarray, input_ids: np.ndarray, image_features: np.ndarray,
                         image_token_id: int) -> np.ndarray:
    """Scatter image features (``[..., hidden]``, in order) into the image-token positions of ``inputs_embeds``."""
    merged = inputs_embeds.copy()
    positions = input_ids == image_token_id
    features = image_features.reshape(-1, inputs_embeds.shape[-1]).astype(merged.dtype)
    if int(positions.sum()) != features.shape[0]:
        raise QvlmError(f"{int(positions.sum())} image tokens in the prompts but {features.shape[0]} image features; "
                        "the processor and the vision graph disagree about the number of patches")
    merged[positions] = features
    return merged


def prompt_embeds(runner: VLMRunner, input_ids: np.ndarray, images: dict[str, np.ndarray]) -> np.ndarray:
    """Token embeddings of the prompts with every image token replaced by its image feature."""
    return merge_image_features(runner.embed(input_ids), input_ids, image_features(runner, images),
                                runner.info.model.image_token_id)


@dataclass(frozen=True)
class GenerationResult:
    tokens: np.ndarray  # [B, T] new tokens (pad after EOS)
    first_logits: np.ndarray  # [B, vocab] float32 logits of the first generated token


def greedy_generate(runner: VLMRunner, input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: np.ndarray,
                    max_new_tokens: int = 8, image_sizes: np.ndarray | None = None) -> GenerationResult:
    """Greedy decoding of a left-padded batch with one image per prompt (runner must be active).

    ``image_sizes``: (h, w) per image, for any-resolution families (the processor returns it).
    """
    spec = runner.info.model
    if max_new_tokens < 1:
        raise QvlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask, dtype=np.int64)
    images = {"pixel_values": pixel_values, **({} if image_sizes is None else {"image_sizes": image_sizes})}
    embeds = prompt_embeds(runner, input_ids, images)
    batch = input_ids.shape[0]
    logits, past = runner.decode(embeds, mask, position_ids(mask), runner.info.empty_past(batch))
    first = logits[:, -1].astype(np.float32)
    finished = np.zeros(batch, dtype=bool)
    tokens = []
    step_logits = first
    for step in range(max_new_tokens):
        next_ids = np.where(finished, spec.pad_token_id, step_logits.argmax(-1)).astype(np.int64)
        tokens.append(next_ids)
        finished |= next_ids == spec.eos_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits, past = runner.decode(runner.embed(next_ids[:, None]), mask,
                                     position_ids(mask, past=mask.shape[1] - 1), past)
        step_logits = logits[:, -1].astype(np.float32)
    return GenerationResult(tokens=np.stack(tokens, axis=1), first_logits=first)


class RunnerAnswerer:
    """The evaluation ``Answerer`` over a runner: processor from the bundle, greedy generation.

    The runner is activated on first use and stays active until :meth:`close` (or ``with``).
    """

    def __init__(self, runner: VLMRunner, processor: Any = None, max_new_tokens: int = 8):
        self.runner = runner
        self.processor = processor if processor is not None else runner.info.load_processor()
        self.max_new_tokens = max_new_tokens
        self._active = False

    def inputs(self, images: list, questions: list[str]) -> dict[str, np.ndarray]:
        from ..load.model import build_prompt, check_context
        from .images import image_inputs

        prompts = [build_prompt(self.processor, q) for q in questions]
        batch = self.processor(images=images, text=prompts, return_tensors="np", padding=True)
        check_context(int(batch["input_ids"].shape[1]), self.max_new_tokens, self.runner.info.model.max_positions)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                **image_inputs(self.runner.info, batch)}

    def generate(self, images: list, questions: list[str]) -> GenerationResult:
        if not self._active:
            self.runner.activate()
            self._active = True
        return greedy_generate(self.runner, **self.inputs(images, questions), max_new_tokens=self.max_new_tokens)

    def ask(self, images: list, questions: list[str]) -> list[str]:
        tokens = self.generate(images, questions).tokens
        return self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def answer(self, samples: list) -> list[str]:
        return self.ask([s.image for s in samples], [s.question for s in samples])

    def answer_with_logits(self, samples: list, batch_size: int) -> tuple[list[str], np.ndarray]:
        """Answers and the first answer token's logits, centred per sample (``evaluate/logits.py``'s
        definition), in batches of ``batch_size``: what benchmarks compare between bundles."""
        answers, logits = [], []
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            result = self.generate([s.image for s in batch], [s.question for s in batch])
            answers += self.processor.tokenizer.batch_decode(result.tokens, skip_special_tokens=True)
            logits.append(result.first_logits - result.first_logits.mean(-1, keepdims=True))
        return answers, np.concatenate(logits)

    def close(self) -> None:
        if self._active:
            self.runner.deactivate()
            self._active = False

    def __enter__(self) -> RunnerAnswerer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
