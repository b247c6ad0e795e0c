"""Export of other LLaVA-family architectures (tiny random weights), the fp16 variant and determinism.

Random weights give parity numbers only: prefill + decode logits of the faithful ORT
session against the PyTorch simulated model. Models are cut to 1 vision + 1 text layer
so each export takes seconds; fp16 and determinism reuse the conftest's shared bundles.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402
from _export_helpers import graph_file  # noqa: E402

from qvlm_export.data.manifest import load_dataset  # noqa: E402
from qvlm_export.engine.check_trt import check_path  # noqa: E402
from qvlm_export.export.api import export_bundle  # noqa: E402
from qvlm_export.load.tiny import save_tiny_random_model  # noqa: E402
from qvlm_export.manifest import hash_tree  # noqa: E402
from qvlm_export.runtime.bundle import read_bundle  # noqa: E402
from qvlm_export.runtime.ort_runner import ort_runner  # noqa: E402

# (vision, text, setting): each architecture with a different deployable setting
ARCHS = {"siglip-qwen2": ("siglip", "qwen2", "w8a8"), "clip-mistral": ("clip", "mistral", "w4a16")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {name: save_tiny_random_model(root / name, vision=v, text=t, vision_layers=1, text_layers=1, seed=3)
            for name, (v, t, _) in ARCHS.items()}


@pytest.fixture(scope="module")
def bundles(models) -> dict[str, Path]:
    return {name: H.bundle(ARCHS[name][2], "fp32", models[name]) for name in ARCHS}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_prefill_and_decode_parity(models, bundles, arch):
    setting = ARCHS[arch][2]
    vlm = H.reference_model(setting, models[arch])
    batch = H.prompt_batch(vlm.processor, load_dataset("builtin:eval:3"))
    reference, tokens = H.torch_steps(vlm, batch, steps=2)
    with ort_runner(bundles[arch], "faithful", threads=1) as runner:
        got = H.runner_steps(runner, batch, tokens)
    H.assert_logit_parity(H.relative_logit_errors(reference, got, batch["attention_mask"]), setting)
    assert check_path(bundles[arch]).ok


def test_siglip_keeps_every_patch_and_qwen2_biases_stay_float(bundles, models):
    info = read_bundle(bundles["siglip-qwen2"])
    assert info.model.image_seq_length == 16  # 64x64 / patch 16, no CLS to drop ("full" strategy)
    model = onnx.load(str(graph_file(bundles["siglip-qwen2"], "decoder")))
    inits = {t.name: t for t in model.graph.initializer}
    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    matmul_out = next(n.output[0] for n in model.graph.node if n.name == f"{q_proj}/MatMul")
    bias_add = next(n for n in model.graph.node if n.op_type == "Add" and matmul_out in n.input)
    bias = next(i for i in bias_add.input if i != matmul_out)
    assert inits[bias].data_type == TensorProto.FLOAT  # the bias is a float constant, never dequantized


def test_fp16_variant_has_fp16_interface_scales_and_fp32_answers(tiny_bundle):
    """The conftest's shared W8A8 fp32/fp16 bundles of one state (no extra export in a full run)."""
    fp32, fp16 = Path(tiny_bundle("w8a8", "fp32")), Path(tiny_bundle("w8a8", "fp16"))
    info = read_bundle(fp16)
    assert info.dtype == "fp16" and info.float_dtype == np.float16
    for graph in ("vision", "decoder"):
        model = onnx.load(str(graph_file(fp16, graph)))
        floats = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
                  if v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert floats and set(floats) == {TensorProto.FLOAT16}, graph
        scales = [t.data_type for t in model.graph.initializer if t.name.endswith("_scale")]
        assert scales and set(scales) == {TensorProto.FLOAT16}, graph
    assert check_path(fp16).ok
    batch = H.prompt_batch(info.load_processor(), load_dataset("builtin:eval:3"))
    logits = {}
    for name, bundle in (("fp32", fp32), ("fp16", fp16)):
        with ort_runner(bundle, "faithful", threads=1) as runner:
            logits[name] = H.runner_steps(runner, batch, [])
    error = H.relative_logit_errors(logits["fp32"], logits["fp16"], batch["attention_mask"]).max()
    assert 0 < error < 2e-2, f"fp16 vs fp32 prefill logits: {error:.2e} of the range"


def test_export_is_byte_identical_twice(tiny_bundle, tmp_path):
    first = Path(tiny_bundle("w4a16", "fp16"))
    model, quant = first.parent / "model", first.parent / "quant-w4a16"  # the conftest fixture's layout
    assert model.is_dir() and quant.is_dir()
    again = export_bundle(model=model, quant=quant, out=tmp_path / "again", dtype="fp16")
    assert hash_tree(first) == hash_tree(again)
    assert (first / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
