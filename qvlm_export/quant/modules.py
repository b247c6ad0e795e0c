"""Which Linears get quantized, and the simulated QuantLinear that replaces them.

Module names come from the model's family (``qvlm_export/families/``); LLaVA-1.5's, transformers 5's layout:
``model.vision_tower.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}``,
``model.multi_modal_projector.linear_{1,2}``,
``model.language_model.layers.{i}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}``
and ``lm_head``. Embeddings and norms stay in floating point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..families import family_of
from ..families.base import Family
from . import functional as F
from .primitives import absmax_scale
from .recipe import QuantRecipe
from .state import LayerQuant, QuantState, code_dtype


def component_of(name: str, family=None) -> str | None:
    """``vision_tower`` | ``projector`` | ``language_model`` | ``lm_head`` | None, by ``family``'s module
    paths (default: LLaVA-1.5's, :class:`qvlm_export.families.base.Family`)."""
    return (family or Family()).component_of(name)


def vision_feature_layers(config) -> list[int]:
    """The vision hidden-state indices the projector reads (0: embeddings, k: output of layer k-1), absolute."""
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    n = config.vision_config.num_hidden_layers
    return [k % (n + 1) for k in layers]


def used_vision_layers(config) -> int:
    """How many leading vision encoder layers feed the projector.

    llava-hf's LLaVA-1.5 reads hidden state -2 (``vision_feature_layer: -2``): the last
    encoder layer computes an output nothing reads, so it is neither calibrated,
    quantized nor exported (the ONNX exporter drops it from the graph anyway).
    """
    return max(vision_feature_layers(config))


def unused_layers(config) -> dict[str, str]:
    """Unit name -> why it is left out, for every vision layer whose output feeds nothing."""
    n, used = config.vision_config.num_hidden_layers, used_vision_layers(config)
    why = (f"vision_feature_layer {config.vision_feature_layer!r} reads vision hidden state(s) "
           f"{vision_feature_layers(config)} of {n}: this layer's output feeds nothing")
    return {f"{family_of(config).vision_layers}.{i}": why for i in range(used, n)}


def in_unused_layer(name: str, unused: dict[str, str]) -> bool:
    return any(name == unit or name.startswith(unit + ".") for unit in unused)


def quantizable_linears(model: nn.Module, recipe: QuantRecipe) -> Iterator[tuple[str, nn.Linear]]:
    """(name, Linear) of every Linear the recipe quantizes, in module order (unused vision layers excluded)."""
    enabled = {c for c in ("vision_tower", "projector", "language_model", "lm_head") if getattr(recipe.modules, c)}
    unused = unused_layers(model.config)
    family = family_of(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and component_of(name, family) in enabled and not in_unused_layer(name, unused):
            yield name, module


def rtn_layer(weight: torch.Tensor, recipe: QuantRecipe, input_scale: torch.Tensor | None = None,
              clip_ratio: float | torch.Tensor = 1.0) -> LayerQuant:
    """Round-to-nearest quantization of one weight with the recipe's granularity."""
    w = recipe.weights
    scale, zp = F.choose_qparams(weight.float(), w.bits, w.symmetric, w.granularity, w.group_size, clip_ratio)
    codes = F.quantize(weight.float(), scale, zp, w.bits, w.symmetric, w.granularity, w.group_size)
    return LayerQuant(weight_codes=codes.to(code_dtype(w.symmetric)), weight_scale=scale.float(), weight_zero_point=zp,
                      weight_bits=w.bits, granularity=w.granularity, group_size=w.group_size,
                      symmetric=w.symmetric, input_scale=input_scale, act_bits=recipe.activations.bits)


def activation_scale(absmax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Kept for callers outside the package (tests/test_qvlm_memory.py): :func:`.primitives.absmax_scale`;
    nothing in the package calls it. In the package an
    "activation scale" is the stored per-tensor input scale (``LayerQuant.input_scale``, what
    :func:`qvlm_export.export.qdq.activation_scale` writes); the computation is ``absmax_scale``."""
    return absmax_scale(absmax, bits)


class QuantLinear(nn.Module):
    """A Linear computing exactly what its QDQ graph computes (fake-quant input, dequantized weight).

    The dequantized weight is computed when used (:attr:`weight`), not held: the integer
    codes already hold it, and a float copy per quantized Linear, on top of the float
    weight it replaces (still memory-mapped from the checkpoint), doubled calibration's
    peak memory on a 7B-shaped model.
    """

    def __init__(self, layer: LayerQuant, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layer = layer
        self.weight_dtype = dtype  # the model's dtype: forward casts to the input's dtype anyway
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        input_scale = layer.input_scale if layer.input_scale is not None else torch.tensor(0.0)
        self.register_buffer("input_scale", input_scale.float().reshape(()))
        self.in_features, self.out_features = layer.weight_codes.shape[1], layer.weight_codes.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in the model's dtype (a fresh tensor on every access)."""
        return self.layer.dequantized_weight().to(self.weight_dtype)

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` / ``.half()`` reach the codes and the weight dtype, as they reached the old buffer."""
        codes = self.layer.weight_codes
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=codes.device))
        self.weight_dtype = probe.dtype
        if probe.device != codes.device:
            lq, move = self.layer, (lambda t: None if t is None else t.to(probe.device))
            self.layer = dataclasses.replace(lq, weight_codes=move(lq.weight_codes), weight_scale=move(lq.weight_scale),
                                             weight_zero_point=move(lq.weight_zero_point),
                                             input_scale=move(lq.input_scale))
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.act_bits is not None and self.layer.input_scale is not None:
            x = F.fake_quantize(x, self.input_scale.to(x.dtype), torch.zeros((), dtype=torch.int32),
                                self.layer.act_bits, True, "tensor")
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_overrides(model: nn.Module, overrides: dict[str, torch.Tensor]) -> None:
    """Load the float parameters a method rewrote (e.g. smoothing folded into a norm).

    An override of a tied parameter's alias (``lm_head.weight`` of a model with tied
    embeddings, after a rotation) first gives that module its own parameter.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in overrides:
        if name in params and sum(p is params[name] for p in params.values()) > 1:
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, leaf, nn.Parameter(params[name].detach().clone(), requires_grad=False))
            params[name] = getattr(module, leaf)
            for cfg in (model.config, getattr(model.config, "text_config", None)):
                if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                    cfg.tie_word_embeddings = False
    for name, value in overrides.items():
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))


def apply_quant_state(model: nn.Module, state: QuantState) -> nn.Module:
    """Turn an FP model into the simulated quantized model of ``state`` (in place)."""
    apply_overrides(model, state.float_overrides)
    for name, layer in state.layers.items():
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantLinear(layer, linear.bias, linear.weight.dtype))
    return model
