"""Any-resolution ("anyres") image packing in NumPy, as LLaVA-NeXT and LLaVA-OneVision do it in PyTorch.

The vision graph runs one tile at a time (``[tiles, 3, S, S] -> [tiles, h*w, hidden]``); a
runtime then rebuilds each image's token sequence from its tiles, exactly as
``LlavaNextModel.pack_image_features`` / ``LlavaOnevisionModel.pack_image_features`` do:

1. tile 0 is the downscaled base image; tiles ``1..n`` cover the image resized into the
   grid resolution that :func:`transformers.image_processing_utils.select_best_resolution`
   picks from ``grid_pinpoints``;
2. the grid tiles are stitched into one ``[hidden, rows*h, cols*w]`` feature map and the
   padding that the image processor added around the aspect ratio is cut off (:func:`unpad`);
3. OneVision only (``max_patches`` set): a map larger than ``max_patches`` tiles' worth is
   bilinearly shrunk (:func:`bilinear_resize`, ``F.interpolate(mode="bilinear")``'s arithmetic);
4. an ``image_newline`` vector closes every row; the base tile's tokens come first.

``layout`` is the dict export writes into ``bundle.json`` (``model.image_layout``):
``grid_pinpoints`` ([[h, w], ...]), ``tile_size`` (pixels), ``patches`` (tokens per tile
side), ``max_patches`` (None for NeXT) and ``image_newline`` (the learned vector).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def best_resolution(image_size: tuple[int, int], grid_pinpoints: list) -> tuple[int, int]:
    """(height, width) of the grid the image processor resized ``image_size`` (h, w) into."""
    from transformers.image_processing_utils import select_best_resolution

    return select_best_resolution(tuple(int(v) for v in image_size), [tuple(p) for p in grid_pinpoints])


def grid_shape(image_size: tuple[int, int], layout: dict[str, Any]) -> tuple[int, int]:
    """(rows, cols) of grid tiles for an image of ``image_size`` (h, w)."""
    height, width = best_resolution(image_size, layout["grid_pinpoints"])
    return height // layout["tile_size"], width // layout["tile_size"]


def tiles_per_image(image_size: tuple[int, int], layout: dict[str, Any]) -> int:
    """Base tile + grid tiles: how many rows of ``pixel_values[i]`` hold real tiles."""
    rows, cols = grid_shape(image_size, layout)
    return rows * cols + 1


def max_tiles(layout: dict[str, Any]) -> int:
    """The most tiles any image can take (the largest pinpoint), for engine profiles."""
    return max((h // layout["tile_size"]) * (w // layout["tile_size"]) for h, w in layout["grid_pinpoints"]) + 1


def real_tiles(pixel_values: np.ndarray, image_sizes: np.ndarray, layout: dict[str, Any]) -> np.ndarray:
    """``[B, max_tiles, 3, S, S]`` (padded per batch) -> ``[sum of real tiles, 3, S, S]`` in image order."""
    counts = [tiles_per_image(tuple(size), layout) for size in np.asarray(image_sizes)]
    return np.concatenate([pixel_values[i, :n] for i, n in enumerate(counts)], axis=0)


def unpad(features: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Cut the aspect-ratio padding off a ``[C, H, W]`` feature map of an image of ``image_size`` (h, w)."""
    orig_h, orig_w = (int(v) for v in image_size)
    cur_h, cur_w = features.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return features[:, pad:cur_h - pad, :]
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return features[:, :, pad:cur_w - pad]


def _linear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of align_corners=False linear resampling (PyTorch's upsample arithmetic)."""
    scale = np.float32(size_in / size_out)
    src = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (src - low).astype(np.float32)


def bilinear_resize(features: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, H, W] -> [C, height, width]`` as ``F.interpolate(x[None], (height, width), mode="bilinear")[0]``."""
    lo, hi, frac = _linear_weights(features.shape[1], height)
    rows = features[:, lo] * (1 - frac)[None, :, None] + features[:, hi] * frac[None, :, None]
    lo, hi, frac = _linear_weights(features.shape[2], width)
    return (rows[:, :, lo] * (1 - frac)[None, None] + rows[:, :, hi] * frac[None, None]).astype(features.dtype)


def pack_image(tile_features: np.ndarray, image_size: tuple[int, int], layout: dict[str, Any]) -> np.ndarray:
    """One image's ``[tiles, h*w, D]`` projector outputs -> its ``[tokens, D]`` sequence."""
    newline = np.asarray(layout["image_newline"], dtype=tile_features.dtype)
    if tile_features.shape[0] == 1:
        return np.concatenate([tile_features[0], newline[None]], axis=0)
    side = layout["patches"]
    base, grid = tile_features[0], tile_features[1:]
    rows, cols = grid_shape(image_size, layout)
    fmap = grid.reshape(rows, cols, side, side, -1).transpose(4, 0, 2, 1, 3).reshape(-1, rows * side, cols * side)
    fmap = unpad(fmap, image_size)
    if layout.get("max_patches"):
        channels, cur_h, cur_w = fmap.shape
        ratio = math.sqrt(cur_h * cur_w / (layout["max_patches"] * side ** 2))
        if ratio > 1.1:
            fmap = bilinear_resize(fmap, int(cur_h // ratio), int(cur_w // ratio))
    fmap = np.concatenate([fmap, np.broadcast_to(newline[:, None, None], (fmap.shape[0], fmap.shape[1], 1))], axis=-1)
    return np.concatenate([base, fmap.reshape(fmap.shape[0], -1).T], axis=0)


def pack_images(tile_features: np.ndarray, image_sizes: np.ndarray, layout: dict[str, Any]) -> np.ndarray:
    """All images' tile features (``real_tiles`` order) -> ``[all image tokens, D]`` in prompt order."""
    out, start = [], 0
    for size in np.asarray(image_sizes):
        n = tiles_per_image(tuple(size), layout)
        out.append(pack_image(tile_features[start:start + n], tuple(size), layout))
        start += n
    return np.concatenate(out, axis=0)
