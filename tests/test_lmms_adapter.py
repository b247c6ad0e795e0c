"""The lmms-eval adapter answers as ``qvlm-export eval`` does, and its log-likelihoods are the runtime's.

The adapter's work (:class:`qvlm_export.evaluate.lmms.BundleLMM`) needs no lmms-eval and runs
everywhere. The tests marked ``lmms`` drive the real harness (``pip install -e ".[lmms]"``):
its model registry finds ``qvlm_export`` through the entry point, and ``lmms-eval`` on an offline
task over our JSONL data prints the accuracy ``qvlm-export eval`` prints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _export_helpers as H  # noqa: E402

N = 40


@pytest.fixture(scope="module")
def samples():
    from qvlm_export.data.manifest import load_dataset

    return load_dataset(f"builtin:eval:{N}")


@pytest.fixture(scope="module")
def core():
    from qvlm_export.evaluate.lmms import BundleLMM

    lmm = BundleLMM(bundle=str(H.bundle("w8a8")), threads=1)
    yield lmm
    lmm.close()


def test_generate_until_scores_what_qvlm_export_eval_scores(core, samples):
    from qvlm_export.evaluate.accuracy import evaluate, score
    from qvlm_export.evaluate.backends import make_answerer

    answerer, _ = make_answerer(bundle=str(H.bundle("w8a8")))
    with answerer:
        expected = evaluate(answerer, samples, batch_size=32, progress=False)
    ours = []
    for start in range(0, N, 32):  # the batches eval uses: the same left padding, the same numbers
        batch = samples[start:start + 32]
        ours += core.generate([s.image for s in batch], [s.question for s in batch], until=["\n\n"])
    assert ours == expected.predictions
    assert score(samples, ours).overall == expected.overall > 0.8


def test_loglikelihood_is_the_runtimes_next_token_distribution(core, samples):
    """One-token answers: log p(answer) is the first step's log-softmax; is_greedy is argmax == answer."""
    from qvlm_export.runtime.generate import greedy_generate

    tokenizer = core.processor.tokenizer
    checked = 0
    for s in samples[:12]:
        answer_ids = tokenizer(" " + s.answer, add_special_tokens=False)["input_ids"]
        if len(answer_ids) != 1:
            continue
        logp, greedy = core.loglikelihood(s.image, s.question, " " + s.answer)
        first = greedy_generate(core.answerer.runner, **core.answerer.inputs([s.image], [s.question]),
                                max_new_tokens=1).first_logits[0].astype(np.float64)
        expected = first[answer_ids[0]] - first.max() - np.log(np.exp(first - first.max()).sum())
        assert logp == pytest.approx(expected, abs=1e-4)
        assert greedy == (int(first.argmax()) == answer_ids[0])
        checked += 1
    assert checked >= 8
    two = core.loglikelihood(samples[0].image, "how many objects are there ?", " two circles")
    assert two[0] < 0  # several tokens: a sum of log-probabilities


def test_lmms_task_is_written_for_a_manifest(tmp_path):
    from qvlm_export.cli import main

    assert main(["data", "--split", "eval", "--n", "3", "--out", str(tmp_path / "d")]) == 0
    assert main(["lmms-task", "--data", str(tmp_path / "d" / "manifest.jsonl"), "--out", str(tmp_path / "t")]) == 0
    text = (tmp_path / "t" / "qvlm_vqa.yaml").read_text()
    assert "dataset_path: json" in text and json.dumps(str((tmp_path / "d" / "manifest.jsonl").resolve())) in text
    assert main(["lmms-task", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "t")]) == 2




def _require_lmms_eval():
    pytest.importorskip("lmms_eval", reason='lmms-eval is not installed (pip install -e ".[lmms]")')


def test_lmms_eval_registry_finds_the_model_class_and_it_answers_both_request_types(core, samples):
    _require_lmms_eval()
    from types import SimpleNamespace

    from lmms_eval.models import get_model

    cls = get_model("qvlm_export")
    assert cls.__name__ == "QvlmExportLMM"
    lmm = cls.create_from_arg_string(f"bundle={H.bundle('w8a8')},threads=1", {"batch_size": 4, "device": None})
    docs = [{"image": s.image, "question": s.question, "answer": s.answer} for s in samples[:6]]
    lmm.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    gen = [SimpleNamespace(args=(d["question"], {"max_new_tokens": 8, "until": ["\n\n"]}, visual, i, "t", "test"))
           for i, d in enumerate(docs)]
    assert lmm.generate_until(gen) == core.generate([d["image"] for d in docs], [d["question"] for d in docs])
    ll = [SimpleNamespace(args=(d["question"], " " + d["answer"], visual, i, "t", "test")) for i, d in enumerate(docs)]
    assert lmm.loglikelihood(ll) == [core.loglikelihood(d["image"], d["question"], " " + d["answer"]) for d in docs]


def test_lmms_eval_cli_accuracy_equals_qvlm_export_eval(tmp_path, samples):
    _require_lmms_eval()
    from qvlm_export.cli import main
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.backends import make_answerer

    assert main(["data", "--split", "eval", "--n", str(N), "--out", str(tmp_path / "d")]) == 0
    manifest = tmp_path / "d" / "manifest.jsonl"
    assert main(["lmms-task", "--data", str(manifest), "--out", str(tmp_path / "tasks")]) == 0
    bundle = H.bundle("w8a8")
    exe = shutil.which("lmms-eval") or str(Path(sys.executable).parent / "lmms-eval")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    done = subprocess.run([exe, "--model", "qvlm_export", "--model_args", f"bundle={bundle},threads=1",
                           "--include_path", str(tmp_path / "tasks"), "--tasks", "qvlm_vqa", "--batch_size", "32",
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*results*.json")).read_text())
    accuracy = results["results"]["qvlm_vqa"]["exact_match,none"]
    answerer, _ = make_answerer(bundle=str(bundle))
    with answerer:
        expected = evaluate(answerer, samples, batch_size=32, progress=False)
    print(f"\nlmms-eval qvlm_vqa exact_match {accuracy:.4f}; qvlm-export eval {expected.overall:.4f} (n={N})")
    assert accuracy == pytest.approx(expected.overall, abs=1e-12)
