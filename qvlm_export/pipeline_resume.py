"""What makes ``run`` safe to repeat into one ``--out``: a lock, stale-temp cleanup, up-to-date stages.

- One run per ``--out`` at a time: ``OUT/.lock`` is held with ``flock`` for the whole run (every stage
  command takes the same lock on its ``--out``). The
  kernel drops it when the process dies, so a SIGKILLed run never blocks the next one.
- A killed run leaves the temporary ``.<name>.*.partial`` directories of :func:`atomic_directory`
  (its cleanup never ran); under the lock nobody else can be writing them, so they are removed.
- A stage whose artifact in ``--out`` was made from the same resolved config and input hashes, and
  whose files still match its manifest, is not redone (see :func:`manifest.artifact_up_to_date`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import QvlmError
from .manifest import LOCK_FILE, artifact_up_to_date

# atomic_directory temps (out/X, out/stage/X, out/stage/setting/X) and atomic_write_text temps.
STALE_PATTERNS = (".*.partial", "*/.*.partial", "*/*/.*.partial", ".*.tmp")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[Path]:
    """Hold ``out/.lock`` exclusively for the block; a second run into ``out`` fails in one line."""
    with output_lock(out) as lock:
        yield lock


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """The lock every writer of ``--out`` takes (run, quantize, export, build, validate): ``out/.lock``.

    On release the lock file, and the directories made for it, are removed (a stage replaces
    ``out`` atomically anyway), so a refused or failed command leaves nothing behind.
    """
    out = Path(out)
    made = []
    probe = out
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    lock = out / LOCK_FILE
    fd = _acquire(lock, out)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):  # after an atomic replace it is another's
                lock.unlink()
        for path in made:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                path.rmdir()
        os.close(fd)  # releases the lock


def _acquire(lock: Path, out: Path) -> int:
    while True:
        out.mkdir(parents=True, exist_ok=True)  # (again: a releasing holder may just have removed it)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QvlmError(f"--out {str(out)!r} is in use by another qvlm-export run (pid {holder} holds {lock}); "
                            "wait for it to finish or choose another --out") from None
        with contextlib.suppress(FileNotFoundError):
            # the holder we waited for may have unlinked the file: then this lock guards nothing, retry
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temporaries an interrupted run left in ``out`` (call only while holding the lock)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in sorted(Path(out).glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def quant_state_current(model: str | None, recipe, calib: str, device: str | None, target: Path) -> bool:
    """Is ``target`` the quant state ``search.api.quantize`` would write for these arguments?"""
    import torch

    from .load.model import resolve_model_path
    from .memory import resolve_load_dtype
    from .search.api import ARTIFACT_KIND, calibration_samples, quantize_identity, resolve_device
    from .search.registry import build_method

    if not (target / "manifest.json").is_file():
        return False
    path = resolve_model_path(model)
    data_free = build_method(recipe).capabilities.data_free
    samples = None if data_free else calibration_samples(calib, recipe.calibration)
    config, inputs = quantize_identity(path, recipe, calib, samples, resolve_device(device),
                                       resolve_load_dtype("auto", path))
    return artifact_up_to_date(target, ARTIFACT_KIND, config, inputs, {"torch_threads": torch.get_num_threads()})


def bundle_current(model: str | None, quant: Path | None, export_config, target: Path) -> bool:
    """Is ``target`` the bundle ``export.api.export_bundle`` would write for these arguments?"""
    from .export.api import BUNDLE_KIND, export_identity, export_model_path

    if not (target / "manifest.json").is_file():
        return False
    config, inputs = export_identity(export_model_path(model, quant), quant, export_config)
    return artifact_up_to_date(target, BUNDLE_KIND, config, inputs)
