"""An orthogonal rotation of the language model's residual stream, folded into the weights (QuaRot/SpinQuant).

With ``h' = h Q`` for an orthogonal ``Q`` (``Q Q^T = I``) everywhere in the residual stream, the
model computes the same function when

* every RMSNorm's gain ``g`` is folded into the Linears that read it (``W <- W diag(g)``, gain
  set to 1): RMSNorm without a gain commutes with ``Q`` because ``rms(h Q) = rms(h)``;
* the Linears that read the stream (q/k/v, gate/up, lm_head) take ``W <- W Q``;
* the Linears that write it (o_proj, down_proj, the projector's last Linear) take
  ``W <- Q^T W``, ``b <- Q^T b``; the token embeddings (and LLaVA-NeXT's ``image_newline``)
  take ``E <- E Q``.

No op is added: the deployed graph is the original graph with other weights. A massive channel
(SmolLM2-135M: one channel of layer 11's residual reaches 3000x its rms) is spread over all
channels, so per-tensor activation scales and per-channel weight scales fit the rest. The
rotation does not reach ``down_proj``'s *input* (inside the MLP, after the gate); QuaRot adds an
online Hadamard there (one constant MatMul), which is not built here.

``Q``: the hidden size is ``n = 2^k m`` with ``m`` odd (SmolLM2: 576 = 64 x 9). ``Q = diag(d)
(H_{2^k} (x) R_m)``: a normalised Sylvester Hadamard matrix, a random orthogonal ``m x m``
matrix (QR of a Gaussian, signs fixed) and random signs ``d``, all from ``seed``. Power-of-two
sizes get QuaRot's randomised Hadamard ``diag(d) H``.

Tied embeddings: lm_head reads the stream through the final norm's gain, the embeddings do not,
so the two differ after folding; lm_head gets its own weight, recorded as an override that
:func:`~qvlm_export.quant.modules.apply_overrides` unties (simulated model and exporter alike).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QvlmError
from ..quant.outlier_options import RotationSpec

_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix divided by ``sqrt(n)`` (orthogonal), ``n`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).reshape(1, -1)).contiguous()  # Haar-distributed


def rotation_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """``diag(d) (H_{2^k} (x) R_m)`` in float64 (see the module docstring)."""
    power = n & -n  # largest power of two dividing n
    gen = torch.Generator().manual_seed(seed)
    odd = random_orthogonal(n // power, gen) if n // power > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return signs.reshape(-1, 1) * torch.kron(sylvester_hadamard(power), odd)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and getattr(module, "bias", None) is None


def _rewrite(param: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _fold_gain(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gain = norm.weight.detach().double()
    for lin in readers:
        _rewrite(lin.weight, lin.weight.detach().double() * gain.reshape(1, -1))
    _rewrite(norm.weight, torch.ones_like(gain))


def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    _rewrite(lin.weight, lin.weight.detach().double() @ q.to(lin.weight.device))


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    qt = q.t().to(lin.weight.device)
    _rewrite(lin.weight, qt @ lin.weight.detach().double())
    if lin.bias is not None:
        _rewrite(lin.bias, qt @ lin.bias.detach().double())


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own weight if it shares the embeddings'; True if it did."""
    embed = model.get_input_embeddings()
    if model.lm_head.weight is not embed.weight:
        return False
    model.lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def _projector_writer(model: nn.Module) -> nn.Linear:
    from ..families import family_of

    linears = [m for m in model.get_submodule(family_of(model).projector).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QvlmError("rotation: the projector has no Linear whose output could be rotated")
    return linears[-1]


def rotate_model(model: nn.Module, spec: RotationSpec) -> dict:
    """Fold norm gains and rotate the language model's residual stream in place; returns what it did."""
    from ..families import family_of

    lm = model.model.language_model
    layers = model.get_submodule(family_of(model).decoder_layers)
    norms = [lm.norm] + [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    if not all(_is_rms_norm(n) for n in norms):
        raise QvlmError("rotation needs a decoder with RMSNorm (Llama, Mistral, Qwen2); remove the rotation section")
    hidden = lm.embed_tokens.weight.shape[1]
    q = rotation_matrix(hidden, spec.seed)
    untied = untie_lm_head(model)
    _fold_gain(lm.norm, [model.lm_head])
    _read(model.lm_head, q)
    embed = lm.embed_tokens.weight
    _rewrite(embed, embed.detach().double() @ q.to(embed.device))
    newline = getattr(model.model, "image_newline", None)
    if isinstance(newline, nn.Parameter):
        _rewrite(newline, newline.detach().double() @ q.to(newline.device))
    _write(_projector_writer(model), q)
    for layer in layers:
        _fold_gain(layer.input_layernorm, [layer.get_submodule(n) for n in _READERS])
        _fold_gain(layer.post_attention_layernorm, [layer.get_submodule(n) for n in _MLP_READERS])
        for name in _READERS + _MLP_READERS:
            _read(layer.get_submodule(name), q)
        for name in _WRITERS:
            _write(layer.get_submodule(name), q)
    power = hidden & -hidden
    return {"kind": spec.kind, "seed": spec.seed, "hidden": hidden, "untied_lm_head": untied,
            "matrix": f"diag(signs) (H{power} kron R{hidden // power})"}


def rotated_parameters(model: nn.Module) -> list[str]:
    """Every parameter :func:`rotate_model` rewrites (vision tower and projector's first layers excluded)."""
    writer = _projector_writer(model)
    names = []
    for name, module in model.named_modules():
        if module is writer or name == "lm_head" or name.startswith("model.language_model."):
            names += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    if isinstance(getattr(model.model, "image_newline", None), nn.Parameter):
        names.append("model.image_newline")
    return names
