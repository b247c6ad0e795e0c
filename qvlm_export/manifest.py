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
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ArtifactModified, QvlmError

# Held (flock) by the writer of an output directory; never part of an artifact's files.
LOCK_FILE = ".lock"
TRACKED_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "polygraphy", "numpy", "safetensors", "tensorrt")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# (resolved path, size, mtime_ns, inode) -> sha256: a 14 GB bundle is hashed once per process.
_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
# Like git's "racily clean" entries: a file modified this recently may change again within the
# filesystem's timestamp granularity without its mtime moving, so it is not cached.
_RACY_SECONDS = 2.0


def _sha256_uncached(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 of one file, cached per process by path, size, mtime and inode."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _HASH_CACHE.get(key)
    if cached is not None:
        return cached
    value = _sha256_uncached(Path(path))
    if st.st_mtime_ns < (time.time() - _RACY_SECONDS) * 1e9:
        _HASH_CACHE[key] = value
    return value


def hash_tree(path: Path, hash_files: bool = True) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (a file hashes alone), keyed by relative path.

    ``hash_files=False`` lists the same keys with empty values (which files, not their bytes).
    """
    path = Path(path)
    one = sha256_file if hash_files else (lambda _: "")
    if path.is_file():
        return {path.name: one(path)}
    return {str(p.relative_to(path)): one(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and p.relative_to(path) != Path(LOCK_FILE)}


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
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QvlmError(f"{path} is not valid JSON; the artifact is damaged, re-create it") from None
    if not isinstance(manifest, dict):
        raise QvlmError(f"{path} is not a manifest (not a JSON object); the artifact is damaged, re-create it")
    if kind is not None and manifest.get("kind") != kind:
        raise QvlmError(f"{str(artifact_dir)!r} is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    return manifest


# What each artifact kind is called in messages, the stage that writes it, and how to redo it.
_KINDS = {
    "quant-state": ("quant state", "quantize", "re-quantize it"),
    "onnx-bundle": ("bundle", "export", "re-export it"),
    "engines": ("engine directory", "build", "rebuild it"),
    "validation-report": ("report", "validate", "re-run validate"),
    "run": ("run", "run", "re-run it"),
}
# Kinds whose ``outputs`` list only some files (the run directory lists its artifacts' manifests).
PARTIAL_KINDS = frozenset({"run"})
_verify_default = True


def verification_enabled() -> bool:
    """Whether loads verify manifest hashes when their ``verify`` argument is None (default True)."""
    return _verify_default


def set_verification(enabled: bool) -> None:
    """Process-wide default for hash verification on load (``--no-verify`` sets it to False)."""
    global _verify_default
    _verify_default = bool(enabled)


def should_verify(verify: bool | None) -> bool:
    """``verify`` itself, or the process-wide setting when it is None."""
    return verification_enabled() if verify is None else bool(verify)


@contextlib.contextmanager
def verification(enabled: bool) -> Iterator[None]:
    """``with verification(False): ...``: skip hash checks inside the block, restore after."""
    previous = _verify_default
    set_verification(enabled)
    try:
        yield
    finally:
        set_verification(previous)


def _describe(manifest: dict[str, Any], artifact_dir: Path) -> tuple[str, str, str]:
    noun, stage, redo = _KINDS.get(str(manifest.get("kind")), ("artifact", "writing", "re-create it"))
    return f"{noun} {str(artifact_dir)!r}", stage, redo


def manifest_mismatch(artifact_dir: Path, manifest: dict[str, Any]) -> str | None:
    """The first difference between the files of ``artifact_dir`` and its manifest's ``outputs`` (None: all match)."""
    artifact_dir = Path(artifact_dir)
    where, stage, redo = _describe(manifest, artifact_dir)
    recorded = manifest.get("outputs")
    if not isinstance(recorded, dict) or not recorded:
        return f"{where}: manifest.json records no output hashes; {redo} or pass --no-verify"
    fix = f"{redo} or pass --no-verify"
    for rel in sorted(recorded):
        path = artifact_dir / rel
        if not path.is_file():
            return f"{where}: {rel} is missing (manifest.json lists it); {fix}"
        if sha256_file(path) != recorded[rel]:
            return f"{where}: {rel} was modified after {stage} (sha256 differs from manifest.json); {fix}"
    if manifest.get("kind") not in PARTIAL_KINDS:
        extra = sorted(set(hash_tree(artifact_dir, hash_files=False)) - set(recorded))
        if extra:
            return f"{where}: {extra[0]} was added after {stage} (not in manifest.json); remove it, {fix}"
    return None


def verify_artifact(artifact_dir: Path, kind: str | None = None, verify: bool | None = None) -> dict[str, Any]:
    """Read ``artifact_dir``'s manifest and check every file against its recorded SHA-256.

    ``verify`` None follows the process-wide setting (:func:`set_verification`); False only
    reads the manifest. Raises a one-line :class:`QvlmError` naming the changed, missing or
    added file. Hashes are cached per process, so repeated loads cost a ``stat`` per file.
    """
    if should_verify(verify) and not (Path(artifact_dir) / "manifest.json").is_file():
        # a deleted manifest must not switch verification off: it fails like a modified file
        raise ArtifactModified(f"{str(Path(artifact_dir) / 'manifest.json')!r} is missing, so the files of "
                               f"{str(artifact_dir)!r} cannot be checked; re-create the artifact with qvlm-export, "
                               "or pass --no-verify to use it unchecked")
    manifest = read_manifest(artifact_dir, kind)
    if should_verify(verify):
        problem = manifest_mismatch(Path(artifact_dir), manifest)
        if problem is not None:
            raise ArtifactModified(problem)
    return manifest


def verify_directory(path: Path) -> None:
    """Before a check reads ``path``: a directory is verified against its manifest.json, which must exist.

    Files and missing paths are left to the caller; ``--no-verify`` (the process-wide setting) skips it.
    """
    if verification_enabled() and Path(path).is_dir():
        verify_artifact(Path(path), verify=True)


def verify_tree(artifact_dir: Path) -> tuple[str, int]:
    """Verify an artifact directory and, for a run directory, every artifact it lists: (kind, files checked)."""
    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir, verify=True)
    count = len(manifest["outputs"])
    if manifest.get("kind") in PARTIAL_KINDS:
        for rel in sorted(manifest["outputs"]):
            if Path(rel).name == "manifest.json":
                count += verify_tree(artifact_dir / Path(rel).parent)[1]
    return str(manifest.get("kind")), count


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from manifest.json (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def artifact_up_to_date(artifact_dir: Path, kind: str, config: dict[str, Any], inputs: dict[str, str],
                        extra: dict[str, Any] | None = None) -> bool:
    """True when ``artifact_dir`` is an intact ``kind`` artifact this tool version made from exactly
    ``config`` and ``inputs`` (and the ``extra`` manifest fields): redoing it would give the same files."""
    artifact_dir = Path(artifact_dir)
    if not (artifact_dir / "manifest.json").is_file():
        return False
    try:
        manifest = read_manifest(artifact_dir, kind)
    except QvlmError:
        return False
    expected = {"config": config, "inputs": inputs, **(extra or {})}
    if manifest.get("tool", {}).get("version") != __version__:
        return False
    if any(manifest.get(key) != _as_json(value) for key, value in expected.items()):
        return False
    return manifest_mismatch(artifact_dir, manifest) is None


def refresh_manifest_outputs(artifact_dir: Path) -> dict[str, Any]:
    """Re-hash ``artifact_dir`` into its manifest's ``outputs`` after a deliberate edit (e.g. fault injection).

    Everything else in the manifest (config, inputs, versions) is kept. Returns the new manifest.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if manifest.get("kind") in PARTIAL_KINDS:
        manifest["outputs"] = {rel: sha256_file(artifact_dir / rel) for rel in manifest.get("outputs", {})
                               if (artifact_dir / rel).is_file()}
    else:
        manifest["outputs"] = hash_tree(artifact_dir)
    write_manifest(artifact_dir, manifest)
    return manifest


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(directory: bool) -> int:
    """What ``open``/``mkdir`` would give under the umask (0644/0755 under 022): mkstemp/mkdtemp give 0600/0700,
    which a later pipeline stage running as another user cannot read."""
    return (0o777 if directory else 0o666) & ~current_umask()


def follow_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask allows (0755/0644 under 022).

    Writers that go through a temporary file (mkstemp, safetensors' own atomic save) create
    0600 files, which a later pipeline stage running as another user cannot read.
    """
    directory, file = public_mode(directory=True), public_mode(directory=False)
    os.chmod(root, directory)
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), directory)
        for name in files:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                os.chmod(path, directory if os.stat(path).st_mode & 0o100 else file)  # keeps executables


def check_output_file(path: Path, flag: str = "--json") -> None:
    """Refuse, before any work, a file output that is a directory or whose directory cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise QvlmError(f"{flag} {str(path)!r} is a directory; pass a file path such as {str(path / 'out.json')!r}")
    _check_writable_ancestor(path, flag)


def check_output_dir(out: Path, flag: str = "--out") -> None:
    """Refuse, before any model is loaded, an output directory that cannot be created or replaced.

    The nearest existing ancestor must be a writable directory (``out`` itself is replaced through a
    sibling temporary, so its parent is what must be writable); a file on the way is named.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QvlmError(f"{flag} {str(out)!r} is a file, not a directory; choose a directory path")
    _check_writable_ancestor(out, flag)


def _check_writable_ancestor(path: Path, flag: str) -> None:
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise QvlmError(f"{flag} {str(path)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
                        "choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QvlmError(f"{flag} {str(path)!r} cannot be written: no write permission on {str(probe)!r}; "
                        "choose a directory you can write or fix its permissions")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise QvlmError(f"{str(path)!r} is a directory; pass a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, public_mode(directory=False))
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        follow_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
