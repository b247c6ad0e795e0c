"""The Q-ViT method (registered as ``qvit``): Q-ViT's IRM and DGD in a post-training block reconstruction.

The vision layers are reconstructed ``vision_block_units`` at a time (default: the whole used
tower as one block, whose output is the vision output), every other unit is its own block;
each block is searched by Q-VLM's block reconstruction (AdaRound rounding,
LSQ static activation steps, :mod:`..qvlm.block_search`) with, in the vision units, the DGD
term against the FP block and the learnable function-preserving IRM (:mod:`.block`), folded
into q/k at the end (nothing added at run time). The projector and the language model get the
same reconstruction without the Q-ViT terms, so a ``qvit`` state is a whole quantized model;
compare its vision output with ``tools/vision_sqnr.py``.
"""

from __future__ import annotations

import dataclasses
import zlib

from ...quant.calibrate import BlockContext, SequentialCalibrator
from ...quant.layernorm_irm import EXTRAS_KEY
from ...quant.recipe import QuantRecipe
from ..qvlm.block_search import search_block
from ..qvlm.config import QVLMConfig, config_from_args
from ..qvlm.probes import uses_mask
from ..registry import Capabilities, register_method
from .block import fold_irms, layernorm_extras, vision_hooks
from .config import QViTConfig, qvit_config


def block_seed(seed: int, names: list[str]) -> int:
    return (seed * 1_000_003 + zlib.crc32(",".join(names).encode())) % (2**63)


def search_config(cfg: QViTConfig) -> QVLMConfig:
    """The Q-VLM search settings a Q-ViT block reconstruction runs with (no partition, no entropy term)."""
    return config_from_args({"iterations": cfg.iterations, "lr_round": cfg.lr_round, "lr_step": cfg.lr_step,
                             "start": list(cfg.start), "holdout": cfg.holdout, "dependency_mining": False,
                             "visual_optimization": False, "progress": cfg.progress}, source="qvit")


def vision_partition(kinds: list[str], size: int) -> list[list[int]]:
    """Consecutive vision units in blocks of ``size`` (0: all of them), every other unit alone."""
    vision = [i for i, k in enumerate(kinds) if k == "vision"]
    size = size or max(len(vision), 1)
    blocks = [vision[i:i + size] for i in range(0, len(vision), size)]
    return blocks + [[i] for i, k in enumerate(kinds) if k != "vision"]


@register_method("qvit")
class QViTMethod:
    """Block reconstruction with Q-ViT's DGD and IRM in the vision blocks; see docs/qvit.md."""

    config_type = QViTConfig
    capabilities = Capabilities()

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config = dataclasses.replace(qvit_config(recipe.method_args, source=f"recipe {recipe.method}-{recipe.setting}"),
                                          progress=recipe.display.progress)
        self.seed = recipe.calibration.seed if self.config.seed is None else self.config.seed
        self.masks = None

    def plan(self, calibrator: SequentialCalibrator) -> list[list[int]]:
        self.masks = [b.attention_mask.bool() for b in calibrator.batches]
        partition = vision_partition([u.kind for u in calibrator.units], self.config.vision_block_units)
        calibrator.extras["qvit"] = {"config": self.config.to_dict(), "seed": self.seed, "partition": partition}
        return partition

    def block(self, ctx: BlockContext) -> None:
        if not ctx.linears():
            return
        cfg, names = self.config, [u.name for u in ctx.units]
        masks = [m.to(ctx.q_inputs[0].device) if uses_mask(ctx.units[0]) else None for m in self.masks]
        hooks, records, handles = vision_hooks(ctx, cfg.lambda_dgd, cfg.irm, cfg.lr_irm, form=cfg.irm_form)
        try:
            search = dataclasses.replace(search_config(cfg), iterations=cfg.iterations * len(ctx.units))
            stats = search_block(ctx, search, masks, block_seed(self.seed, names), hooks=hooks)
        finally:
            for h in handles:
                h.remove()
        if cfg.irm and records and cfg.irm_form == "layernorm":
            ctx.extras[EXTRAS_KEY] = layernorm_extras(records)  # simulated only: the graph cannot carry it
        elif cfg.irm and records:
            stats["irm"] = fold_irms(ctx, records)
        ctx.extras["qvit_blocks"] = {names[0]: stats}
