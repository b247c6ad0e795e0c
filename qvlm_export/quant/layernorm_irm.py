"""Q-ViT's release form of the IRM: an affine LayerNorm on each head's q and k (simulated only).

The release (github.com/YanjingLi0202/Q-ViT) rectifies q and k after the projection and the
head split with ``nn.LayerNorm(head_dim)``, its weight and bias shared across heads:

    q~[b, t, h, :] = (q[b, t, h, :] - mean) / sqrt(var + eps) * gamma_q + beta_q     (same for k)

mean and (biased) var over the head's ``head_dim`` channels of that token. Unlike our
function-preserving IRM (:mod:`..search.qvit.irm`) it changes what attention computes and adds
normalisation nodes between the q/k projections and the attention, which our graphs do not
carry: a state that uses it is simulated only (:attr:`..quant.recipe.QuantRecipe.deployable`).

It is applied with hooks on the attention module, so it acts on whatever layer sits at
``q_proj``/``k_proj`` (float, searched or committed); the parameters travel in the quant
state's ``extras["qvit_layernorm_irm"]`` and :func:`install_from_extras` puts them back on a
loaded model (:func:`..quant.simulate.load_simulated`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EXTRAS_KEY = "qvit_layernorm_irm"


class HeadNorm(nn.Module):
    """``LayerNorm(head_dim)`` over each head of ``[..., heads * head_dim]``, shared across heads."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.norm(x.reshape(*shape[:-1], self.heads, -1).to(self.norm.weight.dtype))
        return y.reshape(shape).to(x.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"heads": self.heads, "eps": self.norm.eps, "weight": self.norm.weight.detach().float().tolist(),
                "bias": self.norm.bias.detach().float().tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadNorm:
        norm = cls(int(data["heads"]), len(data["weight"]), float(data["eps"]))
        with torch.no_grad():
            norm.norm.weight.copy_(torch.tensor(data["weight"]))
            norm.norm.bias.copy_(torch.tensor(data["bias"]))
        return norm.requires_grad_(False)


def install(attn: nn.Module, norm_q: HeadNorm, norm_k: HeadNorm) -> list:
    """Apply ``norm_q``/``norm_k`` to the outputs of ``attn.q_proj``/``attn.k_proj`` inside every call of
    ``attn`` (whatever module sits there then). Returns the handles (remove them to uninstall)."""
    inner: list = []

    def pre(_m, _args):
        while inner:
            inner.pop().remove()
        inner.append(attn.q_proj.register_forward_hook(lambda _m, _i, out: norm_q(out)))
        inner.append(attn.k_proj.register_forward_hook(lambda _m, _i, out: norm_k(out)))

    def post(_m, _args, _out):
        while inner:
            inner.pop().remove()

    return [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)]


def fit_to_identity(norm: HeadNorm, x: torch.Tensor) -> None:
    """Initialise ``gamma, beta`` per channel by least squares so ``norm(x)`` is closest to ``x`` (the affine
    LayerNorm nearest the identity on these activations; the release starts at 1 and 0 and trains 300 epochs)."""
    heads = norm.heads
    xh = x.detach().float().reshape(-1, heads, x.shape[-1] // heads)
    n = torch.nn.functional.layer_norm(xh, xh.shape[-1:], eps=norm.norm.eps).reshape(-1, xh.shape[-1])
    t = xh.reshape(-1, xh.shape[-1])
    n_mean, t_mean = n.mean(0), t.mean(0)
    var = (n - n_mean).pow(2).mean(0).clamp_min(1e-12)
    gamma = ((n - n_mean) * (t - t_mean)).mean(0) / var
    with torch.no_grad():
        norm.norm.weight.copy_(gamma)
        norm.norm.bias.copy_(t_mean - gamma * n_mean)


def install_from_extras(model: nn.Module, extras: dict[str, Any]) -> list:
    """Put a state's LayerNorm IRMs back on ``model`` (attention name -> q/k norms); returns the handles."""
    handles = []
    for name, entry in (extras.get(EXTRAS_KEY) or {}).items():
        attn = model.get_submodule(name)
        device = attn.q_proj.weight.device if hasattr(attn.q_proj, "weight") else None
        norm_q, norm_k = HeadNorm.from_json(entry["q"]).to(device), HeadNorm.from_json(entry["k"]).to(device)
        handles += install(attn, norm_q, norm_k)
    return handles
