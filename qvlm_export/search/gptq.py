"""GPTQ (Frantar et al., ICLR 2023): second-order weight rounding with error feedback.

Per Linear, the Hessian ``H = 2 X X^T / n`` of its inputs on the block's quantized
stream (real tokens only) drives :func:`~qvlm_export.search.algorithms.gptq_quantize`.
Linears sharing an input are quantized together and the next group's inputs are measured
after them ("true sequential", the reference's default for Llama). Activation scales,
when the recipe has them, are static per-tensor absmax of the same inputs.

method_args: ``damp`` (0.01, relative to mean diag H), ``block_size`` (128, lazy batch
width), ``act_order`` (false), ``static_groups`` (false; forced on by act_order so the
groups stay contiguous, the deployable layout).
"""

from __future__ import annotations

from torch import nn

from ..quant.calibrate import BlockContext
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant, code_dtype
from .algorithms import gptq_quantize
from .base import quantize_sequentially
from .baseline_configs import GPTQConfig, method_config
from .registry import Capabilities, register_method
from .stats import InputStats


@register_method("gptq")
class GPTQ:
    config_type = GPTQConfig
    capabilities = Capabilities()

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config: GPTQConfig = method_config(recipe, GPTQConfig)

    @property
    def args(self) -> dict:
        """The config as the recipe's ``method_args`` mapping (every key, defaults filled)."""
        return self.config.to_dict()

    def plan(self, calibrator) -> None:
        return None

    def rule(self, name: str, linear: nn.Linear, stats: InputStats) -> LayerQuant:
        w, cfg = self.recipe.weights, self.config
        codes, scale, zero = gptq_quantize(
            linear.weight.detach(), stats.hessian, w.bits, w.granularity, w.group_size, w.symmetric,
            damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order, static_groups=cfg.static_groups)
        return LayerQuant(weight_codes=codes.to(code_dtype(w.symmetric)), weight_scale=scale.float(), weight_zero_point=zero,
                          weight_bits=w.bits, granularity=w.granularity, group_size=w.group_size,
                          symmetric=w.symmetric)

    def block(self, ctx: BlockContext) -> None:
        quantize_sequentially(ctx, self.rule, hessian=True)
