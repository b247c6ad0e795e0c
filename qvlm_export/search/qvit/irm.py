"""Q-ViT's information rectification (IRM), post-training and function-preserving (ours; docs/qvit.md).

Per channel ``c`` of the attention's query/key space, with ``g = exp(log_g) > 0`` and ``beta``:

    q~ = g * q            k~ = k / g + beta

Every logit ``q~ . k~ = q . k + (g * q) . beta`` moves by an amount that depends on the
query only, so each softmax row, and the attention output, is unchanged (the paper's IRM,
``(q - mu + beta) / (gamma * sigma)``, and the release's LayerNorm are not function-preserving).
Folded into the projections: ``W_q <- diag(g) W_q, b_q <- g b_q, W_k <- diag(1/g) W_k,
b_k <- b_k / g + beta``. A quantized projection keeps its integer codes: its per-row
(per-channel or per-group) weight scales are multiplied by ``g`` (``1/g``), which is exact
because symmetric per-row quantization is scale-equivariant. Nothing is added to the graph.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import QvlmError
from ...quant.state import LayerQuant


def irm_apply(q: torch.Tensor, k: torch.Tensor, log_g: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified ``(q~, k~)`` of projected ``q, k`` ``[..., C]``."""
    g = log_g.exp().to(q.dtype)
    return q * g, k / g + beta.to(k.dtype)


def fold_irm_linear(q_proj: nn.Linear, k_proj: nn.Linear, log_g: torch.Tensor, beta: torch.Tensor) -> None:
    """Fold the IRM into float q/k projections (in place)."""
    if k_proj.bias is None and bool(beta.abs().gt(0).any()):
        raise QvlmError("IRM: the key projection has no bias to carry the shift beta; use beta = 0 for this model")
    g = log_g.detach().exp()
    with torch.no_grad():
        q_proj.weight.mul_(g.to(q_proj.weight.dtype).reshape(-1, 1))
        k_proj.weight.div_(g.to(k_proj.weight.dtype).reshape(-1, 1))
        if q_proj.bias is not None:
            q_proj.bias.mul_(g.to(q_proj.bias.dtype))
        if k_proj.bias is not None:
            k_proj.bias.copy_(k_proj.bias / g.to(k_proj.bias.dtype) + beta.detach().to(k_proj.bias.dtype))


def _scale_rows(layer: LayerQuant, factor: torch.Tensor) -> LayerQuant:
    if layer.granularity == "tensor":
        raise QvlmError("IRM: per-tensor weight scales cannot carry a per-channel rescale; use channel or group weights")
    if not layer.symmetric:
        raise QvlmError("IRM: the fold into integer codes needs symmetric weights")
    scale = layer.weight_scale
    f = factor.to(scale).reshape(-1, *([1] * (scale.dim() - 1)))
    return dataclasses.replace(layer, weight_scale=scale * f)


def fold_irm_quantized(q: LayerQuant, k: LayerQuant, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
                       log_g: torch.Tensor, beta: torch.Tensor):
    """The IRM folded into quantized projections: ``(q_layer, k_layer, q_bias, k_bias)``, codes unchanged."""
    g = log_g.detach().float().exp()
    if k_bias is None and bool(beta.abs().gt(0).any()):
        raise QvlmError("IRM: the key projection has no bias to carry the shift beta; use beta = 0 for this model")
    qb = None if q_bias is None else q_bias * g.to(q_bias)
    kb = None if k_bias is None else k_bias / g.to(k_bias) + beta.detach().to(k_bias)
    return _scale_rows(q, g), _scale_rows(k, 1.0 / g), qb, kb
