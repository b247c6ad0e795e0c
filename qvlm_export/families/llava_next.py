"""LLaVA-NeXT (``model_type: llava_next``, llava-v1.6): any-resolution tiles, unpadded, a newline per row.

The processor returns ``pixel_values [B, max tiles, 3, S, S]`` (zero tiles pad the batch)
and ``image_sizes [B, 2]``; each image's real tiles go through the vision graph as one
batch, and ``families/anyres.py`` packs them (NumPy) the way ``pack_image_features`` does
(PyTorch; calibration calls the model's own method).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import anyres
from .base import Family


class LlavaNextFamily(Family):
    model_type = "llava_next"
    hf_class = "LlavaNextForConditionalGeneration"
    image_keys = ("pixel_values", "image_sizes")

    def tokens_per_tile(self, config: Any) -> int:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side  # the packing needs a square patch grid, so no CLS survives selection

    def max_patches(self, config: Any) -> int | None:
        return None

    def image_layout(self, model: Any) -> dict[str, Any]:
        cfg = model.config
        newline = model.model.image_newline.detach().float().cpu().numpy()
        return {"grid_pinpoints": [list(map(int, p)) for p in cfg.image_grid_pinpoints],
                "tile_size": int(cfg.vision_config.image_size),
                "patches": int(cfg.vision_config.image_size // cfg.vision_config.patch_size),
                "max_patches": self.max_patches(cfg), "image_newline": [float(v) for v in newline]}

    def max_tiles(self, layout: dict[str, Any]) -> int:
        return anyres.max_tiles(layout)

    def _tile_counts(self, model: Any, image_sizes: Any) -> list[int]:
        layout = {"grid_pinpoints": model.config.image_grid_pinpoints,
                  "tile_size": model.config.vision_config.image_size}
        return [anyres.tiles_per_image(tuple(int(v) for v in size), layout) for size in image_sizes]

    def tiles_torch(self, model: Any, images: dict[str, Any]) -> Any:
        import torch

        counts = self._tile_counts(model, images["image_sizes"])
        return torch.cat([pixels[:n] for pixels, n in zip(images["pixel_values"], counts)], dim=0)

    def pack_torch(self, model: Any, tile_features: Any, images: dict[str, Any]) -> Any:
        import torch

        per_image = torch.split(tile_features, self._tile_counts(model, images["image_sizes"]), dim=0)
        packed, _ = self._hf_pack(model, per_image, images["image_sizes"])
        return torch.cat(packed, dim=0)

    def _hf_pack(self, model: Any, per_image: Any, image_sizes: Any) -> Any:
        return model.model.pack_image_features(per_image, image_sizes, model.config.vision_feature_select_strategy,
                                               image_newline=model.model.image_newline)

    def tiles(self, images: dict[str, np.ndarray], layout: dict[str, Any]) -> np.ndarray:
        return anyres.real_tiles(np.asarray(images["pixel_values"]), np.asarray(images["image_sizes"]), layout)

    def pack(self, tile_features: np.ndarray, images: dict[str, np.ndarray], layout: dict[str, Any]) -> np.ndarray:
        return anyres.pack_images(tile_features, np.asarray(images["image_sizes"]), layout)
