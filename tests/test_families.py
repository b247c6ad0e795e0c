"""The model-family seam and the any-resolution families (LLaVA-NeXT, LLaVA-OneVision), without exports.

The runtime packs tile features in NumPy (``families/anyres.py``); the reference is the HF
model's own ``pack_image_features``/``get_image_features``. Images of several aspect ratios
and sizes, tiny random-weight models (1 vision + 1 text layer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qvlm_export.errors import QvlmError
from qvlm_export.families import FAMILIES, family_for
from qvlm_export.families.anyres import bilinear_resize
from qvlm_export.load.model import build_prompt, load_vlm
from qvlm_export.load.tiny import save_tiny_anyres_model

# (width, height): 1:1, 2:1, 1:3, 3:2 and a large square (OneVision shrinks its 3x3 grid)
SIZES = [(64, 64), (128, 64), (40, 120), (300, 200), (180, 180)]


def images(sizes=SIZES) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype(np.uint8))
            for i, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres_vlm(request, tmp_path_factory):
    path = save_tiny_anyres_model(tmp_path_factory.mktemp(request.param) / "model", family=request.param,
                                  vision_layers=1, text_layers=1, seed=1)
    return load_vlm(path)


def encode(vlm, imgs):
    prompts = [build_prompt(vlm.processor, "what color is the shape") for _ in imgs]
    return vlm.processor(images=imgs, text=prompts, return_tensors="pt", padding=True)


def hf_image_features(vlm, enc) -> np.ndarray:
    extra = {"vision_aspect_ratio": vlm.model.config.vision_aspect_ratio} if vlm.family.model_type == "llava_onevision" else {}
    with torch.no_grad():
        out = vlm.model.model.get_image_features(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"], **extra)
    return torch.cat(out.pooler_output, dim=0).numpy()


def test_registry_has_the_three_families_and_refuses_others():
    assert sorted(FAMILIES) == ["llava", "llava_next", "llava_onevision"]
    with pytest.raises(QvlmError, match="model_type 'qwen2_vl' is not supported"):
        family_for("qwen2_vl")


def test_numpy_packing_equals_the_hf_model(anyres_vlm):
    """Tiles -> per-tile vision graph -> NumPy packing == HF get_image_features, every aspect ratio."""
    from qvlm_export.export.wrappers import VisionGraph

    vlm, family = anyres_vlm, anyres_vlm.family
    enc = encode(vlm, images())
    layout = family.image_layout(vlm.model)
    arrays = {k: enc[k].numpy() for k in family.image_keys}
    tiles = family.tiles(arrays, layout)
    with torch.no_grad():
        tile_features = VisionGraph(vlm.model)(torch.from_numpy(tiles)).numpy()
    got, ref = family.pack(tile_features, arrays, layout), hf_image_features(vlm, enc)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5
    # every image got as many tokens as its features: the processor's counts agree with the packing
    image_tokens = (enc["input_ids"] == vlm.model.config.image_token_id).sum().item()
    assert image_tokens == ref.shape[0]


def test_onevision_shrinks_large_grids_and_next_does_not(anyres_vlm):
    """The 180x180 image fills a 3x3 grid: OneVision's anyres_max_2 shrinks it (fewer tokens than NeXT's 12x13)."""
    vlm = anyres_vlm
    enc = encode(vlm, images([(180, 180)]))
    tokens = int((enc["input_ids"] == vlm.model.config.image_token_id).sum())
    side = 4  # patches per tile side in the tiny config
    full = side * side + 3 * side * (3 * side + 1)  # base tile + 12 rows of 12 patches and a newline
    if vlm.family.model_type == "llava_next":
        assert tokens == full
    else:
        assert tokens < full


def test_torch_packing_is_the_models_own(anyres_vlm):
    """Calibration's pack_torch feeds the decoder exactly what the HF forward scatters."""
    vlm, family = anyres_vlm, anyres_vlm.family
    enc = encode(vlm, images())
    with torch.no_grad():
        tiles = family.tiles_torch(vlm.model, enc)
        from qvlm_export.export.wrappers import VisionGraph

        packed = family.pack_torch(vlm.model, VisionGraph(vlm.model)(tiles), enc).numpy()
    assert np.array_equal(packed, hf_image_features(vlm, enc))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 13), st.integers(2, 13), st.integers(1, 9), st.integers(1, 9))
def test_bilinear_resize_matches_torch(h, w, out_h, out_w):
    x = np.random.RandomState(h * 100 + w).randn(3, h, w).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], [out_h, out_w], mode="bilinear")[0].numpy()
    assert np.abs(bilinear_resize(x, out_h, out_w) - ref).max() < 1e-5
