"""Q-VLM + QIG + Q-ViT (registered as ``qvlm_plus``): the combination none of the three papers has.

Q-VLM's plan (entropy probes, dependency partition, Jacobian weights) and block search
(:class:`..qvlm.method.QVLMMethod`) unchanged, with two additions through the search's hooks:

* every block's objective weighs each token's error by QIG's integrated-gradient token weight
  of that block (:mod:`.token_weights`);
* the vision blocks add Q-ViT's DGD term and learn its function-preserving IRM, folded into q/k
  once the block's codes are committed (:mod:`..qvit.block`).

Both off is exactly ``qvlm``. docs/combined.md has the definitions and the ablation.
"""

from __future__ import annotations

import dataclasses

from ...quant.calibrate import BlockContext, SequentialCalibrator
from ...quant.recipe import QuantRecipe
from ..qvit.block import fold_irms, vision_hooks
from ..qvlm.block_search import SearchHooks
from ..qvlm.method import QVLMMethod
from ..registry import register_method
from .config import combined_config
from .token_weights import block_token_weights


@register_method("qvlm_plus")
class QVLMPlus(QVLMMethod):
    """Q-VLM with QIG's token weights and Q-ViT's DGD/IRM; see docs/combined.md."""

    def __init__(self, recipe: QuantRecipe):
        source = f"recipe {recipe.method}-{recipe.setting}"
        self.plus, qvlm = combined_config(recipe.method_args, source)
        super().__init__(dataclasses.replace(recipe, method_args={}))
        self.recipe, self.config = recipe, qvlm
        self.seed = recipe.calibration.seed if qvlm.seed is None else qvlm.seed
        self._pending: tuple[list, list] | None = None

    def plan(self, calibrator: SequentialCalibrator) -> list[list[int]]:
        partition = super().plan(calibrator)
        calibrator.extras["qvlm_plus"] = {"config": self.plus.to_dict()}
        return partition

    def search_hooks(self, ctx: BlockContext) -> SearchHooks | None:
        cfg = self.plus
        weights = block_token_weights(ctx, cfg) if cfg.token_weights else None
        if not cfg.qvit:
            return SearchHooks(token_weights=weights)
        hooks, records, handles = vision_hooks(ctx, cfg.lambda_dgd, cfg.irm, cfg.lr_irm, weights)
        self._pending = (records, handles)
        return hooks

    def after_search(self, ctx: BlockContext) -> None:
        if self._pending is None:
            return
        records, handles = self._pending
        self._pending = None
        for h in handles:
            h.remove()
        if self.plus.irm and records and all(r.q_name in ctx.layers for r in records):
            ctx.extras["qvlm_plus_irm"] = fold_irms(ctx, records)
