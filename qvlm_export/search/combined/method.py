"""Q-VLM + QIG + Q-ViT (registered as ``qvlm_plus``): the combination none of the three papers has.

Q-VLM's plan (entropy probes, dependency partition, Jacobian weights) and block search
(:class:`..qvlm.method.QVLMMethod`) unchanged, with two additions through the search's hooks:

* every block's objective weighs each token's error by QIG's integrated-gradient token weight
  of that block (:mod:`.token_weights`);
* the vision blocks add Q-ViT's DGD term and learn its function-preserving IRM, folded into q/k
  once the block's codes are committed (:mod:`..qvit.block`).

With ``choose_per_block`` every block is also searched as plain Q-VLM and the one with the
smaller held-out unweighted block error is kept (:mod:`.choice`).
Both additions off is exactly ``qvlm``. docs/combined.md has the definitions and the ablation.
"""

from __future__ import annotations

import dataclasses

from ...quant.calibrate import BlockContext, SequentialCalibrator
from ...quant.recipe import QuantRecipe
from ..qvit.block import fold_irms, vision_hooks
from ..qvlm.block_search import SearchHooks
from ..qvlm.method import QVLMMethod
from ..qvlm.probes import uses_mask
from ..registry import register_method
from .choice import HeldOutJudge, restore_linears
from .config import CombinedConfig, combined_config
from .token_weights import block_token_weights


@register_method("qvlm_plus")
class QVLMPlus(QVLMMethod):
    """Q-VLM with QIG's token weights and Q-ViT's DGD/IRM; see docs/combined.md."""

    config_type = CombinedConfig  # its own options; ``config`` is the Q-VLM search's

    def __init__(self, recipe: QuantRecipe):
        source = f"recipe {recipe.method}-{recipe.setting}"
        self.plus, qvlm = combined_config(recipe.method_args, source)
        super().__init__(dataclasses.replace(recipe, method_args={}))
        self.recipe, self.config = recipe, dataclasses.replace(qvlm, progress=recipe.display.progress)
        self.seed = recipe.calibration.seed if qvlm.seed is None else qvlm.seed
        self._pending: tuple[list, list] | None = None
        self._plain = False  # this pass is plain Q-VLM (choose_per_block)
        self._deferred: list | None = None  # IRM records whose fold waits for the choice

    @property
    def adds_anything(self) -> bool:
        return self.plus.token_weights or self.plus.qvit

    def plan(self, calibrator: SequentialCalibrator) -> list[list[int]]:
        partition = super().plan(calibrator)
        calibrator.extras["qvlm_plus"] = {"config": self.plus.to_dict()}
        return partition

    def block(self, ctx: BlockContext) -> None:
        if not (self.plus.choose_per_block and self.adds_anything and ctx.linears()):
            super().block(ctx)
            return
        names = [u.name for u in ctx.units]
        originals = dict(ctx.linears())
        masks = [m.to(ctx.q_inputs[0].device) if uses_mask(ctx.units[0]) else None for m in self.masks] \
            if self.masks is not None else [None] * len(ctx.q_inputs)
        judge = HeldOutJudge(ctx, self.config, masks)
        self._plain = True
        try:
            super().block(ctx)
        finally:
            self._plain = False
        plain_layers = {n: ctx.layers[n] for n in originals}
        plain_stats, plain_err = ctx.extras["qvlm_blocks"], judge()
        restore_linears(ctx, originals)
        self._deferred = []
        super().block(ctx)
        plus_err, records, self._deferred = judge(), self._deferred, None
        wins = plus_err[0] < plain_err[0] and (self.plus.choose_on == "held" or plus_err[1] < plain_err[1])
        chosen = "qvlm_plus" if wins else "qvlm"
        if chosen == "qvlm":
            for name, layer in plain_layers.items():
                ctx.replace_linear(name, layer)
            ctx.extras["qvlm_blocks"] = plain_stats
        elif records:
            ctx.extras["qvlm_plus_irm"] = fold_irms(ctx, records)
        ctx.extras["qvlm_plus_choice"] = {names[0]: {
            "qvlm_held_error": plain_err[0], "plus_held_error": plus_err[0], "qvlm_error": plain_err[1],
            "plus_error": plus_err[1], "chosen": chosen}}

    def search_hooks(self, ctx: BlockContext) -> SearchHooks | None:
        cfg = self.plus
        if self._plain:
            return None
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
        if not (self.plus.irm and records and all(r.q_name in ctx.layers for r in records)):
            return
        if self._deferred is not None:  # choose_per_block: fold only if this search is kept
            self._deferred.extend(records)
        else:
            ctx.extras["qvlm_plus_irm"] = fold_irms(ctx, records)
