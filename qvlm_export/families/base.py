"""What a model family is, in one place: where its layers live, how it loads, how images become tokens.

Calibration (``quant/calibrate.py``), export (``export/api.py``) and the runtime
(``runtime/images.py``) ask a :class:`Family` instead of knowing LLaVA-1.5's layout. The
base class *is* LLaVA-1.5 (one image = one tile, its projected patches in order); a family
that tiles images overrides the image methods. Families are registered in
``families/__init__.py``: adding one is a module with a subclass plus a registry line.

Two views of the same image path, kept in step by the parity tests:

* PyTorch (calibration, reference): :meth:`tiles_torch` and :meth:`pack_torch`, which call
  the HF model's own code where it has it;
* NumPy (every runtime): :meth:`tiles` and :meth:`pack` over the ``image_layout`` that
  export writes into ``bundle.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Family:
    """LLaVA-1.5 (``model_type: llava``): one tile per image, no image layout in the bundle."""

    model_type = "llava"
    hf_class = "LlavaForConditionalGeneration"
    # Module paths: calibration (quant/calibrate.py, quant/modules.py, quant/placement.py) reads them here.
    vision_tower = "model.vision_tower"
    vision_layers = "model.vision_tower.encoder.layers"
    projector = "model.multi_modal_projector"
    language_model = "model.language_model"
    embed_tokens = "model.language_model.embed_tokens"
    decoder_layers = "model.language_model.layers"
    final_norm = "model.language_model.norm"
    lm_head = "lm_head"
    # processor outputs that carry the image, in the order the runtime takes them
    image_keys: tuple[str, ...] = ("pixel_values",)

    # -- module paths -----------------------------------------------------------------
    def components(self) -> dict[str, str]:
        """Recipe ``modules`` component -> the module path its Linears live under (lm_head: that Linear)."""
        return {"vision_tower": self.vision_tower, "projector": self.projector,
                "language_model": self.language_model, "lm_head": self.lm_head}

    def component_of(self, name: str) -> str | None:
        """The component a module name belongs to (None: none the recipe can enable)."""
        for comp, path in self.components().items():
            inside = name == path if comp == "lm_head" else name.startswith(path + ".")  # lm_head is one Linear
            if inside:
                return comp
        return None

    def layer_stacks(self) -> tuple[str, str]:
        """The two layer lists the calibration walks: vision encoder layers and decoder layers."""
        return self.vision_layers, self.decoder_layers

    # -- loading ----------------------------------------------------------------------
    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.hf_class)

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    # -- geometry ---------------------------------------------------------------------
    def tokens_per_tile(self, config: Any) -> int:
        """Image features one tile yields (the vision graph's second output dimension)."""
        return int(config.image_seq_length)

    def image_layout(self, model: Any) -> dict[str, Any]:
        """What a runtime needs to turn tile features into image tokens ({} for one tile per image)."""
        return {}

    def max_tiles(self, layout: dict[str, Any]) -> int:
        """Tiles one image can take (the vision graph's batch per image)."""
        return 1

    # -- PyTorch view -----------------------------------------------------------------
    def tiles_torch(self, model: Any, images: dict[str, Any]) -> Any:
        """``[tiles, 3, S, S]`` pixel batch for the vision tower from processor outputs."""
        return images["pixel_values"]

    def pack_torch(self, model: Any, tile_features: Any, images: dict[str, Any]) -> Any:
        """Projector outputs of :meth:`tiles_torch`'s batch -> ``[image tokens, D]`` in prompt order."""
        return tile_features.reshape(-1, tile_features.shape[-1])

    # -- NumPy view (runtimes) --------------------------------------------------------
    def tiles(self, images: dict[str, np.ndarray], layout: dict[str, Any]) -> np.ndarray:
        return np.asarray(images["pixel_values"])

    def pack(self, tile_features: np.ndarray, images: dict[str, np.ndarray], layout: dict[str, Any]) -> np.ndarray:
        return tile_features.reshape(-1, tile_features.shape[-1])
