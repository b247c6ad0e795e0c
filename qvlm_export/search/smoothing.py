"""Per-input-channel scales migrated between a Linear's input and its weight, folded into the graph.

SmoothQuant and AWQ both rewrite ``y = W x`` as ``y = (W diag(s)) (diag(s)^-1 x)`` and
fold ``diag(s)^-1`` into the operation that produces ``x``, so no extra op and no
per-channel activation scale survives (only per-tensor activation scales are deployable):

* a LayerNorm / RMSNorm: divide its weight (and bias) by ``s``;
* a Linear whose output is the input (v_proj before o_proj, through the attention
  average which is linear in V; up_proj before down_proj, through ``act(gate) * up``):
  divide its output rows (and bias) by ``s``. Only when the shapes match one-to-one:
  with grouped-query attention one V channel feeds several o_proj channels, so the fold
  is skipped (as llm-awq does).

The folds are exact in real arithmetic; in float32 the block output moves by ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant.calibrate import BlockContext

# (producer, consumers) relative to a transformer layer; the first match per input wins.
# Llama, Mistral and Qwen2 decoder layers, then CLIP and SigLIP encoder layers.
_CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("layer_norm2", ("mlp.fc1",)),
)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears fed by one producer: scales multiply their columns and divide the producer's output."""

    producer: str  # full module name
    consumers: tuple[str, ...]  # full module names

    @property
    def producer_is_norm(self) -> bool:
        return not self.producer.endswith("_proj")


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and \
        getattr(module, "weight", None) is not None


def find_scale_groups(ctx: BlockContext, through_gate: bool = False) -> list[ScaleGroup]:
    """Every foldable (producer, consumers) pair of the block whose consumers are all quantized.

    ``through_gate`` adds up_proj -> down_proj (AWQ does; SmoothQuant's recipe does not).
    """
    quantized = {name for name, _ in ctx.linears()}
    groups = []
    for unit, module in zip(ctx.units, ctx.modules):
        names = dict(module.named_modules())
        for producer, consumers in _CANDIDATES:
            if producer not in names or not all(c in names for c in consumers):
                continue
            if producer == "mlp.up_proj" and not through_gate:
                continue
            full = tuple(f"{unit.name}.{c}" for c in consumers)
            if not set(full) <= quantized or not all(isinstance(names[c], nn.Linear) for c in consumers):
                continue
            prod = names[producer]
            if isinstance(prod, nn.Linear):
                if prod.out_features != names[consumers[0]].in_features:
                    continue  # grouped-query attention: one V channel feeds several heads
            elif not _is_norm(prod):
                continue
            groups.append(ScaleGroup(f"{unit.name}.{producer}", full))
    return groups


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant (Xiao et al., 2023, eq. 4): ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``."""
    weight_absmax = weight_absmax.clamp_min(1e-5)
    return (act_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)).clamp_min(1e-5)


def consumer_weight_absmax(root: nn.Module, group: ScaleGroup) -> torch.Tensor:
    """``max_i |W_ij|`` per input channel over every consumer of the group."""
    weights = [root.get_submodule(c).weight.detach().abs().amax(dim=0) for c in group.consumers]
    return torch.stack(weights).amax(dim=0)


def fold_scales(root: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the consumers' columns by ``s`` and divide the producer's output by ``s`` (in place)."""
    producer = root.get_submodule(group.producer)
    with torch.no_grad():
        for c in group.consumers:
            lin = root.get_submodule(c)
            lin.weight.mul_(s.to(lin.weight.dtype).reshape(1, -1))
        if group.producer_is_norm:
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype).reshape(-1, 1))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
