"""Every method: a frozen, versioned config of its own type, declared capabilities, dispatch on config type."""

from __future__ import annotations

import dataclasses

import pytest

from qvlm_export.errors import QvlmError
from qvlm_export.quant.recipe import RECIPE_VERSION, SETTINGS, SettingSpec, recipe_from_dict
from qvlm_export.search.registry import _MODULES, Capabilities, build_method, check_family, get_method, method_for

METHODS = sorted(_MODULES)
WHOLE_MODEL_PLAN = {"qvlm", "qvlm_plus"}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_has_a_frozen_versioned_config_and_is_found_by_it(name):
    cls = get_method(name)
    config_type = cls.config_type
    assert dataclasses.is_dataclass(config_type) and config_type.__dataclass_params__.frozen
    assert isinstance(config_type.version, int) and config_type.version >= 1
    assert method_for(config_type()) is cls
    method = build_method(recipe_from_dict({"method": name, "setting": "w8a8"}))
    own = method.plus if name == "qvlm_plus" else method.config  # the combination also holds Q-VLM's config
    assert type(own) is config_type
    caps = method.capabilities
    assert isinstance(caps, Capabilities)
    assert (caps.data_free, caps.whole_model_plan) == (False, name in WHOLE_MODEL_PLAN)
    assert {"vision_layers", "projector", "decoder_layers"} <= caps.family_needs


def test_weight_only_rtn_declares_itself_data_free():
    assert build_method(recipe_from_dict({"method": "rtn", "setting": "w4a16"})).capabilities.data_free
    assert not build_method(recipe_from_dict({"method": "rtn", "setting": "w4a8"})).capabilities.data_free


def test_baseline_configs_are_typed():
    gptq = build_method(recipe_from_dict({"method": "gptq", "setting": "w4a16", "method_args": {"damp": 1e-2 * 5}}))
    assert gptq.config.damp == 0.05 and gptq.config.block_size == 128 and gptq.args["damp"] == 0.05
    sq = build_method(recipe_from_dict({"method": "smoothquant", "setting": "w8a8", "method_args": {"alpha": 1}}))
    assert sq.config.alpha == 1.0 and isinstance(sq.config.alpha, float)
    awq = build_method(recipe_from_dict({"method": "awq", "setting": "w4a16", "method_args": {"clip": False}}))
    assert (awq.config.clip, awq.config.grid, awq.config.max_shrink) == (False, 20, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        awq.config.grid = 3


def test_an_unknown_config_type_is_one_line():
    with pytest.raises(QvlmError, match="no quantization method takes a SettingSpec"):
        method_for(SETTINGS["w8a8"])


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_recipe_version_is_checked_on_load(version):
    with pytest.raises(QvlmError) as info:
        recipe_from_dict({"method": "rtn", "setting": "w8a8", "version": version}, source="r.yaml")
    assert str(info.value) == (f"r.yaml: recipe version {version!r} is not supported (this qvlm-export reads version "
                               f"{RECIPE_VERSION}); write the recipe for version {RECIPE_VERSION} or upgrade qvlm-export")
    assert recipe_from_dict({"method": "rtn", "setting": "w8a8", "version": 1}).version == 1


def test_settings_are_a_frozen_spec():
    spec = SETTINGS["w4a16"]
    assert isinstance(spec, SettingSpec)
    assert (spec.weight_bits, spec.weight_granularity, spec.act_bits, spec.deployable) == (4, "group", None, True)
    assert tuple(SETTINGS["w6a6"]) == (6, "channel", 6, False, "simulated (fake-quant) only")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.weight_bits = 8


def test_a_family_missing_a_needed_path_is_one_line(tiny_model_dir):
    from qvlm_export.load.model import load_vlm

    method = build_method(recipe_from_dict({"method": "rtn", "setting": "w8a8"}))
    model = load_vlm(tiny_model_dir).model
    check_family(method, model)  # the LLaVA family has every path
    needy = type("Needy", (), {"recipe": method.recipe,
                               "capabilities": Capabilities(family_needs=frozenset({"vision_layers", "rotary_tables"}))})
    with pytest.raises(QvlmError, match="rtn needs 'rotary_tables' from the llava family, which does not define it"):
        check_family(needy(), model)
