"""Greedy answers from a PyTorch (FP or simulated-quantized) LLaVA model."""

from __future__ import annotations

from ..data.synthetic import Sample
from ..load.model import LoadedVLM, build_prompt, check_context


class TorchAnswerer:
    """Batched greedy decoding with the model's own processor and chat template."""

    def __init__(self, vlm: LoadedVLM, max_new_tokens: int = 8):
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens

    def inputs(self, samples: list[Sample]):
        processor = self.vlm.processor
        prompts = [build_prompt(processor, s.question) for s in samples]
        batch = processor(images=[s.image for s in samples], text=prompts, return_tensors="pt", padding=True)
        limit = getattr(self.vlm.model.config.get_text_config(), "max_position_embeddings", None)
        check_context(int(batch["input_ids"].shape[1]), self.max_new_tokens, limit)
        return batch.to(self.vlm.model.device)

    def answer(self, samples: list[Sample]) -> list[str]:
        import torch

        batch = self.inputs(samples)
        tok = self.vlm.tokenizer
        with torch.inference_mode():
            out = self.vlm.model.generate(
                **batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return tok.batch_decode(new_tokens, skip_special_tokens=True)
