"""Q-ViT's release IRM (an affine LayerNorm on each head's q and k): simulated only, by the formula."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.quant import layernorm_irm as ln_irm
from qvlm_export.quant.recipe import recipe_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from test_qvit import _attention  # noqa: E402

GEN = torch.Generator().manual_seed(3)


def _norm(weight, bias, heads=4, eps=1e-5):
    return ln_irm.HeadNorm.from_json({"heads": heads, "eps": eps, "weight": weight.tolist(), "bias": bias.tolist()})


def _by_formula(attn, x, q, k, gq, bq, gk, bk, eps=1e-5):
    """softmax(LN(q_h) LN(k_h)^T / sqrt(d)) v_h per head, then out_proj; LN over each head's d channels."""
    b, n, c = x.shape
    heads = attn.num_heads
    d = c // heads

    def ln(t, g, beta):
        t = t.reshape(b, n, heads, d)
        mu = t.mean(-1, keepdim=True)
        var = (t - mu).pow(2).mean(-1, keepdim=True)
        return ((t - mu) / torch.sqrt(var + eps) * g + beta).transpose(1, 2)

    v = attn.v_proj(x).reshape(b, n, heads, d).transpose(1, 2)
    p = torch.softmax(ln(q, gq, bq) @ ln(k, gk, bk).transpose(-1, -2) / d ** 0.5, dim=-1)
    return attn.out_proj((p @ v).transpose(1, 2).reshape(b, n, c))


def test_layernorm_irm_fp_output_is_the_formula_and_changes_the_function():
    attn = _attention(seed=3)
    x = torch.randn(2, 10, 32, generator=GEN)
    gq, bq, gk, bk = (torch.randn(8, generator=GEN) for _ in range(4))
    with torch.no_grad():
        plain = attn(x)[0]
        handles = ln_irm.install(attn, _norm(gq, bq), _norm(gk, bk))
        got = attn(x)[0]
        want = _by_formula(attn, x, attn.q_proj(x), attn.k_proj(x), gq, bq, gk, bk)  # q_proj outside attn: no hook
        assert float((got - want).abs().max()) < 1e-5
        assert float((got - plain).abs().max()) > 1e-2  # not function-preserving (why it is simulated only)
        for h in handles:
            h.remove()
        assert torch.equal(attn(x)[0], plain)


def test_fit_to_identity_is_the_least_squares_affine():
    x = torch.randn(64, 32, generator=GEN) * torch.linspace(0.5, 3, 32) + torch.linspace(-1, 1, 32)
    norm = ln_irm.HeadNorm(4, 8)
    ln_irm.fit_to_identity(norm, x)
    with torch.no_grad():
        fitted = float((norm(x) - x).pow(2).mean())
        for delta in (0.05, -0.05):  # any other affine is worse
            norm.norm.weight.add_(delta)
            assert float((norm(x) - x).pow(2).mean()) > fitted
            norm.norm.weight.sub_(delta)
    assert fitted < float(x.var())


def test_layernorm_irm_state_is_simulated_only_and_loads_with_its_norms(tiny_model_dir, tmp_path):
    from qvlm_export.export.api import check_exportable
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    recipe = recipe_from_dict({"method": "qvit", "setting": "w8a8", "method_args": {
        "iterations": 6, "lambda_dgd": 0.1, "lr_irm": 0.05, "irm_form": "layernorm", "progress": False}})
    assert not recipe.deployable and "LayerNorm IRM" in recipe.runs_on
    out = quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8", out=tmp_path / "s", progress=False)
    state = load_state(out)
    norms = state.extras[ln_irm.EXTRAS_KEY]
    vision_attn = {n.rsplit(".", 1)[0] for n in state.layers if "vision_tower" in n and n.endswith("q_proj")}
    assert set(norms) == vision_attn and not state.float_overrides  # nothing folded
    with pytest.raises(QvlmError, match="simulated only.*LayerNorm IRM"):
        check_exportable(state)
    vlm, info = load_simulated(out)
    assert info["deployable"] is False
    name = sorted(norms)[0]
    attn, entry = vlm.model.get_submodule(name), norms[name]
    x = torch.randn(2, 5, attn.q_proj.in_features, generator=GEN)
    t = torch.tensor
    with torch.no_grad():
        want = _by_formula(attn, x, attn.q_proj(x), attn.k_proj(x), t(entry["q"]["weight"]), t(entry["q"]["bias"]),
                           t(entry["k"]["weight"]), t(entry["k"]["bias"]), entry["q"]["eps"])
        got = attn(x)[0]
    assert float((got - want).abs().max()) < 1e-4


def test_bad_irm_form_is_one_line():
    from qvlm_export.search.qvit.config import qvit_config

    with pytest.raises(QvlmError, match="irm_form must be one of"):
        qvit_config({"irm_form": "paper"})
