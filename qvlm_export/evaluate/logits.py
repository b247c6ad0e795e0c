"""Logit SQNR: how far a quantized model's next-token distribution moves from the FP model's.

Definition (used by ``tools/results_table.py`` and the tests): for each sample ``i`` of a
fixed evaluation set (default: all 500 questions of the built-in eval split; one forward
pass each, and 100-question subsets were seen to differ by up to 2 dB between themselves),
run one forward pass over the prompt exactly as greedy generation sees it (the model's
chat template, left padding, positions counted from the first real token) and take the
logits ``z_i`` at the last prompt position (the first answer token), centred per sample
(``z_i - mean(z_i)``: softmax ignores a constant shift, so it must not count as error).
Then ``logit SQNR = 10 log10( sum_i ||z_i||^2 / sum_i ||z_i - zq_i||^2 )`` in dB, pooled
over the set, with ``z`` from the FP model and ``zq`` from the quantized one.
"""

from __future__ import annotations

import torch

from ..data.synthetic import Sample
from ..load.model import LoadedVLM
from ..quant.functional import sqnr_db

LOGIT_SQNR_DATA = "builtin:eval"


def next_token_logits(vlm: LoadedVLM, samples: list[Sample], batch_size: int = 50) -> torch.Tensor:
    """Centred first-answer-token logits ``[len(samples), vocab]`` (float32, CPU)."""
    from .torch_answerer import TorchAnswerer

    answerer = TorchAnswerer(vlm)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            batch = answerer.inputs(samples[start:start + batch_size])
            positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
            logits = vlm.model(**batch, position_ids=positions).logits[:, -1].float()
            rows.append((logits - logits.mean(dim=-1, keepdim=True)).cpu())
    return torch.cat(rows)


def logit_sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Pooled SQNR in dB of centred logits (see the module docstring)."""
    return sqnr_db(reference, quantized)
