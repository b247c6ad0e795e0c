"""The family seam owns every module path calibration uses: a family with other paths is one subclass."""

from __future__ import annotations

import pytest
from torch import nn

from qvlm_export.families.base import Family
from qvlm_export.quant.modules import component_of
from qvlm_export.quant.placement import layer_stacks
from qvlm_export.search.registry import UNIT_WALK


class OtherLayout(Family):
    """A made-up layout (Qwen2-VL-like names): only the paths differ."""

    model_type = "llava"  # family_of() finds it through this test's monkeypatch
    vision_tower = "model.visual"
    vision_layers = "model.visual.blocks"
    projector = "model.visual.merger"
    language_model = "model.text"
    embed_tokens = "model.text.embed"
    decoder_layers = "model.text.layers"
    final_norm = "model.text.final_norm"
    lm_head = "head"


@pytest.mark.parametrize("name, component", [
    ("model.visual.blocks.0.attn.qkv", "vision_tower"),
    ("model.text.layers.3.mlp.up_proj", "language_model"),
    ("head", "lm_head"),
    ("lm_head", None),  # LLaVA-1.5's name means nothing to this family
    ("model.vision_tower.encoder.layers.0.mlp.fc1", None),
])
def test_components_follow_the_family(name, component):
    assert component_of(name, OtherLayout()) == component


def test_llava_paths_are_the_default():
    assert component_of("model.multi_modal_projector.linear_1") == "projector"
    assert component_of("lm_head") == "lm_head" and component_of("model.language_model.norm") == "language_model"
    assert component_of("model.language_model.embed_tokens") == "language_model"
    assert all(isinstance(getattr(Family, n), str) for n in UNIT_WALK)


def test_layer_stacks_are_found_by_the_family(monkeypatch):
    model = nn.Module()
    model.model = nn.Module()
    model.model.visual = nn.Module()
    model.model.visual.blocks = nn.ModuleList([nn.Linear(2, 2)])
    model.model.text = nn.Module()
    model.model.text.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    monkeypatch.setattr("qvlm_export.quant.placement.family_of", lambda m: OtherLayout())
    stacks = layer_stacks(model)
    assert [(parent is model.model.visual, attr) for parent, attr in stacks[:1]] == [(True, "blocks")]
    assert stacks[1][0] is model.model.text and stacks[1][1] == "layers"
