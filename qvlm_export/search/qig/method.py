"""The QIG method (registered as ``qig``): AWQ's scale search with QIG's per-token weights.

Per block (one unit: a vision layer, the projector, a decoder layer), per scale group in
forward order: the group's token weights by quantization-aware integrated gradients
(:func:`.scale_search.group_token_weights`), the weighted exponent search
(:func:`.scale_search.weighted_scale_search`), the scales folded into the producer (norm or
Linear, so nothing is added at run time). Then, as AWQ, the per-group clipping search and
round-to-nearest codes with static per-tensor activation scales. Unlike QIG's release the
vision tower and the projector are quantized too; a recipe's ``modules`` keeps them FP.
"""

from __future__ import annotations

import dataclasses

from ...quant.calibrate import BlockContext, SequentialCalibrator
from ...quant.recipe import QuantRecipe
from ..awq import AWQ
from ..base import quantize_sequentially, record_rewritten_parameters, snapshot_parameters
from ..qvlm.block_search import split_batches
from ..registry import Capabilities, register_method
from ..smoothing import ScaleGroup, find_scale_groups, fold_scales
from ..stats import collect_input_stats
from .config import QIGConfig, qig_config
from .scale_search import group_token_weights, scale_error, weighted_scale_search


def awq_for_clipping(recipe: QuantRecipe, cfg: QIGConfig) -> AWQ:
    """An AWQ method object with QIG's clipping settings (its ``rule`` does the clipping and rounding)."""
    args = {"grid": cfg.grid, "clip": cfg.clip, "clip_grid": cfg.clip_grid, "max_shrink": cfg.max_shrink,
            "clip_tokens": cfg.clip_tokens}
    return AWQ(dataclasses.replace(recipe, method="awq", method_args=args))


@register_method("qig")
class QIGMethod:
    """Token-weighted (integrated-gradient) AWQ scale search; see docs/qig.md."""

    config_type = QIGConfig
    capabilities = Capabilities()

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config = qig_config(recipe.method_args, source=f"recipe {recipe.method}-{recipe.setting}")
        self.awq = awq_for_clipping(recipe, self.config)
        self.searches = 0

    def plan(self, calibrator: SequentialCalibrator) -> None:
        calibrator.extras["qig"] = {"config": self.config.to_dict()}
        return None

    def uses_token_weights(self) -> bool:
        cfg = self.config
        if not cfg.token_weighting:
            return False
        return not (cfg.code_faithful and self.searches < cfg.faithful_uniform_searches)

    def block(self, ctx: BlockContext) -> None:
        cfg, before, record = self.config, snapshot_parameters(ctx), {}
        for group in find_scale_groups(ctx, through_gate=True):
            stats = collect_input_stats(ctx, group.consumers)
            absmean = stats[group.consumers[0]].channel_absmean
            weights = group_token_weights(ctx, group, stats, cfg) if self.uses_token_weights() else None
            choose = cfg.awq_candidate and weights is not None
            train, held = split_batches(len(ctx.q_inputs), cfg.holdout) if choose else (None, [])
            ratio, s, losses = weighted_scale_search(ctx, group, absmean, self.recipe, cfg.grid, weights, cfg.loss,
                                                     padded=cfg.code_faithful, batches=train if held else None)
            self.searches += 1
            entry = {"ratio": ratio, "weighted": weights is not None, "loss": min(losses),
                     "max_token_weight": None if weights is None else max(float(w.max()) for w in weights)}
            if held:
                ratio, s, entry["candidate"] = self.choose_candidate(ctx, group, absmean, weights, ratio, s, train, held)
            fold_scales(ctx.root, group, s)
            entry["ratio"] = ratio
            record[group.producer] = entry
        record_rewritten_parameters(ctx, before)
        ctx.extras["qig_groups"] = record
        keep = cfg.clip_tokens if cfg.clip else 0
        quantize_sequentially(ctx, self.awq.rule, keep_tokens=keep)

    def choose_candidate(self, ctx: BlockContext, group: ScaleGroup, absmean, weights, ratio: float, s,
                         train: list[int], held: list[int]):
        """QIG's scales (searched on ``train``) or AWQ's (uniform MSE on ``train``), whichever has the smaller
        ``select_by`` loss on the held-out batches (ties: QIG's). Returns ``(r, s, record)``."""
        cfg = self.config
        r_awq, s_awq, _ = weighted_scale_search(ctx, group, absmean, self.recipe, cfg.grid, None, "mse",
                                                padded=cfg.code_faithful, batches=train)
        sel_w, sel_loss = (weights, cfg.loss) if cfg.select_by == "qig" else (None, "mse")
        errs = [scale_error(ctx, group, cand, self.recipe, sel_w, sel_loss, cfg.code_faithful, held)
                for cand in (s, s_awq)]
        chose_awq = errs[1] < errs[0]
        record = {"qig_ratio": ratio, "awq_ratio": r_awq, "held_errors": errs, "chosen": "awq" if chose_awq else "qig"}
        return (r_awq, s_awq, record) if chose_awq else (ratio, s, record)
