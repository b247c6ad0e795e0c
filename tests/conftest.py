"""Shared fixtures: tiny random models (seconds to build) and the embedded trained model."""

from __future__ import annotations

import os

import pytest

# Two cores on CI: keep torch from oversubscribing when tests run beside each other.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight CLIP + Llama LLaVA directory."""
    from qvlm_export.load.tiny import save_tiny_random_model

    return save_tiny_random_model(tmp_path_factory.mktemp("tiny_clip_llama"), vision="clip", text="llama")


@pytest.fixture(scope="session")
def embedded_model_dir():
    from qvlm_export.load.model import EMBEDDED_MODEL_DIR

    return EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def tiny_w8a8_thresholds(tmp_path_factory):
    """A thresholds YAML for the 1+1-layer random models of ``tiny_bundle`` (the packaged bounds are the
    embedded model's). Measured there: faithful >= 30 dB, fast 42 dB with AVX512-VNNI and 21.6 dB on AVX2
    (qemu -cpu Haswell), a x4 weight scale ~9 dB. A random model answers chaotically: fast mode's identical
    answers were 15/16 with VNNI and 6/16 on AVX2, hence the low task bound."""
    path = tmp_path_factory.mktemp("thresholds") / "thresholds.yaml"
    path.write_text("""version: 1
precisions:
  w8a8:
    faithful: {default: {cosine: 0.999, sqnr_db: 25, nonfinite: 0}}
    fast: {default: {cosine: 0.97, sqnr_db: 12, nonfinite: 0}}
    drift: {default: {sqnr_db: 12}}
    task: {max_accuracy_drop: 0.1, min_identical_answers: 0.125}
""")
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """``tiny_bundle(setting, dtype)``: an exported ONNX bundle of a 1+1-layer random model, RTN-quantized.

    Cached per (setting, dtype) for the whole session, so every test that needs a real
    exported bundle shares one export (each costs ~15-25 s on 2 cores). ``setting`` "fp"
    gives the unquantized reference bundle.
    """
    from qvlm_export.export.api import export_bundle
    from qvlm_export.load.tiny import save_tiny_random_model
    from qvlm_export.quant.recipe import recipe_from_dict
    from qvlm_export.search.api import quantize

    root = tmp_path_factory.mktemp("tiny_bundles")
    cache: dict[tuple[str, str], object] = {}
    model = save_tiny_random_model(root / "model", vision_layers=1, text_layers=1, hidden=32, heads=2)

    def make(setting: str = "w8a8", dtype: str = "fp32"):
        if (setting, dtype) not in cache:
            quant = None
            if setting != "fp":
                recipe = recipe_from_dict({"method": "rtn", "setting": setting, "weights": {"group_size": 16},
                                           "calibration": {"samples": 2, "batch_size": 2}})
                quant = root / f"quant-{setting}"
                if not quant.exists():
                    quantize(model, recipe, out=quant, progress=False)
            cache[(setting, dtype)] = export_bundle(model, quant, out=root / f"bundle-{setting}-{dtype}", dtype=dtype)
        return cache[(setting, dtype)]

    return make
