"""Engine plans that fit their model: image-token budgets, derived (auto) profiles, TensorRT's 2^31-1 limit.

All of it is planning: no TensorRT, no GPU. The bundles are the tiny graphs of
test_build_engines with the ModelSpec of a real checkpoint (LLaVA-1.5: 576 image tokens).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_build_engines import write_bundle

from qvlm_export.cli import main
from qvlm_export.engine.builder import plan_build
from qvlm_export.engine.fit import max_image_tokens
from qvlm_export.engine.profiles import load_profile
from qvlm_export.errors import QvlmError
from qvlm_export.runtime.bundle import ModelSpec, refresh_bundle

LLAVA15 = {"image_seq_length": 576}
# Qwen2-7B's text geometry (LLaVA-OneVision-7B): vocab 152064, 28 heads of 128, 4 KV heads
QWEN_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "head_dim": 128, "num_kv_heads": 4}


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("llava15") / "b", **LLAVA15)


def test_shipped_edge_profile_is_refused_for_576_image_tokens(llava15):
    with pytest.raises(QvlmError) as exc:
        plan_build(llava15, load_profile("edge"))
    assert str(exc.value) == ("profile 'edge' allows prompts of 256 tokens, but one image takes 576 image tokens in "
                              "this llava bundle (584 with the shortest chat prompt); build with --profile auto "
                              "(sized from the bundle) or set max_prompt >= 584")


def test_cli_dry_run_refuses_edge_in_one_line_and_accepts_auto(llava15, capsys):
    assert main(["build", "--bundle", str(llava15), "--profile", "edge", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "576 image tokens" in err
    assert main(["build", "--bundle", str(llava15), "--profile", "auto", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["profile"]["name"] == "auto:edge" and plan["profile"]["max_prompt"] == 832
    prefill = plan["engines"]["decoder"]["optimization_profiles"][0]["shapes"]["inputs_embeds"]
    assert prefill == {"min": [1, 1, 8], "opt": [1, 416, 8], "max": [1, 832, 8]}


def test_auto_profile_is_sized_from_the_bundle(llava15, tmp_path):
    plan = plan_build(llava15, load_profile("auto"))
    # 576 image tokens + 256 text tokens; + 256 generated tokens
    assert (plan.profile.max_prompt, plan.profile.max_context, plan.profile.max_batch) == (832, 1088, 1)
    decode = dict(plan.engines[2].profiles)["decode"]["past_key_values.0.key"]
    assert decode[2] == (1, 2, 1087, 4)
    # the context never exceeds the model's positions; the prompt leaves one for the answer
    capped = write_bundle(tmp_path / "capped", **LLAVA15, max_positions=700)
    profile = plan_build(capped, load_profile("auto")).profile
    assert (profile.max_prompt, profile.max_context) == (699, 700)
    tiny = write_bundle(tmp_path / "tiny", **LLAVA15, max_positions=584)
    with pytest.raises(QvlmError, match="one image takes 576 tokens but the model's context is 584 positions"):
        plan_build(tiny, load_profile("auto"))


def test_tensor_over_two_to_the_31_is_refused_before_any_build(tmp_path):
    bundle = write_bundle(tmp_path / "b", **LLAVA15, **QWEN_TEXT)
    full = dataclasses.replace(load_profile("server"), max_prompt=1024, decoder_logits="all")
    with pytest.raises(QvlmError) as exc:
        plan_build(bundle, full)
    # 16 x 1024 x 152064 = 2,491,416,576 > 2,147,483,647
    assert str(exc.value).startswith("profile 'server' needs a decoder prefill logits tensor of shape "
                                     "[16, 1024, 152064] (2,491,416,576 elements), over TensorRT's 2^31-1")
    # the default engine keeps the last position only: 16 x 1 x 152064
    assert plan_build(bundle, dataclasses.replace(full, decoder_logits="last")).profile.max_batch == 16
    # sized from the bundle with every position's logits: 832-token prompts fit 16 sequences (2,024,275,968)...
    auto_all = dataclasses.replace(load_profile("auto:server"), decoder_logits="all")
    assert plan_build(bundle, auto_all).profile.max_batch == 16
    # ...1600-token prompts only 8 (16 x 1600 x 152064 = 3.9e9; 8 x ... = 1.95e9)
    profile = plan_build(bundle, dataclasses.replace(auto_all, text_tokens=1024)).profile
    assert (profile.max_batch, profile.opt_batch, profile.max_prompt) == (8, 8, 1600)
    # last-token logits: attention scores bound it instead (16 x 28 x 1600^2 = 1.15e9 fits)
    last = plan_build(bundle, dataclasses.replace(load_profile("auto:server"), text_tokens=1024)).profile
    assert last.max_batch == 16


def test_vision_attention_limit_reads_the_bundles_hf_config(tmp_path):
    bundle = write_bundle(tmp_path / "b", **LLAVA15)
    # CLIP ViT-L/14-336: 577 tokens, 16 heads; 16 x 577^2 x batch 500 = 2.66e9
    (bundle / "config.json").write_text(json.dumps({"vision_config": {
        "image_size": 336, "patch_size": 14, "num_attention_heads": 16, "intermediate_size": 4096,
        "model_type": "clip_vision_model"}}))
    refresh_bundle(bundle)
    big = dataclasses.replace(load_profile("edge"), name="many", max_batch=500, max_prompt=600, max_context=700)
    with pytest.raises(QvlmError, match=r"vision attention scores tensor of shape \[500, 16, 577, 577\]"):
        plan_build(bundle, big)


def _spec(layout: dict) -> ModelSpec:
    return ModelSpec(image_token_id=1, eos_token_id=2, pad_token_id=0, num_layers=1, num_kv_heads=1, head_dim=4,
                     hidden_size=8, vocab_size=16, image_seq_length=4, image_size=2, family="llava_next",
                     image_layout=layout)


def test_any_resolution_image_token_bound():
    # LLaVA-NeXT-7B: 24x24 patches per 336-pixel tile; the 2x2 grid is the largest:
    # 576 base tokens + 48 rows x (48 + 1 newline) = 2928
    next_layout = {"patches": 24, "tile_size": 336, "max_patches": None,
                   "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}
    assert max_image_tokens(_spec(next_layout)) == 576 + 48 * 49
    # OneVision-style shrinking, small enough to do by hand: 2x2 patches per tile, a 2x2 grid,
    # budget 1 tile (4 patches). Unpadded to 4 x 1 the map is not shrunk (ratio 1): 4 x (1 + 1) = 8,
    # the most of any unpadding (4 x 4 shrinks to 2 x 2: 6); + 4 base tokens
    small = {"patches": 2, "tile_size": 1, "max_patches": 1, "grid_pinpoints": [[2, 2]]}
    assert max_image_tokens(_spec(small)) == 12
    assert max_image_tokens(_spec({**small, "max_patches": None})) == 4 + 4 * 5
    assert max_image_tokens(dataclasses.replace(_spec({}), image_seq_length=576)) == 576


def test_auto_profile_names_and_validation():
    auto = load_profile("auto:server")
    assert (auto.name, auto.size_from_bundle, auto.max_batch, auto.text_tokens) == ("auto:server", True, 16, 256)
    from qvlm_export.engine.profiles import profile_from_dict

    with pytest.raises(QvlmError, match="text_tokens must be an integer >= 1, got 0"):
        profile_from_dict({"name": "x", "text_tokens": 0})
