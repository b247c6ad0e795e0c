"""LLaVA-NeXT and LLaVA-OneVision through quantize -> export -> ONNX Runtime, against PyTorch.

Tiny random-weight models (1 vision + 1 text layer, 64-pixel tiles); images of five
aspect ratios and sizes, so every bundle runs 3 to 10 tiles per image through one dynamic
vision batch and packs them in NumPy. The bar is parity with the PyTorch model (FP, or
the simulated quantized model): prefill + decode logits, and greedy answers token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402
from test_families import SIZES, images  # noqa: E402

from qvlm_export.engine.builder import plan_build  # noqa: E402
from qvlm_export.engine.check_trt import check_path  # noqa: E402
from qvlm_export.engine.profiles import load_profile  # noqa: E402
from qvlm_export.load.tiny import save_tiny_anyres_model  # noqa: E402
from qvlm_export.runtime.bundle import read_bundle  # noqa: E402
from qvlm_export.runtime.generate import RunnerAnswerer  # noqa: E402
from qvlm_export.runtime.ort_runner import ort_runner  # noqa: E402

FAMILIES = ("llava_next", "llava_onevision")


@functools.cache
def model(family: str) -> Path:
    return save_tiny_anyres_model(H.workdir() / f"tiny-{family}", family=family, vision_layers=1, text_layers=1,
                                  seed=2)


class _Sample:
    def __init__(self, image, question: str):
        self.image, self.question = image, question


def samples() -> list[_Sample]:
    return [_Sample(img, "what color is the shape") for img in images()]


# Each family and each setting at least once, within CI's time (every pair measured in docs/families.md);
# the OneVision run test below exports and validates OneVision's FP and W8A8 bundles again.
PAIRS = [("llava_next", "fp"), ("llava_next", "w4a16"), ("llava_onevision", "w8a8")]
BUNDLE_SETTING = dict(PAIRS[1:])


@pytest.mark.parametrize(("family", "setting"), PAIRS)
def test_ort_logits_and_answers_equal_pytorch(family, setting):
    bundle = H.bundle(setting, "fp32", model(family))
    vlm = H.reference_model(setting, model(family))
    batch = H.prompt_batch(vlm.processor, samples())
    assert "image_sizes" in batch and batch["pixel_values"].ndim == 5
    reference, tokens = H.torch_steps(vlm, batch, steps=3)
    with ort_runner(bundle, "faithful", threads=1) as runner:
        got = H.runner_steps(runner, batch, tokens)
    errors = H.relative_logit_errors(reference, got, batch["attention_mask"])
    if setting == "w8a8":
        # int8 activation codes on a rounding boundary flip between ORT's and PyTorch's float kernels
        # (assert_logit_parity's docstring); in these random towers 0.6% to 2% of the vision outputs move
        # by one step, which leaves some samples exact and moves the others by up to 0.9% of the logit
        # range (measured over 20 images). A wrong packing or graph moves every sample by far more.
        assert errors.max() < 0.05, np.round(errors, 5)
    else:
        H.assert_logit_parity(errors, setting)
    answerer = RunnerAnswerer(ort_runner(bundle, "faithful", threads=1), max_new_tokens=4)
    with answerer:
        ort_tokens = answerer.generate([s.image for s in samples()], [s.question for s in samples()]).tokens
    torch_tokens = np.concatenate(tokens, axis=1)[:, :4]
    if setting == "w8a8":  # an int8 rounding flip may change a later token (assert_logit_parity's docstring)
        assert (ort_tokens[:, 0] == torch_tokens[:, 0]).mean() >= 0.6
    else:
        assert np.array_equal(ort_tokens, torch_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_records_the_layout_and_passes_check_trt(family):
    bundle = H.bundle(BUNDLE_SETTING[family], "fp32", model(family))
    info = read_bundle(bundle)
    assert info.model.family == family and info.model.image_seq_length == 16
    layout = info.model.image_layout
    assert layout["tile_size"] == 64 and layout["patches"] == 4 and len(layout["image_newline"]) == info.model.hidden_size
    assert layout["max_patches"] == (2 if family == "llava_onevision" else None)
    assert check_path(bundle).ok
    # engine profiles: a batch of max_batch images of up to 3x3 grid tiles + the base tile
    profile = dataclasses.replace(load_profile("edge"), graph_dtype="fp32")
    vision = next(e for e in plan_build(bundle, profile).engines if e.graph == "vision")
    assert vision.profiles[0][1]["pixel_values"][2][0] == profile.batch_range[2] * 10


def test_image_sizes_cover_several_aspect_ratios():
    """The parity images really are tiled differently: 1:1, 2:1, 1:3, 3:2 and a large square."""
    vlm = H.reference_model("fp", model("llava_next"))
    batch = H.prompt_batch(vlm.processor, samples())
    ratios = {round(w / h, 2) for h, w in batch["image_sizes"]}
    assert len(ratios) >= 4 and len(SIZES) == batch["image_sizes"].shape[0]


# Every method calibrates on real multi-tile inputs (3 tiles per builtin image); short searches.
FAST_ARGS = {"qvlm": {"iterations": 4, "progress": False}, "qvit": {"iterations": 4, "progress": False},
             "qvlm_plus": {"iterations": 4, "ig_steps": 4, "progress": False},
             "qig": {"ig_steps": 4, "grid": 5, "clip_grid": 5}}
# rtn, smoothquant, awq and gptq share the calibrator walk rtn exercises; these four each add their own
# whole-model forwards (Q-VLM's probes and Jacobians, QIG's gradients, Q-ViT's q/k hooks). All eight
# passed on the loaded dev machine (docs/families.md).
METHODS = ("rtn", "qvlm", "qig", "qvit")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_onevision_at_w8a8(method):
    """Simulated W8A8 logits of each method within 20 dB SQNR of FP on images of five aspect ratios."""
    import torch

    from qvlm_export.quant.functional import sqnr_db
    from qvlm_export.quant.recipe import load_recipe, recipe_from_dict
    from qvlm_export.quant.simulate import load_simulated
    from qvlm_export.search.api import quantize

    raw = load_recipe(f"{method}-w8a8").to_dict()
    raw["method_args"] = {**raw.get("method_args", {}), **FAST_ARGS.get(method, {})}
    raw["calibration"] = {**raw["calibration"], "samples": 4, "batch_size": 4}
    state = quantize(model=model("llava_onevision"), recipe=recipe_from_dict(raw), calib="builtin:calib",
                     out=H.workdir() / f"ov-{method}", progress=False, device="cpu")
    quant_vlm, fp_vlm = load_simulated(state)[0], H.reference_model("fp", model("llava_onevision"))
    batch = H.prompt_batch(fp_vlm.processor, samples())
    kwargs = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.inference_mode():
        ref, got = fp_vlm.model(**kwargs).logits, quant_vlm.model(**kwargs).logits
    assert sqnr_db(ref, got) > 20.0


@pytest.mark.slow
def test_run_on_onevision_passes_with_derived_bounds(tmp_path, capsys):
    """``qvlm-export run --model <OneVision>``: Q-VLM W8A8, no thresholds file (bounds derived from RTN).

    W8A8 only, to keep CI's time: the default W8A8 + W4A16 run is in docs/families.md.

    Faithful sessions only: ORT's fast int8 kernel fails this random SigLIP tower's W8A8 bounds on
    AVX2 CPUs without VNNI (docs/families.md), which is the kernel's verdict, not the export's.
    """
    from qvlm_export.cli import main

    out = tmp_path / "run"
    code = main(["run", "--model", str(model("llava_onevision")), "--out", str(out), "--no-progress",
                 "--settings", "w8a8", "--calib-samples", "4", "--iterations", "2", "--set", "validate.runners=faithful",
                 "--set", "validate.calib_samples=4", "--set", "validate.eval_samples=8", "--set", "validate.threads=1"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["passed"] is True and [c["name"] for c in report["candidates"]] == ["w8a8"]
    assert report["thresholds"]["source"].startswith("derived")
