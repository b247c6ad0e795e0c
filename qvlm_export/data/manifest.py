"""Calibration and evaluation sets: JSONL manifests and the built-in synthetic splits.

A manifest is one JSON object a line: ``{"image": "relative/path.png", "question": ...,
"answer": ...}`` with an optional ``"type"`` (question type; "all" when absent). Image
paths are relative to the manifest's directory. ``builtin:eval``, ``builtin:calib`` and
``builtin:eval:200`` (first 200) name the synthetic splits.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QvlmError
from .images import open_image
from .synthetic import Sample, make_split

REQUIRED_FIELDS = ("image", "question", "answer")


def load_dataset(spec: str | Path, limit: int | None = None) -> list[Sample]:
    """Samples from ``builtin:<split>[:n]`` or a JSONL manifest path."""
    text = str(spec)
    if text.startswith("builtin:"):
        parts = text.split(":")
        split = parts[1] if len(parts) > 1 else ""
        try:
            n = int(parts[2]) if len(parts) > 2 else None
            if n is not None and n < 1:
                raise ValueError("N must be at least 1")
            samples = make_split(split, None if split != "train" else (n or 64))
        except ValueError as exc:
            raise QvlmError(f"bad built-in data spec {text!r}: {exc}; use builtin:eval, builtin:calib or builtin:eval:N") from None
        samples = samples[:n] if n is not None else samples
    else:
        samples = read_manifest(Path(text))
    return samples[:limit] if limit is not None else samples


def read_manifest(path: Path) -> list[Sample]:
    if not path.exists():
        raise QvlmError(f"data manifest {str(path)!r} does not exist; pass a JSONL file or builtin:eval / builtin:calib")
    if path.is_dir():
        raise QvlmError(f"data manifest {str(path)!r} is a directory; pass the .jsonl file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QvlmError(f"data manifest {str(path)!r} is not UTF-8 text (byte {exc.start}); pass a JSONL file") from None
    samples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QvlmError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise QvlmError(f"{where}: each line must be a JSON object with fields {list(REQUIRED_FIELDS)}")
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise QvlmError(f"{where}: missing field {missing[0]!r} (each line needs {list(REQUIRED_FIELDS)})")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise QvlmError(f"{where}: question must be a non-empty string, got {row['question']!r}")
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], str | int | float):
            raise QvlmError(f"{where}: answer must be a string (or number), got {row['answer']!r}")
        image = open_image(path.parent / str(row["image"]), where=f"{where}: image")
        samples.append(Sample(image=image, question=str(row["question"]), answer=str(row["answer"]),
                              qtype=str(row.get("type", "all")), image_path=str(row["image"])))
    if not samples:
        raise QvlmError(f"data manifest {str(path)!r} has no samples")
    return samples


def write_manifest(samples: list[Sample], out_dir: Path, name: str = "manifest.jsonl") -> Path:
    """Write samples as PNG files plus a JSONL manifest (the user-facing data format)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        rel = f"images/{i:05d}.png"
        s.image.save(out_dir / rel, format="PNG")
        lines.append(json.dumps({"image": rel, "question": s.question, "answer": s.answer, "type": s.qtype}))
    manifest = out_dir / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
