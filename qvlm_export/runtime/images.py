"""Image features for a prompt batch on any backend: tiles through the vision graph, packed by the family.

LLaVA-1.5 bundles feed ``pixel_values`` straight through; any-resolution bundles
(``model.image_layout`` set) cut the processor's padded tile batch to the real tiles, run
them as one vision batch and pack the tile features into each image's token sequence
(``qvlm_export.families``), which then replace the image tokens in prompt order.
"""

from __future__ import annotations

import numpy as np

from ..families import family_for
from .runner import VLMRunner


def image_inputs(info, encoding) -> dict[str, np.ndarray]:
    """The processor outputs the bundle's family takes (``pixel_values``, and ``image_sizes`` where tiled)."""
    family = family_for(info.model.family)
    return {key: np.asarray(encoding[key]) for key in family.image_keys}


def vision_tiles(info, images: dict[str, np.ndarray]) -> np.ndarray:
    """The vision graph's input batch (one row per tile) in the bundle's float dtype."""
    tiles = family_for(info.model.family).tiles(images, info.model.image_layout)
    return np.ascontiguousarray(tiles, dtype=info.float_dtype)


def pack_features(info, tile_features: np.ndarray, images: dict[str, np.ndarray]) -> np.ndarray:
    """Vision graph outputs -> ``[image tokens, hidden]`` in prompt order."""
    return family_for(info.model.family).pack(tile_features, images, info.model.image_layout)


def image_features(runner: VLMRunner, images: dict[str, np.ndarray]) -> np.ndarray:
    """Every image token's feature for a batch (runner must be active)."""
    info = runner.info
    return pack_features(info, runner.vision(vision_tiles(info, images)), images)
