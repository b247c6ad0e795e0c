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

from ..errors import QvlmError
from ..quant.calibrate import BlockContext
from ..quant.recipe import QuantRecipe
from ..quant.state import LayerQuant, code_dtype
from .algorithms import gptq_quantize
from .base import method_args, quantize_sequentially
from .registry import register_method
from .stats import InputStats

_ARGS = {"damp": 0.01, "block_size": 128, "act_order": False, "static_groups": False}


@register_method("gptq")
class GPTQ:
    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.args = method_args(recipe, _ARGS)
        if not 0 < float(self.args["damp"]) < 1:
            raise QvlmError(f"gptq: method_args.damp must be in (0, 1), got {self.args['damp']}")

    def plan(self, calibrator) -> None:
        return None

    def rule(self, name: str, linear: nn.Linear, stats: InputStats) -> LayerQuant:
        w = self.recipe.weights
        codes, scale, zero = gptq_quantize(
            linear.weight.detach(), stats.hessian, w.bits, w.granularity, w.group_size, w.symmetric,
            damp=float(self.args["damp"]), block_size=int(self.args["block_size"]),
            act_order=bool(self.args["act_order"]), static_groups=bool(self.args["static_groups"]))
        return LayerQuant(weight_codes=codes.to(code_dtype(w.symmetric)), weight_scale=scale.float(), weight_zero_point=zero,
                          weight_bits=w.bits, granularity=w.granularity, group_size=w.group_size,
                          symmetric=w.symmetric)

    def block(self, ctx: BlockContext) -> None:
        quantize_sequentially(ctx, self.rule, hessian=True)
