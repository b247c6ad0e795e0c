"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights, then RTN.

Per input channel ``j`` of every Linear group fed by a norm (q/k/v, gate/up or fc1) and,
where shapes match one-to-one, of o_proj fed by v_proj:
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, ``X <- X diag(s)^-1`` folded into the
producer, ``W <- W diag(s)``. ``max|X_j|`` is measured on the block's quantized-stream
inputs (the paper calibrates on the FP model; sequential calibration sees what the
deployed model sees). Weights are then RTN per output channel and activations get
static per-tensor scales, the paper's "O3" (per-tensor static) deployment. down_proj /
fc2 follow a nonlinearity and stay unsmoothed, as in the paper's Llama recipe.

Options for models with massive activations (off by default): ``alpha_grid: N`` picks alpha per
group from ``0, 1/N, ..., 1`` on the quantized output error (:mod:`.smooth_search`);
``through_gate: true`` also smooths ``down_proj`` through ``up_proj`` (exact: ``act(gate) * up``
is linear in up's output rows, whose per-channel weight scales absorb ``1/s``).
"""

from __future__ import annotations

from torch import nn

from ..quant.calibrate import BlockContext
from ..quant.modules import rtn_layer
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant
from .base import quantize_sequentially, record_rewritten_parameters, snapshot_parameters
from .baseline_configs import SmoothQuantConfig, method_config
from .registry import Capabilities, register_method
from .smoothing import consumer_weight_absmax, find_scale_groups, fold_scales, smoothquant_scales
from .stats import InputStats, collect_input_stats


@register_method("smoothquant")
class SmoothQuant:
    config_type = SmoothQuantConfig
    capabilities = Capabilities()

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config = method_config(recipe, SmoothQuantConfig)
        self.alpha, self.grid, self.through_gate = self.config.alpha, self.config.alpha_grid, self.config.through_gate

    def plan(self, calibrator) -> None:
        return None

    def rule(self, name: str, linear: nn.Linear, stats: InputStats) -> LayerQuant:
        return rtn_layer(linear.weight.detach(), self.recipe)

    def smooth(self, ctx: BlockContext) -> dict[str, list[float]]:
        """Fold the smoothing scales of every group of the block; returns the scales by producer."""
        groups = find_scale_groups(ctx, through_gate=self.through_gate)
        stats = collect_input_stats(ctx, [g.consumers[0] for g in groups])
        applied = {}
        for g in groups:
            act = stats[g.consumers[0]].channel_absmax
            if self.grid:
                from .smooth_search import alpha_grid, search_alpha

                alpha, s, _ = search_alpha(ctx, g, act, self.recipe, alpha_grid(self.grid))
                ctx.extras.setdefault("smoothquant_alpha", {})[g.producer] = alpha
            else:
                s = smoothquant_scales(act, consumer_weight_absmax(ctx.root, g), self.alpha)
            fold_scales(ctx.root, g, s)
            applied[g.producer] = [round(float(s.min()), 6), round(float(s.max()), 6)]
        return applied

    def block(self, ctx: BlockContext) -> None:
        before = snapshot_parameters(ctx)
        ranges = self.smooth(ctx)
        record_rewritten_parameters(ctx, before)
        ctx.extras["smoothquant_scale_range"] = ranges
        quantize_sequentially(ctx, self.rule)
