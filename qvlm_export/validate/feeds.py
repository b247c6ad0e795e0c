"""Calibration feeds for per-graph parity, built once from the reference graphs.

Every candidate graph gets exactly the reference's inputs, so graph parity measures the
graph alone, not error carried over from an upstream graph:

* ``vision``: the image tiles of each calibration batch (``pixel_values`` for LLaVA-1.5);
* ``embed``: ``input_ids`` of the prompts;
* ``decoder``: a prefill step (``inputs_embeds`` = reference token embeddings with the
  reference image features scattered into the image-token positions, zero-length past)
  and ``decode_steps`` decode steps (the reference's greedy next token, its ``present``
  as past), so both KV-cache phases are checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ..runtime.bundle import BundleInfo
from ..runtime.generate import merge_image_features, position_ids

RunGraph = Callable[[str, Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def decoder_feeds(run: RunGraph, info: BundleInfo, input_ids: np.ndarray, attention_mask: np.ndarray,
                  image_features: np.ndarray, decode_steps: int = 1) -> list[dict[str, np.ndarray]]:
    """Prefill and ``decode_steps`` decode feeds of one batch, advanced with the reference ``run``."""
    embeds = run("embed", {"input_ids": input_ids})["inputs_embeds"]
    embeds = merge_image_features(embeds, input_ids, image_features, info.model.image_token_id)
    mask = attention_mask.astype(np.int64)
    past = dict(zip(info.past_names(), info.empty_past(input_ids.shape[0])))
    feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids(mask), **past}
    feeds = [feed]
    for _ in range(decode_steps):
        out = run("decoder", feed)
        next_ids = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        presents = {p: out[q] for p, q in zip(info.past_names(), info.present_names())}
        feed = {"inputs_embeds": run("embed", {"input_ids": next_ids})["inputs_embeds"], "attention_mask": mask,
                "position_ids": position_ids(mask, past=mask.shape[1] - 1), **presents}
        feeds.append(feed)
    return feeds
