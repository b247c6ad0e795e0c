"""The combined method (Q-VLM + QIG + Q-ViT): the hooks reduce exactly to Q-VLM when off."""

from __future__ import annotations

import pytest
import torch

from qvlm_export.errors import QvlmError
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.combined.config import combined_config
from qvlm_export.search.qvlm.block_search import error_terms

GEN = torch.Generator().manual_seed(0)
FAST = {"iterations": 4, "progress": False, "ig_steps": 4}


@pytest.mark.parametrize("token_normalised", [False, True])
def test_uniform_token_weights_leave_the_block_error_unchanged(token_normalised):
    y, r = torch.randn(2, 5, 8, generator=GEN), torch.randn(2, 5, 8, generator=GEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    plain = error_terms(y, r, mask, token_normalised)
    weighted = error_terms(y, r, mask, token_normalised, torch.full((2, 5), 0.37))
    torch.testing.assert_close(plain[0] / plain[1], weighted[0] / weighted[1])


def test_token_weights_by_hand():
    y, r = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[0.0], [1.0]]])
    num, den = error_terms(y, r, None, False, torch.tensor([[3.0, 1.0]]))  # (3*1 + 1*1) / (3*0 + 1*1)
    assert float(num / den) == pytest.approx(4.0)


def test_relative_weights_make_the_pooled_objective_token_normalised():
    y, r = torch.randn(2, 5, 8, generator=GEN), torch.randn(2, 5, 8, generator=GEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :3] = False
    w = torch.rand(2, 5, generator=GEN)
    normalised = error_terms(y, r, mask, True, w)
    pooled = error_terms(y, r, mask, False, w / r.pow(2).sum(-1))  # what per_token_relative passes
    torch.testing.assert_close(pooled[0] / pooled[1], normalised[0] / normalised[1])


def _state(tiny_model_dir, tmp_path, method, args):
    from qvlm_export.quant.state import load_state
    from qvlm_export.search.api import quantize

    recipe = recipe_from_dict({"method": method, "setting": "w4a8", "method_args": args})
    return load_state(quantize(model=tiny_model_dir, recipe=recipe, calib="builtin:calib:8",
                               out=tmp_path / method, progress=False))


def test_both_parts_off_is_exactly_qvlm_and_on_differs(tiny_model_dir, tmp_path):
    base = _state(tiny_model_dir, tmp_path / "a", "qvlm", {"iterations": 4, "progress": False})
    off = _state(tiny_model_dir, tmp_path / "b", "qvlm_plus", {**FAST, "token_weights": False, "qvit": False})
    assert base.layers.keys() == off.layers.keys()
    for name, layer in base.layers.items():
        assert torch.equal(layer.weight_codes, off.layers[name].weight_codes), name
    full = _state(tiny_model_dir, tmp_path / "c", "qvlm_plus", {**FAST, "lr_irm": 0.1, "choose_per_block": False})
    assert full.extras["qvlm_plus"]["config"]["token_weights"] is True
    assert full.extras["qvlm_plus_irm"]  # an IRM folded per vision unit
    # the parts act on the search (its result; whether it replaces the block's start is decided after)
    searched = {b: s["searched_error"] for b, s in base.extras["qvlm_blocks"].items()}
    assert any(s["searched_error"] != searched[b] for b, s in full.extras["qvlm_blocks"].items())


def test_bad_combined_option_is_one_line():
    with pytest.raises(QvlmError, match="unknown Q-VLM option 'tokens'"):
        combined_config({"tokens": True})


@pytest.mark.parametrize("setting", ["w8a8", "w4a16", "w4a8", "w3a16", "w6a6", "w4a4"])
def test_shipped_recipes_run_qvlm_exactly_as_its_own_recipe(setting):
    from qvlm_export.quant.recipe import load_recipe
    from qvlm_export.search.registry import get_method

    plus, qvlm = load_recipe(f"qvlm_plus-{setting}"), load_recipe(f"qvlm-{setting}")
    assert get_method("qvlm_plus")(plus).config == get_method("qvlm")(qvlm).config


def test_choose_per_block_keeps_the_smaller_held_out_error(tiny_model_dir, tmp_path):
    chosen = _state(tiny_model_dir, tmp_path, "qvlm_plus", {**FAST, "lr_irm": 0.1, "choose_on": "held"})
    choice = chosen.extras["qvlm_plus_choice"]
    assert choice and choice.keys() == chosen.extras["qvlm_blocks"].keys()
    for block, c in choice.items():
        expected = "qvlm_plus" if c["plus_held_error"] < c["qvlm_held_error"] else "qvlm"
        assert c["chosen"] == expected, block


def _judge_preferring(winner: str):
    class Judge:  # per block: the first call judges the plain search, the second the combined one
        def __init__(self, *_args):
            self.calls = 0

        def __call__(self):
            self.calls += 1
            plain = self.calls == 1
            return (1.0, 1.0) if plain == (winner == "qvlm_plus") else (0.0, 0.0)
    return Judge


@pytest.mark.parametrize("winner", ["qvlm", "qvlm_plus"])
def test_the_chosen_search_is_committed_whole(tiny_model_dir, tmp_path, monkeypatch, winner):
    """Whichever search wins every block, the state is exactly that method's own run (codes, folded IRM)."""
    import qvlm_export.search.combined.method as method

    args = {**FAST, "lr_irm": 0.1}
    if winner == "qvlm":
        ref = _state(tiny_model_dir, tmp_path / "ref", "qvlm", {"iterations": 4, "progress": False})
    else:
        ref = _state(tiny_model_dir, tmp_path / "ref", "qvlm_plus", {**args, "choose_per_block": False})
    monkeypatch.setattr(method, "HeldOutJudge", _judge_preferring(winner))
    got = _state(tiny_model_dir, tmp_path / "got", "qvlm_plus", args)
    assert {c["chosen"] for c in got.extras["qvlm_plus_choice"].values()} == {winner}
    assert got.layers.keys() == ref.layers.keys()
    for name, layer in ref.layers.items():
        assert torch.equal(got.layers[name].weight_codes, layer.weight_codes), name
        torch.testing.assert_close(got.layers[name].weight_scale, layer.weight_scale, rtol=0, atol=0)
    assert got.float_overrides.keys() == ref.float_overrides.keys()  # the IRM's k biases only when it was kept
    assert bool(got.extras.get("qvlm_plus_irm")) == (winner == "qvlm_plus")


def test_choose_on_both_also_needs_the_whole_calibration_set(tiny_model_dir, tmp_path):
    state = _state(tiny_model_dir, tmp_path, "qvlm_plus", {**FAST, "choose_per_block": True, "choose_on": "both"})
    for block, c in state.extras["qvlm_plus_choice"].items():
        wins = c["plus_held_error"] < c["qvlm_held_error"] and c["plus_error"] < c["qvlm_error"]
        assert c["chosen"] == ("qvlm_plus" if wins else "qvlm"), block
