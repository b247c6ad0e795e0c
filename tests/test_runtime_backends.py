"""One runner interface: the PyTorch model (FP and simulated-quantized), ONNX Runtime and Polygraphy adapters."""

from __future__ import annotations

import numpy as np
import pytest

from qvlm_export.data.manifest import load_dataset
from qvlm_export.errors import QvlmError
from qvlm_export.load.model import load_vlm
from qvlm_export.quant.simulate import load_simulated
from qvlm_export.runtime.bundle import read_bundle
from qvlm_export.runtime.generate import RunnerAnswerer
from qvlm_export.runtime.ort_runner import OrtGraphSet, ort_runner
from qvlm_export.runtime.runner import GraphSetRunner, VLMRunner
from qvlm_export.runtime.torch_runner import torch_runner


def _samples(n: int = 4):
    return load_dataset(f"builtin:eval:{n}")


def _generate(runner, samples):
    with RunnerAnswerer(runner, max_new_tokens=4) as answerer:
        return answerer.generate([s.image for s in samples], [s.question for s in samples])


@pytest.mark.parametrize("setting", ["fp", "w8a8"])
def test_torch_and_ort_runners_are_interchangeable(tiny_bundle, setting):
    """The simulated model and its faithful-ORT export, driven by the same greedy loop, agree."""
    bundle = tiny_bundle(setting)
    root = bundle.parent
    vlm = load_vlm(root / "model") if setting == "fp" else load_simulated(root / f"quant-{setting}")[0]
    samples = _samples()
    torch_side = torch_runner(vlm)
    assert isinstance(torch_side, VLMRunner)
    assert torch_side.info.past_names() == read_bundle(bundle).past_names()
    ours, theirs = _generate(torch_side, samples), _generate(ort_runner(bundle), samples)
    assert ours.first_logits.shape == theirs.first_logits.shape
    np.testing.assert_allclose(ours.first_logits, theirs.first_logits, atol=2e-4, rtol=1e-4)
    assert ours.tokens.tolist() == theirs.tokens.tolist()


def test_torch_runner_matches_hf_generate(tiny_model_dir):
    """Greedy decoding through the runner interface gives the tokens HF ``generate`` gives (TorchAnswerer)."""
    from qvlm_export.evaluate.torch_answerer import TorchAnswerer

    vlm = load_vlm(tiny_model_dir)
    samples = _samples(3)
    with RunnerAnswerer(torch_runner(vlm), max_new_tokens=5) as answerer:
        ours = answerer.answer(samples)
    assert ours == TorchAnswerer(vlm, max_new_tokens=5).answer(samples)


def test_torch_graph_set_names_a_missing_input_and_needs_activation(tiny_model_dir):
    runner = torch_runner(load_vlm(tiny_model_dir))
    with pytest.raises(QvlmError, match="not active"):
        runner.graphs.run("embed", {"input_ids": np.zeros((1, 2), np.int64)})
    with runner, pytest.raises(QvlmError, match="needs input 'input_ids'"):
        runner.graphs.run("embed", {})


def test_graph_runner_runs_one_graph_of_any_graph_set(tiny_bundle):
    """The Polygraphy adapter (validate's TensorRT candidate) over an ORT graph set gives the session's outputs."""
    from polygraphy.common import TensorMetadata

    from qvlm_export.runtime.graph_runner import GraphRunner

    info = read_bundle(tiny_bundle("fp"))
    ids = np.array([[1, 5, 7]], np.int64)
    meta = TensorMetadata().add("input_ids", dtype=np.int64, shape=[None, None])
    runner = GraphRunner(OrtGraphSet(info), "embed", lambda graphs: meta, owned=True, name="ort-embed")
    with runner:
        out = runner.infer({"input_ids": ids})
    with GraphSetRunner(OrtGraphSet(info), info, "ort") as direct:
        expected = direct.embed(ids)
    assert runner.name == "ort-embed" and list(out) == ["inputs_embeds"]
    np.testing.assert_array_equal(out["inputs_embeds"], expected)
