"""Ragged int4 blocks: an int4 Linear whose K is not a multiple of the group size (SigLIP's fc2: K = 4304).

ONNX allows the ragged last block; TensorRT's parser does not. A tiny OneVision model
(SigLIP + Qwen2) with a 200-wide vision MLP gives fc2 K = 200 under the production group of
128: the W4A16 bundle keeps that layer out of int4 (float by default, exact; int8 on request)
and passes check-trt; keeping the ragged blocks (ragged_int4: int4) fails it, naming the node.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qvlm_export.engine.check_trt import check_path
from qvlm_export.export.api import export_bundle
from qvlm_export.export.config import ExportConfig
from qvlm_export.load.tiny import save_tiny_anyres_model
from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.quant.state import load_state
from qvlm_export.search.api import quantize

K = 200  # 128 + a ragged block of 72


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged")
    model = save_tiny_anyres_model(root / "model", family="llava_onevision", vision_layers=1, text_layers=1,
                                   vision_mlp=K, seed=1)
    recipe = recipe_from_dict({"method": "rtn", "setting": "w4a16",
                               "calibration": {"samples": 2, "batch_size": 2}})
    assert recipe.weights.group_size == 128
    quant = quantize(model, recipe, out=root / "quant", progress=False)
    state = load_state(quant)
    [name] = [n for n, lq in state.layers.items() if lq.weight_codes.shape[1] % 128]
    return root, model, quant, state, name


def _graph(bundle, graph="vision"):
    info = json.loads((bundle / "bundle.json").read_text())
    return onnx.load(str(bundle / info["graphs"][graph]["file"])), info


def test_default_keeps_ragged_layer_in_float_and_passes_check_trt(ragged):
    root, model, quant, state, name = ragged
    assert name.endswith("mlp.fc2") and list(state.layers[name].weight_codes.shape) == [128, K]
    bundle = export_bundle(model, quant, out=root / "float", dtype="fp16")
    report = check_path(bundle)
    assert report.ok, [str(v) for v in report.violations]
    vision, info = _graph(bundle)
    assert info["quant"]["kept_out_of_int4"] == {name: {"as": "float", "k": K, "group_size": 128}}
    weights = {t.name: t for t in vision.graph.initializer}
    stored = numpy_helper.to_array(weights[f"{name}.weight_t"])
    expected = state.layers[name].dequantized_weight().numpy().astype(np.float16).T
    assert stored.dtype == np.float16 and np.array_equal(stored, expected)  # the state's weight, bit for bit
    assert f"{name}.weight_quantized" not in weights
    # every other quantized vision Linear is still int4 with blocks of 128
    blocked = [n for n in vision.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 128 for a in n.attribute)]
    assert len(blocked) == sum(1 for n in state.layers if "vision_tower" in n or "projector" in n) - 1


def test_ragged_int4_kept_fails_check_trt_on_that_node(ragged):
    root, model, quant, _, name = ragged
    bundle = export_bundle(model, quant, out=root / "int4", dtype="fp16", config=ExportConfig(ragged_int4="int4"))
    _, info = _graph(bundle)
    assert "kept_out_of_int4" not in info["quant"]
    violations = check_path(bundle).violations
    assert [(v.node, v.rule) for v in violations] == [(f"{name}/weight_dq", "int4-even-blocks")]
    assert f"K = {K} is not a multiple of block_size 128 (a ragged last block of 72)" in violations[0].detail


def test_int8_option_requantizes_per_channel_within_half_a_step(ragged):
    root, model, quant, state, name = ragged
    bundle = export_bundle(model, quant, out=root / "int8", dtype="fp16", config=ExportConfig(ragged_int4="int8"))
    assert check_path(bundle).ok
    vision, info = _graph(bundle)
    kept = info["quant"]["kept_out_of_int4"][name]
    weights = {t.name: numpy_helper.to_array(t) for t in vision.graph.initializer}
    codes, scale = weights[f"{name}.weight_quantized"], weights[f"{name}.weight_scale"].astype(np.float32)
    assert codes.dtype == np.int8 and codes.shape == (K, 128) and scale.shape == (128,)
    dq = codes.astype(np.float32) * scale[None, :]
    w = state.layers[name].dequantized_weight().numpy().astype(np.float16).astype(np.float32).T
    error = float(np.abs(dq - w).max())
    assert kept["as"] == "int8" and kept["max_abs_error"] == pytest.approx(error, rel=1e-2)
    assert error <= 0.5 * float(scale.max()) * 1.001


def test_validate_weight_check_reads_layers_kept_out_of_int4(ragged, tmp_path):
    """validate's exact weight check accepts the float-kept layer and still catches a changed one."""
    import shutil

    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.validate.static_checks import weights_match_state

    root, model, quant, state, name = ragged
    bundle = export_bundle(model, quant, out=tmp_path / "b")
    assert weights_match_state(read_bundle(bundle, verify=False), state) == []
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    vision, info = _graph(broken)
    for t in vision.graph.initializer:
        if t.name == f"{name}.weight_t":
            w = numpy_helper.to_array(t).copy()
            w[0, :] += 1.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(vision, str(broken / info["graphs"]["vision"]["file"]))
    problems = weights_match_state(read_bundle(broken, verify=False), state)
    assert len(problems) == 1 and "float weight (kept out of int4) differs" in problems[0]
