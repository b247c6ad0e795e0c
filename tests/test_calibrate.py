"""The sequential calibrator's streams and the equivalence of its live model with the saved state."""

from __future__ import annotations

import pytest
import torch

from qvlm_export.data.manifest import load_dataset
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.calibrate import SequentialCalibrator
from qvlm_export.quant.modules import QuantLinear, apply_quant_state
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.registry import get_method

N_CALIB = 8


@pytest.fixture(scope="module")
def calib_samples():
    return load_dataset(f"builtin:calib:{N_CALIB}")


def reference_hidden_states(vlm, batch) -> dict[str, torch.Tensor]:
    """Each unit's input as the model's own forward computes it (``output_hidden_states``)."""
    model = vlm.model
    positions = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        vision = model.model.vision_tower(batch.pixel_values, output_hidden_states=True).hidden_states
        out = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                    position_ids=positions, output_hidden_states=True)
    ref = {f"model.vision_tower.encoder.layers.{k}": vision[k] for k in range(len(vision) - 1)}
    ref["model.multi_modal_projector"] = vision[-1][:, 1:]  # strategy "default" drops CLS
    for k in range(len(model.model.language_model.layers)):
        ref[f"model.language_model.layers.{k}"] = out.hidden_states[k]
    return ref, out.logits


def recording(inner=None):
    """A block_fn that records both input streams (batch 0) before calling ``inner``."""
    seen = {}

    def block_fn(ctx):
        seen[ctx.units[0].name] = (ctx.q_inputs[0].clone(), ctx.fp_inputs[0].clone())
        if inner is not None:
            inner(ctx)
    return block_fn, seen


def test_noop_walk_reproduces_the_models_hidden_states(tiny_model_dir, calib_samples):
    vlm = load_vlm(tiny_model_dir)
    recipe = recipe_from_dict({"method": "rtn", "setting": "w8a8"})
    cal = SequentialCalibrator(vlm, calib_samples, recipe, batch_size=N_CALIB, device="cpu")
    ref, _ = reference_hidden_states(vlm, cal.batches[0])
    block_fn, seen = recording()
    state = cal.run(block_fn)
    assert state.layers == {} and set(seen) == set(ref)
    for name, (q, fp) in seen.items():
        assert torch.equal(q, fp), name
        err = (q - ref[name]).abs().max().item()
        assert err <= 1e-5 * max(ref[name].abs().max().item(), 1.0), (name, err)


def test_rtn_w8a8_live_model_equals_fp_model_plus_saved_state(tiny_model_dir, calib_samples):
    recipe = recipe_from_dict({"method": "rtn", "setting": "w8a8"})
    vlm = load_vlm(tiny_model_dir)
    cal = SequentialCalibrator(vlm, calib_samples, recipe, batch_size=4, device="cpu")
    ref, fp_logits = reference_hidden_states(load_vlm(tiny_model_dir), cal.batches[0])
    block_fn, seen = recording(get_method("rtn")(recipe).block)
    state = cal.run(block_fn)
    # 4 vision layers x 6 + projector 2 + 4 decoder layers x 7 Linears, all with static input scales
    assert len(state.layers) == 54 and all(lq.input_scale is not None for lq in state.layers.values())
    assert sum(isinstance(m, QuantLinear) for m in vlm.model.modules()) == 54

    rebuilt = apply_quant_state(load_vlm(tiny_model_dir).model, state)
    batch = cal.batches[0]
    positions = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        live = vlm.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                         attention_mask=batch.attention_mask, position_ids=positions).logits
        again = rebuilt(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                        attention_mask=batch.attention_mask, position_ids=positions).logits
    assert torch.equal(live, again)
    assert not torch.equal(live, fp_logits)  # quantization did change something

    # the FP stream is untouched by quantization; the quantized stream drifts from it
    for name, (_, fp) in seen.items():
        assert (fp - ref[name]).abs().max().item() <= 1e-5 * max(ref[name].abs().max().item(), 1.0), name
    last = seen["model.language_model.layers.3"]
    assert not torch.equal(last[0], last[1])
