"""Q-ViT (seed 003) post-training: DGD and the function-preserving IRM, by hand and on a tiny CLIP."""

from __future__ import annotations

import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.modules import QuantLinear, rtn_layer
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.qvit.config import qvit_config
from qvlm_export.search.qvit.dgd import dgd_loss, patch_similarity
from qvlm_export.search.qvit.irm import fold_irm_linear, fold_irm_quantized, irm_apply

GEN = torch.Generator().manual_seed(0)


def test_dgd_is_zero_when_student_equals_teacher_and_positive_otherwise():
    q, k = torch.randn(2, 9, 16, generator=GEN), torch.randn(2, 9, 16, generator=GEN)
    assert float(dgd_loss(q, k, q.clone(), k.clone(), heads=4)) == 0.0
    assert float(dgd_loss(q + 0.3 * torch.randn(2, 9, 16, generator=GEN), k, q, k, heads=4)) > 0.01


def test_patch_similarity_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # one image, two patches, one head
    g = patch_similarity(x, heads=1)
    torch.testing.assert_close(g, torch.tensor([[[[1.0, 0.0], [0.0, 4.0]]]]) / 17 ** 0.5)
    assert float(patch_similarity(3.0 * x, heads=1).sub(g).abs().max()) < 1e-7  # scale-free


def _attention(seed=0):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    cfg._attn_implementation = "eager"
    attn = CLIPAttention(cfg).eval()
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.bias.normal_(0, 0.1)
    return attn


def test_irm_leaves_softmax_rows_unchanged():
    q, k = torch.randn(5, 8, generator=GEN), torch.randn(7, 8, generator=GEN)
    log_g, beta = torch.randn(8, generator=GEN) * 0.5, torch.randn(8, generator=GEN)
    q2, k2 = irm_apply(q, k, log_g, beta)
    torch.testing.assert_close(torch.softmax(q2 @ k2.T, -1), torch.softmax(q @ k.T, -1), atol=1e-6, rtol=0)


def test_folded_irm_leaves_the_fp_attention_output_unchanged():
    attn = _attention()
    x = torch.randn(2, 10, 32, generator=GEN)
    with torch.no_grad():
        before = attn(x)[0]
        fold_irm_linear(attn.q_proj, attn.k_proj, torch.randn(32, generator=GEN) * 0.5, torch.randn(32, generator=GEN))
        after = attn(x)[0]
    assert float((after - before).abs().max()) < 1e-5


@pytest.mark.parametrize("setting", ["w8a8", "w4a8", "w4a4"])
def test_irm_fold_into_integer_codes_is_exact(setting):
    attn = _attention(1)
    recipe = recipe_from_dict({"method": "qvit", "setting": setting})
    log_g, beta = torch.randn(32, generator=GEN) * 0.5, torch.randn(32, generator=GEN)
    x = torch.randn(2, 10, 32, generator=GEN)
    layers = {n: rtn_layer(getattr(attn, n).weight.detach(), recipe) for n in ("q_proj", "k_proj")}
    for n, layer in layers.items():
        setattr(attn, n, QuantLinear(layer, getattr(attn, n).bias))
    with torch.no_grad():
        before = attn(x)[0]
        ql, kl, qb, kb = fold_irm_quantized(layers["q_proj"], layers["k_proj"], attn.q_proj.bias, attn.k_proj.bias,
                                            log_g, beta)
        assert torch.equal(ql.weight_codes, layers["q_proj"].weight_codes)  # codes unchanged: only scales move
        attn.q_proj, attn.k_proj = QuantLinear(ql, qb), QuantLinear(kl, kb)
        after = attn(x)[0]
    assert float((after - before).abs().max()) < 1e-5


def test_qvit_quantizes_the_tiny_model_with_irm_and_dgd(tiny_model_dir, tmp_path):
    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.evaluate.vision import vision_outputs, vision_sqnr
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    recipe = recipe_from_dict({"method": "qvit", "setting": "w8a8",
                               "method_args": {"iterations": 10, "lambda_dgd": 1.0, "lr_irm": 0.1, "progress": False}})
    out = quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8", out=tmp_path / "s", progress=False)
    state = load_state(out)
    vision = {k: v for k, v in state.extras["qvit_blocks"].items() if "vision_tower" in k}
    assert vision and all("irm" in v for v in vision.values())
    assert any(name.endswith("self_attn.k_proj.bias") for name in state.float_overrides)
    samples = load_dataset("builtin:eval:8")
    fp = vision_outputs(load_vlm(tiny_model_dir), samples)
    assert vision_sqnr(fp, vision_outputs(load_simulated(out)[0], samples))["vision_sqnr_db"] > 20


def test_bad_qvit_option_is_one_line():
    with pytest.raises(QvlmError, match="unknown Q-ViT option 'lambda'"):
        qvit_config({"lambda": 1.0})


@pytest.mark.slow
def test_exported_vision_graph_equals_the_simulated_model_with_folded_irm(tiny_model_dir, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.export.api import export_bundle
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    # weight-only, so no activation rounding can flip between the two float paths: the graph must match to float
    # precision (quantized activations are compared with their quantization-error bound by `qvlm-export validate`)
    recipe = recipe_from_dict({"method": "qvit", "setting": "w4a16",
                               "method_args": {"iterations": 10, "lambda_dgd": 1.0, "lr_irm": 0.2, "progress": False,
                                               "start": ["rtn"], "holdout": 0.0}})  # a search that is kept
    state = quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8", out=tmp_path / "s", progress=False)
    irm = next(v["irm"] for k, v in load_state(state).extras["qvit_blocks"].items() if "vision_tower" in k)
    assert max(abs(r["g_max"] - 1) + abs(r["g_min"] - 1) + r["beta_absmax"] for r in irm.values()) > 1e-3  # learned
    bundle = export_bundle(model=tiny_model_dir, quant=state, out=tmp_path / "b", dtype="fp32")
    vlm = load_simulated(state)[0]
    images = [s.image for s in load_dataset("builtin:eval:4")]
    pixels = vlm.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(pixel_values=pixels)
    feats = torch.cat(list(feats.pooler_output if hasattr(feats, "pooler_output") else feats)).reshape(4, -1)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_quant_qdq", "1")  # exact QDQ arithmetic, no fused int8 kernels
    vision = next(p for p in sorted(bundle.rglob("*.onnx")) if "vision" in p.name)  # the bundle layout names it
    sess = ort.InferenceSession(str(vision), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: pixels.numpy().astype(np.float32)})[0].reshape(4, -1)
    scale = float(feats.abs().max())
    assert float(np.abs(out - feats.numpy()).max()) < 1e-4 * scale
