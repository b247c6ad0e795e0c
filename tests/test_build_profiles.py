"""Build profiles and optimization-profile shapes: parsing, validation and the exact shape ranges."""

from __future__ import annotations

import dataclasses

import pytest
from onnx import TensorProto

from qvlm_export.engine.profiles import BuildProfile, builtin_profiles, load_profile, profile_from_dict
from qvlm_export.engine.shapes import InputSpec, optimization_profiles
from qvlm_export.errors import QvlmError

F16, I64 = TensorProto.FLOAT16, TensorProto.INT64


def test_builtin_profiles_load_and_are_frozen():
    assert {"edge", "server"} <= set(builtin_profiles())
    edge, server = load_profile("edge"), load_profile("server")
    assert (edge.max_batch, edge.max_prompt, edge.max_context) == (1, 256, 512)
    assert server.batch_range == (1, 8, 16) and server.past_range == (1, 1024, 4095)
    assert server.hardware_compatibility == "ampere_plus" and edge.graph_dtype == "fp16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        edge.max_batch = 4
    # the hash changes with any field and is stable otherwise
    assert edge.digest() == load_profile("edge").digest() != dataclasses.replace(edge, max_batch=2).digest()


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"name": "x", "batch": 2}, "unknown key 'batch'"),
    ({"name": "x", "hardware_compatibility": "turing"}, "hardware_compatibility must be one of"),
    ({"name": "x", "graph_dtype": "int8"}, "graph_dtype must be one of"),
    ({"name": "x", "max_prompt": 512, "max_context": 512}, "must exceed max_prompt"),
    ({"name": "x", "max_batch": 2, "opt_batch": 4}, "opt_batch (4) exceeds max_batch (2)"),
    ({"name": "x", "builder_optimization_level": 7}, "builder_optimization_level must be an integer in 0..5"),
    ({"name": "x", "version_compatible": "yes"}, "version_compatible must be true or false"),
    ({"max_batch": 1}, "'name' must be a non-empty string"),
    ([1, 2], "must be a YAML mapping"),
])
def test_bad_profiles_name_the_key(raw, message):
    with pytest.raises(QvlmError) as info:
        profile_from_dict(raw, source="p.yaml")
    assert message in str(info.value) and str(info.value).startswith("p.yaml")


def test_profile_file_errors(tmp_path):
    with pytest.raises(QvlmError, match="not found; pass a YAML path or one of"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(QvlmError, match="not valid YAML"):
        load_profile(bad)


def decoder_inputs(layers=2, heads=2, head_dim=4, hidden=8):
    specs = [InputSpec("inputs_embeds", F16, ("batch", "seq", hidden)),
             InputSpec("attention_mask", I64, ("batch", "total")),
             InputSpec("position_ids", I64, ("batch", "seq"))]
    for i in range(layers):
        for kind in ("key", "value"):
            specs.append(InputSpec(f"past_key_values.{i}.{kind}", F16, ("batch", heads, "past", head_dim)))
    return specs


def test_decoder_prefill_and_decode_profiles_exact_shapes():
    profile = BuildProfile(name="t", max_batch=4, opt_batch=2, max_prompt=64, opt_prompt=32, max_context=128,
                           opt_context=48)
    (prefill_name, prefill), (decode_name, decode) = optimization_profiles("decoder", decoder_inputs(), profile)
    assert (prefill_name, decode_name) == ("prefill", "decode")
    assert prefill["inputs_embeds"] == ((1, 1, 8), (2, 32, 8), (4, 64, 8))
    assert prefill["attention_mask"] == ((1, 1), (2, 32), (4, 64))
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 4), (2, 2, 0, 4), (4, 2, 0, 4))
    assert decode["inputs_embeds"] == ((1, 1, 8), (2, 1, 8), (4, 1, 8))
    assert decode["position_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode["past_key_values.0.key"] == ((1, 2, 1, 4), (2, 2, 48, 4), (4, 2, 127, 4))
    assert decode["attention_mask"] == ((1, 2), (2, 49), (4, 128))  # past + 1


def test_vision_and_embed_profiles():
    profile = BuildProfile(name="t", max_batch=8, max_prompt=100)
    [(phase, vision)] = optimization_profiles("vision", [InputSpec("pixel_values", F16, ("n", 3, 64, 64))], profile)
    assert phase == "batch" and vision["pixel_values"] == ((1, 3, 64, 64), (8, 3, 64, 64), (8, 3, 64, 64))
    [(_, embed)] = optimization_profiles("embed", [InputSpec("input_ids", I64, (None, None))], profile)
    assert embed["input_ids"] == ((1, 1), (8, 50), (8, 100))


def test_shape_errors_are_actionable():
    profile = BuildProfile(name="t", max_batch=4)
    with pytest.raises(QvlmError, match="static batch size 1 on axis 0, but the profile needs 1..4"):
        optimization_profiles("vision", [InputSpec("pixel_values", F16, (1, 3, 64, 64))], profile)
    with pytest.raises(QvlmError, match="'pixel_values' axis 2 is dynamic"):
        optimization_profiles("vision", [InputSpec("pixel_values", F16, ("b", 3, "h", 64))], profile)
    with pytest.raises(QvlmError, match="'cache_position' axis 0 is dynamic"):
        optimization_profiles("decoder", [*decoder_inputs(), InputSpec("cache_position", I64, ("s",))], profile)
