"""Engine plans that fit the model they are for: image-token budgets, derived profiles, tensor limits.

A build profile is written for a deployment target, a bundle for a model: this module
checks the one against the other before anything is built (:func:`check_fits`), and
sizes a profile from the bundle on request (:func:`derive_profile`, ``--profile auto``):

* one prompt holds the image tokens of one image (``image_seq_length`` for LLaVA-1.5,
  the any-resolution bound of :func:`max_image_tokens` for NeXT / OneVision) plus text;
* TensorRT tensors hold at most 2^31-1 elements: :func:`largest_tensors` lists the
  biggest activations of every engine at the profile's maximum shapes (logits, attention
  scores, MLP activations, KV cache, vision attention), from bundle.json and the HF
  ``config.json`` the bundle carries.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..errors import QvlmError
from .profiles import BuildProfile

TRT_MAX_ELEMENTS = 2 ** 31 - 1  # TensorRT's per-tensor element limit
MIN_TEXT_TOKENS = 8  # the shortest chat-template prompt around one image ("USER: <image>\n ASSISTANT:")


def _anyres_grid_tokens(rows: int, cols: int, side: int, max_patches: int | None) -> int:
    """Most tokens one grid of ``rows x cols`` tiles yields over every unpadding (families/anyres.pack_image)."""
    height, width = rows * side, cols * side
    shapes = [(h, width) for h in range(1, height + 1)] + [(height, w) for w in range(1, width + 1)]
    best = 0
    for h, w in shapes:
        if max_patches:
            ratio = math.sqrt(h * w / (max_patches * side ** 2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
        best = max(best, h * (w + 1))  # + one image_newline per row
    return best


def max_image_tokens(model: Any) -> int:
    """The most image tokens one image can put in a prompt (a bundle's ``ModelSpec``)."""
    layout = model.image_layout or {}
    if not layout:
        return int(model.image_seq_length)
    side, tile = int(layout["patches"]), int(layout["tile_size"])
    grids = {(h // tile, w // tile) for h, w in layout["grid_pinpoints"]}
    grid = max(_anyres_grid_tokens(r, c, side, layout.get("max_patches")) for r, c in grids)
    return side * side + grid  # the base tile's tokens come first


def hf_config(bundle: Path) -> dict[str, Any]:
    """The HF ``config.json`` a bundle carries (top level, or ``processor/`` in older layouts); {} if none."""
    for path in (Path(bundle) / "config.json", Path(bundle) / "processor" / "config.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _vision_shape(config: dict[str, Any]) -> tuple[int, int, int] | None:
    """(tokens per tile, heads, MLP width) of the vision tower, or None when the config does not say."""
    vision = config.get("vision_config") or {}
    try:
        side = int(vision["image_size"]) // int(vision["patch_size"])
        cls = 0 if "siglip" in str(vision.get("model_type", "")) else 1
        return side * side + cls, int(vision["num_attention_heads"]), int(vision["intermediate_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def largest_tensors(info: Any, profile: BuildProfile, tiles: int,
                    config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(what, max shape) of the biggest activations each engine holds under ``profile``."""
    m = info.model
    batch, prompt, context = profile.max_batch, profile.max_prompt, profile.max_context
    heads = max(1, m.hidden_size // m.head_dim) if m.head_dim else m.num_kv_heads
    text = config.get("text_config") or {}
    last = profile.decoder_logits == "last"  # .last_token: the engine's logits hold one position
    out = [("decoder prefill logits", (batch, 1 if last else prompt, m.vocab_size)),
           ("decoder prefill attention scores", (batch, heads, prompt, prompt)),
           ("decoder KV cache (one layer's keys)", (batch, m.num_kv_heads, context, m.head_dim)),
           ("embed output", (batch, prompt, m.hidden_size))]
    if text.get("intermediate_size"):
        out.append(("decoder prefill MLP activation", (batch, prompt, int(text["intermediate_size"]))))
    vision = _vision_shape(config)
    if vision is not None:
        tokens, vheads, width = vision
        out += [("vision attention scores", (batch * tiles, vheads, tokens, tokens)),
                ("vision MLP activation", (batch * tiles, tokens, width))]
    return out


def check_fits(info: Any, profile: BuildProfile, tiles: int, config: dict[str, Any]) -> None:
    """Refuse, in one line, a profile that cannot hold one image prompt or needs a tensor over 2^31-1 elements."""
    image = max_image_tokens(info.model)
    need = image + MIN_TEXT_TOKENS
    family = info.model.family
    if profile.max_prompt < need:
        raise QvlmError(f"profile {profile.name!r} allows prompts of {profile.max_prompt} tokens, but one image takes "
                        f"{image} image tokens in this {family} bundle ({need} with the shortest chat prompt); "
                        f"build with --profile auto (sized from the bundle) or set max_prompt >= {need}")
    for what, shape in largest_tensors(info, profile, tiles, config):
        count = math.prod(shape)
        if count > TRT_MAX_ELEMENTS:
            raise QvlmError(f"profile {profile.name!r} needs a {what} tensor of shape {list(shape)} ({count:,} "
                            f"elements), over TensorRT's 2^31-1; lower max_batch or max_prompt/max_context, "
                            f"or use --profile auto")


def derive_profile(info: Any, base: BuildProfile, tiles: int, config: dict[str, Any]) -> BuildProfile:
    """``base`` with max_prompt = one image's tokens + ``base.text_tokens``, max_context = that + ``new_tokens``.

    The context is capped at the text model's ``max_position_embeddings``; max_batch is
    lowered (never raised) until every tensor fits TensorRT's element limit.
    """
    image = max_image_tokens(info.model)
    prompt, context = image + base.text_tokens, image + base.text_tokens + base.new_tokens
    limit = info.model.max_positions
    if limit:
        if image + MIN_TEXT_TOKENS >= limit:
            raise QvlmError(f"one image takes {image} tokens but the model's context is {limit} positions; "
                            f"no profile can serve this {info.model.family} bundle")
        context = min(context, int(limit))
        prompt = min(prompt, context - 1)
    name = base.name if base.name.startswith("auto") else f"auto:{base.name}"
    derived = dataclasses.replace(base, name=name, max_prompt=prompt, opt_prompt=None, max_context=context,
                                  opt_context=None, size_from_bundle=False)
    while True:
        try:
            check_fits(info, derived, tiles, config)
            break
        except QvlmError:
            if derived.max_batch == 1:
                raise
            half = derived.max_batch // 2
            derived = dataclasses.replace(derived, max_batch=half,
                                          opt_batch=None if derived.opt_batch is None else min(derived.opt_batch, half))
    return derived
