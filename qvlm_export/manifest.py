"""Artifact manifests and atomic writes shared by every stage.

Every artifact directory (quant state, ONNX bundle, engines, report) carries a
``manifest.json`` with the tool and library versions, the stage's resolved config,
and SHA-256 hashes of its inputs and outputs. Artifacts are written into a temporary
sibling directory and renamed into place, so a failed stage never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import QvlmError

TRACKED_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "numpy", "safetensors", "tensorrt")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (a file hashes alone), keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p)
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def digest(hashes: dict[str, str]) -> str:
    """One hash for a set of file hashes (stable under ordering)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def build_manifest(kind: str, config: dict[str, Any], inputs: dict[str, str], out_dir: Path,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an artifact directory whose files are already written."""
    return {
        "kind": kind,
        "tool": {"name": "qvlm-export", "version": __version__},
        "libraries": library_versions(),
        "config": config,
        "inputs": inputs,
        "outputs": hash_tree(out_dir),
        **(extra or {}),
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(artifact_dir: Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(artifact_dir) / "manifest.json"
    if not path.is_file():
        raise QvlmError(f"{str(artifact_dir)!r} has no manifest.json; it is not a qvlm-export artifact directory")
    manifest = json.loads(path.read_text())
    if kind is not None and manifest.get("kind") != kind:
        raise QvlmError(f"{str(artifact_dir)!r} is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return manifest


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QvlmError(f"output path {str(out_dir)!r} exists and is a file; choose a directory path")
    if out_dir.exists() and not overwrite:
        raise QvlmError(f"output directory {str(out_dir)!r} exists; remove it or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
