"""Runtime: generation maths, the greedy loop over a scripted runner, ORT session modes, CLI generate/eval."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402
from _export_helpers import graph_file  # noqa: E402

from qvlm_export.cli import main  # noqa: E402
from qvlm_export.data.manifest import load_dataset  # noqa: E402
from qvlm_export.errors import QvlmError  # noqa: E402
from qvlm_export.evaluate.accuracy import evaluate  # noqa: E402
from qvlm_export.runtime.bundle import BundleInfo, GraphIO, ModelSpec  # noqa: E402
from qvlm_export.runtime.factory import answerer_for_bundle  # noqa: E402
from qvlm_export.runtime.generate import greedy_generate, merge_image_features, position_ids  # noqa: E402
from qvlm_export.runtime.ort_runner import session_options  # noqa: E402
from qvlm_export.runtime.runner import GraphSetRunner, VLMRunner  # noqa: E402

SPEC = ModelSpec(image_token_id=4, eos_token_id=3, pad_token_id=0, num_layers=1, num_kv_heads=1, head_dim=2,
                 hidden_size=4, vocab_size=8, image_seq_length=2, image_size=8)


def test_position_ids_follow_transformers_left_padding_rule():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert position_ids(mask, past=4).tolist() == [[2], [4]]


def test_merge_puts_features_on_image_tokens_in_order():
    ids = np.array([[0, 4, 4, 7], [4, 4, 5, 6]])
    embeds = np.zeros((2, 4, 3), np.float32)
    features = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    merged = merge_image_features(embeds, ids, features, image_token_id=4)
    assert merged[0, 1].tolist() == [0, 1, 2] and merged[0, 2].tolist() == [3, 4, 5]
    assert merged[1, 0].tolist() == [6, 7, 8] and merged[1, 1].tolist() == [9, 10, 11]
    assert merged[0, 0].tolist() == [0, 0, 0] and embeds.sum() == 0  # input untouched
    with pytest.raises(QvlmError, match="3 image tokens in the prompts but 4 image features"):
        merge_image_features(embeds, np.array([[0, 4, 4, 7], [4, 5, 5, 6]]), features, 4)


class ScriptedRunner:
    """A VLMRunner whose next token is scripted per row and step; it records every decoder call."""

    name = "scripted"

    def __init__(self, script: list[list[int]]):
        self.info = BundleInfo(path=Path("."), dtype="fp32", opset=21, graphs={}, model=SPEC, quant={})
        self.script = script
        self.calls: list[dict] = []

    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    def vision(self, pixel_values):
        return np.full((pixel_values.shape[0], 2, 4), 9.0, np.float32)

    def embed(self, input_ids):
        return np.repeat(input_ids[..., None].astype(np.float32), 4, axis=-1)

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        step = len(self.calls)
        self.calls.append({"embeds": inputs_embeds.copy(), "mask": attention_mask.copy(),
                           "positions": position_ids.copy(), "past": past[0].shape[2]})
        b, s = inputs_embeds.shape[:2]
        logits = np.zeros((b, s, SPEC.vocab_size), np.float32)
        for row in range(b):
            logits[row, -1, self.script[row][min(step, len(self.script[row]) - 1)]] = 1.0
        present = [np.concatenate([p, np.zeros((b, 1, s, 2), np.float32)], axis=2) for p in past]
        return logits, present


def test_greedy_loop_pads_after_eos_grows_mask_and_cache():
    runner = ScriptedRunner([[5, 3, 7, 7], [6, 6, 6, 6]])
    assert isinstance(runner, VLMRunner)
    ids = np.array([[0, 2, 4, 4, 1], [2, 4, 4, 1, 1]])
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    result = greedy_generate(runner, ids, mask, np.zeros((2, 3, 8, 8), np.float32), max_new_tokens=4)
    assert result.tokens.tolist() == [[5, 3, 0, 0], [6, 6, 6, 6]]
    assert [c["past"] for c in runner.calls] == [0, 5, 6, 7]
    assert [c["mask"].shape[1] for c in runner.calls] == [5, 6, 7, 8]
    assert runner.calls[0]["positions"].tolist() == [[1, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert runner.calls[1]["positions"].tolist() == [[4], [5]]
    assert runner.calls[0]["embeds"][0, 2].tolist() == [9.0] * 4  # image features merged before prefill
    assert runner.calls[2]["embeds"][0, 0].tolist() == [3.0] * 4  # EOS is fed once, like transformers
    assert runner.calls[3]["embeds"][0, 0].tolist() == [0.0] * 4  # then the finished row gets the pad token
    assert result.first_logits.argmax(-1).tolist() == [5, 6]


def test_greedy_loop_stops_when_every_row_hit_eos():
    runner = ScriptedRunner([[3], [3]])
    ids, mask = np.array([[4, 4, 1]] * 2), np.ones((2, 3), np.int64)
    result = greedy_generate(runner, ids, mask, np.zeros((2, 3, 8, 8), np.float32), max_new_tokens=8)
    assert result.tokens.tolist() == [[3], [3]] and len(runner.calls) == 1


def test_session_modes_and_inactive_runner_errors():
    def entry(options, key="session.disable_quant_qdq"):
        try:
            return options.get_session_config_entry(key)
        except Exception:  # ORT raises for a key that was never set
            return None

    assert entry(session_options("faithful")) == "1"
    assert entry(session_options("fast")) in (None, "", "0")
    with pytest.raises(QvlmError, match="faithful"):
        session_options("exact")
    info = BundleInfo(path=Path("."), dtype="fp32", opset=21, model=SPEC, quant={},
                      graphs={g: GraphIO(g + ".onnx", ("x",), ("y",)) for g in ("vision", "embed", "decoder")})
    runner = GraphSetRunner(graphs=None, info=info, name="idle")
    with pytest.raises(QvlmError, match="not active"):
        runner.embed(np.zeros((1, 1), np.int64))


def _fused_ops(bundle: Path, mode: str, tmp_path: Path) -> Counter:
    import onnxruntime as ort

    options = session_options(mode, threads=1)
    options.optimized_model_filepath = str(tmp_path / f"{bundle.name}-{mode}.onnx")
    ort.InferenceSession(str(graph_file(bundle, "decoder")), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize(("setting", "fused_op"), [("w8a8", "MatMulIntegerToFloat"), ("w4a16", "MatMulNBits")])
def test_fast_mode_uses_integer_kernels_faithful_does_not(setting, fused_op, tmp_path):
    bundle = H.bundle(setting)
    fast, faithful = _fused_ops(bundle, "fast", tmp_path), _fused_ops(bundle, "faithful", tmp_path)
    layers = sum(1 for name in json.loads((H.quant_state(setting) / "state.json").read_text())["layers"]
                 if name.startswith("model.language_model."))
    # ORT's fusion rules vary by version and CPU, so not an exact count: what holds is that the exported QDQ
    # layout lets fast mode fuse the decoder's quantized MatMuls into integer kernels, and faithful fuses none.
    assert 0 < fast[fused_op] <= layers and faithful[fused_op] == 0
    # the modes differ numerically only through those kernels: same graph, same feeds
    samples = load_dataset("builtin:eval:4")
    logits = {}
    for mode in ("faithful", "fast"):
        answerer, _ = answerer_for_bundle(bundle, mode=mode, threads=1)
        with answerer:
            logits[mode] = answerer.generate([s.image for s in samples], [s.question for s in samples]).first_logits
    drift = float(np.abs(logits["fast"] - logits["faithful"]).max())
    # Bounded, not required to be large: W8A8 drifts 0.004 of the logit range with VNNI and 0.015 on AVX2
    # (tools/check_isa_paths.sh, under qemu -cpu Haswell); W4A16 0.22 on both (ORT's default level 4
    # quantizes activations to int8 inside MatMulNBits, whatever the CPU).
    assert drift < 0.5 * float(np.ptp(logits["faithful"]))


def test_cli_generate_and_eval_on_a_bundle(tmp_path, capsys):
    bundle = H.bundle("w8a8")
    samples = load_dataset("builtin:eval:6")
    image = tmp_path / "q.png"
    samples[0].image.save(image)
    answerer, _ = answerer_for_bundle(bundle, threads=1, max_new_tokens=16)
    with answerer:
        expected = answerer.ask([samples[0].image], [samples[0].question])[0].strip()
        direct = evaluate(answerer, samples, progress=False)
    capsys.readouterr()
    assert main(["generate", "--bundle", str(bundle), "--image", str(image), "--question", samples[0].question]) == 0
    assert capsys.readouterr().out.strip() == expected
    out = tmp_path / "eval.json"
    assert main(["eval", "--bundle", str(bundle), "--data", "builtin:eval:6", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["overall"] == direct.overall
    assert main(["generate", "--bundle", str(bundle), "--image", str(tmp_path / "none.png"), "--question", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_int4_accuracy_level_reaches_the_fast_session_and_removes_its_drift():
    """ORT's default MatMulNBits level (4) quantizes W4A16 activations to int8 on the fly; level 1
    computes in fp32, so fast mode should then agree with faithful to float rounding."""
    fast = session_options("fast", threads=1, int4_accuracy=1)
    assert fast.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    faithful = session_options("faithful", threads=1, int4_accuracy=1)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # faithful fuses nothing
        faithful.get_session_config_entry("session.qdq_matmulnbits_accuracy_level")
    with pytest.raises(QvlmError, match="int4 accuracy level must be one of"):
        session_options("fast", int4_accuracy=7)
    bundle, samples = H.bundle("w4a16"), load_dataset("builtin:eval:4")
    logits = {}
    for key, mode, level in (("faithful", "faithful", None), ("fast", "fast", None), ("fast-fp32", "fast", 1)):
        answerer, _ = answerer_for_bundle(bundle, mode=mode, threads=1, int4_accuracy=level)
        with answerer:
            logits[key] = answerer.generate([s.image for s in samples], [s.question for s in samples]).first_logits
    drift = {k: float(np.abs(logits[k] - logits["faithful"]).max()) for k in ("fast", "fast-fp32")}
    # Level 1 computes in fp32 on every CPU: float rounding only. The default level's drift depends on the
    # CPU's int8 path (exact with VNNI), so it is bounded, not required to be large.
    assert drift["fast-fp32"] < 1e-3 * float(np.ptp(logits["faithful"])), drift
    assert drift["fast"] < 0.5 * float(np.ptp(logits["faithful"])), drift  # 0.22 measured, VNNI and AVX2
