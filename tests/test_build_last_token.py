"""The TensorRT decoder's last-token logits: a copy of the decoder graph edited at build time, run here on ORT.

The edited graph must give exactly the last row of the bundle graph's logits and the same
KV cache, and the bundle's files must stay byte-identical (ONNX Runtime keeps scoring
every position with them).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_build_engines import H100, PROFILE, RecordingCompiler, tiny_bundle_graphs, write_bundle

from qvlm_export.engine.builder import build_engines, read_engine_manifest
from qvlm_export.engine.last_token import last_token_logits, write_last_token_decoder
from qvlm_export.errors import QvlmError
from qvlm_export.manifest import sha256_file


def _session(path):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prefill_feeds(session, batch=2, seq=5, seed=0):
    rng, feeds = np.random.default_rng(seed), {}
    for value in session.get_inputs():
        dtype = np.int64 if value.type == "tensor(int64)" else (np.float16 if "float16" in value.type else np.float32)
        if value.name == "inputs_embeds":
            feeds[value.name] = rng.standard_normal((batch, seq, value.shape[2])).astype(dtype)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones((batch, seq), np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.tile(np.arange(seq), (batch, 1)).astype(np.int64)
        else:  # past_key_values.*: empty (prefill)
            feeds[value.name] = np.zeros((batch, value.shape[1], 0, value.shape[3]), dtype)
    return feeds


def _assert_last_row(original, edited, seq=5):
    a, b = _session(original), _session(edited)
    feeds = _prefill_feeds(a, seq=seq)
    full = dict(zip([o.name for o in a.get_outputs()], a.run(None, feeds), strict=True))
    last = dict(zip([o.name for o in b.get_outputs()], b.run(None, feeds), strict=True))
    assert full["logits"].shape[1] == seq and last["logits"].shape == (2, 1, full["logits"].shape[2])
    np.testing.assert_allclose(last["logits"], full["logits"][:, -1:], rtol=1e-6, atol=1e-6)
    for name in full:
        if name != "logits":
            assert np.array_equal(full[name], last[name]), name


def test_qdq_decoder_keeps_the_last_row_and_the_bundle_untouched(tmp_path):
    source = tmp_path / "decoder.onnx"
    onnx.save(tiny_bundle_graphs(TensorProto.FLOAT)["decoder"], source)
    before = sha256_file(source)
    edited = write_last_token_decoder(source, tmp_path / "edited")
    assert sha256_file(source) == before and edited.name == "decoder.onnx"
    model = onnx.load(str(edited))
    onnx.checker.check_model(model, full_check=True)
    # the slice sits in front of the activation QuantizeLinear, not between Q/DQ and the MatMul
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert list(q.input)[0] == "inputs_embeds/last_position"
    _assert_last_row(source, edited)
    with pytest.raises(QvlmError, match="already returns last-token logits"):
        last_token_logits(model)


def test_external_data_is_hard_linked_not_copied(tmp_path):
    source = tmp_path / "b" / "decoder.onnx"
    source.parent.mkdir()
    onnx.save(tiny_bundle_graphs(TensorProto.FLOAT)["decoder"], source, save_as_external_data=True,
              all_tensors_to_one_file=True, location="decoder.onnx_data", size_threshold=0)
    edited = write_last_token_decoder(source, tmp_path / "edited")
    link = tmp_path / "edited" / "decoder.onnx_data"
    assert link.stat().st_ino == (source.parent / "decoder.onnx_data").stat().st_ino  # same file, no copy
    _assert_last_row(source, edited)


def test_exported_decoder_gives_its_last_row(tiny_bundle, tmp_path):
    bundle = tiny_bundle("w8a8", "fp32")
    info = json.loads((bundle / "bundle.json").read_text())
    source = bundle / info["graphs"]["decoder"]["file"]
    before = sha256_file(source)
    edited = write_last_token_decoder(source, tmp_path / "edited")
    assert sha256_file(source) == before
    _assert_last_row(source, edited, seq=7)


def test_build_compiles_the_edited_decoder_and_records_it(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    seen = {}

    class Capturing(RecordingCompiler):
        def __call__(self, spec, profile, timing_cache):
            model = onnx.load(str(spec.source), load_external_data=False)
            seen[spec.graph] = (spec.source, [d.dim_value or d.dim_param for d in
                                              model.graph.output[0].type.tensor_type.shape.dim])
            return super().__call__(spec, profile, timing_cache)

    out = build_engines(bundle, PROFILE, tmp_path / "e", compiler=Capturing(), environment=H100)
    source, logits_shape = seen["decoder"]
    assert source.parent != bundle and logits_shape == ["batch", 1, 16]
    assert seen["vision"][0] == bundle / "vision.onnx" and not (out / ".graphs").exists()
    assert read_engine_manifest(out)["decoder_logits"] == "last"
    import dataclasses

    seen.clear()
    build_engines(bundle, dataclasses.replace(PROFILE, decoder_logits="all"), tmp_path / "e2", compiler=Capturing(),
                  environment=H100)
    assert seen["decoder"] == (bundle / "decoder.onnx", ["batch", "seq", 16])


def test_logits_not_from_a_matmul_are_refused():
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["logits"], axis=-1)], "g",
                              [vi("x", TensorProto.FLOAT, ["b", "s", 4])], [vi("logits", TensorProto.FLOAT, ["b", "s", 4])])
    with pytest.raises(QvlmError, match="do not come from a MatMul through per-position ops only; build with "
                                        "decoder_logits: all"):
        last_token_logits(helper.make_model(graph))


def test_parity_compares_last_token_engines_on_the_last_position():
    """validate's TensorRT comparison: a [B, 1, V] candidate is held to the reference's last row."""
    from collections import OrderedDict

    from qvlm_export.validate.parity import ParityCompareFunc
    from qvlm_export.validate.thresholds import load_thresholds

    class Result(OrderedDict):
        def __init__(self, runner_name, **outputs):
            super().__init__(outputs)
            self.runner_name = runner_name

    rng = np.random.default_rng(0)
    full = rng.standard_normal((2, 5, 16)).astype(np.float32)
    compare = ParityCompareFunc("decoder", "w8a8", load_thresholds(), {("ref", "trt"): "tensorrt"})
    assert compare(Result("ref", logits=full), Result("trt", logits=full[:, -1:].copy())) == {"logits": True}
    [stats] = compare.records[("tensorrt", "logits")]
    assert stats.nonfinite == 0 and stats.cosine == pytest.approx(1.0)
    wrong = full[:, :1].copy()  # the first position is not the last one: the comparison sees it
    assert compare(Result("ref", logits=full), Result("trt", logits=wrong)) == {"logits": False}
