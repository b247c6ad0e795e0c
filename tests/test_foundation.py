"""Issue 2: data determinism, the shipped model, its accuracy, and bad-input handling."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from qvlm_export.cli import main
from qvlm_export.data.manifest import load_dataset, write_manifest
from qvlm_export.data.synthetic import QUESTION_TYPES, make_split


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s.image).tobytes())
        h.update(f"{s.question}|{s.answer}|{s.qtype}".encode())
    return h.hexdigest()


def test_splits_are_deterministic_and_distinct():
    assert _digest(make_split("calib")) == _digest(make_split("calib"))
    assert _digest(make_split("eval")[:50]) != _digest(make_split("calib")[:50])
    assert len(make_split("calib")) == 64 and len(make_split("eval")) == 500


def test_eval_split_is_balanced_over_five_question_types():
    samples = make_split("eval")
    counts = {t: sum(s.qtype == t for s in samples) for t in QUESTION_TYPES}
    assert len(QUESTION_TYPES) >= 5 and set(counts.values()) == {100}
    presence = [s.answer for s in samples if s.qtype == "presence"]
    assert 0.4 <= presence.count("yes") / len(presence) <= 0.6


def test_manifest_round_trip_is_exact(tmp_path):
    samples = make_split("calib")[:10]
    manifest = write_manifest(samples, tmp_path)
    loaded = load_dataset(str(manifest))
    assert _digest(loaded) == _digest(samples)


def test_shipped_model_loads_with_plain_transformers(embedded_model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(embedded_model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(embedded_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 5_000_000
    size = sum(p.stat().st_size for p in embedded_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many objects are there ?"}]}],
        add_generation_prompt=True)
    assert prompt.startswith("USER: <image>") and prompt.endswith("ASSISTANT:")


def test_embedded_model_accuracy_meets_thresholds(tmp_path, embedded_model_dir):
    out = tmp_path / "acc.json"
    assert main(["eval", "--data", "builtin:eval:200", "--json", str(out), "--batch-size", "50"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 200
    assert result["overall"] >= 0.90, result
    assert min(result["by_type"].values()) >= 0.80, result


@pytest.mark.parametrize("case", ["missing_path", "not_llava", "is_file"])
def test_bad_model_path_is_one_line_error(tmp_path, capsys, case):
    path = tmp_path / "m"
    if case == "not_llava":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif case == "is_file":
        path.write_text("x")
    code = main(["eval", "--model", str(path), "--limit", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err
    assert {"missing_path": "does not exist", "not_llava": "not a LLaVA-family", "is_file": "is a file"}[case] in err


@pytest.mark.parametrize("case", ["missing_field", "bad_image", "missing_image", "bad_json"])
def test_bad_manifest_is_one_line_error(tmp_path, capsys, case):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    row = {"image": "bad.png" if case == "bad_image" else "nope.png", "question": "q ?", "answer": "a"}
    if case == "missing_field":
        del row["answer"]
    text = "{not json" if case == "bad_json" else json.dumps(row)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text + "\n")
    code = main(["eval", "--data", str(manifest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "m.jsonl:1" in err
    expected = {"missing_field": "missing field 'answer'", "bad_image": "unreadable",
                "missing_image": "does not exist", "bad_json": "not valid JSON"}[case]
    assert expected in err
