"""The vision output of a (simulated) model and its SQNR against the FP model.

*Vision output*: what the vision tower hands to the projector, i.e. the selected hidden
state(s) (``vision_feature_layer``, CLS dropped under the ``default`` strategy), as
:func:`qvlm_export.quant.calibrate.select_image_features` selects it; *image features*: the
projector's output. ``vision SQNR = 10 log10(||v_fp||^2 / ||v_fp - v_q||^2)`` pooled over every
image of the set (``qvlm_export.quant.functional.sqnr_db``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.synthetic import Sample
from ..load.model import LoadedVLM
from ..quant.calibrate import select_image_features
from ..quant.functional import sqnr_db


def vision_outputs(vlm: LoadedVLM, samples: Sequence[Sample], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vision tower output, projector output)`` for the images of ``samples``, concatenated over batches."""
    model, outs, feats = vlm.model, [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            images = [s.image for s in samples[start:start + batch_size]]
            pixels = vlm.family.tiles_torch(model, vlm.processor.image_processor(images, return_tensors="pt"))
            tower = model.get_submodule(vlm.family.vision_tower)
            hidden = tower(pixels.to(model.device, model.dtype), output_hidden_states=True).hidden_states
            selected = select_image_features(model.config, dict(enumerate(hidden)))
            outs.append(selected.float().cpu())
            feats.append(model.get_submodule(vlm.family.projector)(selected).float().cpu())
    return torch.cat(outs), torch.cat(feats)


def vision_sqnr(fp: tuple[torch.Tensor, torch.Tensor], quant: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """SQNR (dB) of the vision output and of the image features against the FP model's."""
    return {"vision_sqnr_db": sqnr_db(fp[0], quant[0]), "image_features_sqnr_db": sqnr_db(fp[1], quant[1])}
