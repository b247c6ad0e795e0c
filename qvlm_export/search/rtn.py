"""RTN: round-to-nearest weights with min/max (absmax) scales; the baseline every paper starts from."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.calibrate import BlockContext
from ..quant.modules import rtn_layer
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant
from .base import quantize_sequentially
from .baseline_configs import RTNConfig, method_config
from .registry import Capabilities, register_method
from .stats import InputStats


@register_method("rtn")
class RTN:
    """Weights rounded to nearest on their absmax grid; static absmax input scales."""

    config_type = RTNConfig

    def __init__(self, recipe: QuantRecipe):
        self.config = method_config(recipe, RTNConfig)
        self.recipe = recipe

    @property
    def capabilities(self) -> Capabilities:
        # weight-only RTN reads no activations: quantize skips the dataset and every forward pass
        return Capabilities(data_free=self.recipe.activations.bits is None)

    def plan(self, calibrator) -> None:
        return None

    def weight_rule(self, name: str, weight: torch.Tensor) -> LayerQuant:
        return rtn_layer(weight, self.recipe)

    def rule(self, name: str, linear: nn.Linear, stats: InputStats) -> LayerQuant:
        return rtn_layer(linear.weight.detach(), self.recipe)

    def block(self, ctx: BlockContext) -> None:
        quantize_sequentially(ctx, self.rule)
