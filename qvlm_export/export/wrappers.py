"""Export-time wrappers: the three graphs as plain ``forward`` functions of flat tensors.

``torch.onnx.export(dynamo=True)`` needs tensor-only signatures; these wrappers hold the
HF modules (never copies; found by the model's family, ``qvlm_export/families/``) and give each graph the interface of :mod:`qvlm_export.runtime.runner`.
The decoder builds a ``DynamicCache`` from flat past tensors inside ``forward`` and returns
the updated per-layer keys/values flat, so one graph serves prefill (zero-length past) and
decode.
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import family_of


class VisionGraph(nn.Module):
    """``pixel_values -> image_features``: vision tower + projector with the model's feature selection.

    Mirrors ``LlavaModel.get_image_features`` but keeps the batch as one tensor: that method
    unbinds images into a list, which makes the exporter specialise the batch size.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        family = family_of(model)
        self.vision_tower = model.get_submodule(family.vision_tower)
        self.projector = model.get_submodule(family.projector)
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        selected = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        return self.projector(torch.cat(selected, dim=-1))


class EmbedGraph(nn.Module):
    """``input_ids -> inputs_embeds`` (image tokens are overwritten by the runtime)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed_tokens = model.get_submodule(family_of(model).embed_tokens)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """One decoder step with a KV cache passed as ``2 * num_layers`` flat tensors (key, value per layer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        family = family_of(model)
        self.language_model = model.get_submodule(family.language_model)
        self.lm_head = model.get_submodule(family.lm_head)
        self.text_config = model.config.text_config
        self.num_layers = self.text_config.num_hidden_layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


def kv_geometry(text_config) -> tuple[int, int]:
    """(kv heads, head dim) of the decoder cache."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return kv_heads, head_dim
