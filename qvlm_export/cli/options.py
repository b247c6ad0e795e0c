"""Options shared by several commands, declared once per group and composed per command.

Groups: verification (``--no-verify``), device (``--device``), output (``--out``, ``--json``),
progress (``--progress/--no-progress``). A command names the group's type in its signature;
parsing ``--no-verify`` applies it, and :func:`require_path` / :func:`writing` check inputs and
outputs and take ``OUT/.lock`` before the command calls the API, so bad input fails before any
model is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ArtifactModified, CheckFailed, QvlmError


def _set_verify(no_verify: bool) -> bool:
    """``--no-verify``: switch off hash checks on load for this command (main restores the setting)."""
    from ..manifest import set_verification

    set_verification(not no_verify)
    return no_verify


# verification (parsing the flag applies it, so no command has to remember to)
NoVerify = Annotated[bool, typer.Option(
    "--no-verify", callback=_set_verify,
    help="load artifacts without checking their files against the SHA-256 hashes in manifest.json")]
# device
Device = Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda when available)")]
# output
OutDir = Annotated[str, typer.Option("--out", help="directory to write (replaced atomically; locked while written)")]
JsonOut = Annotated[str | None, typer.Option("--json", help="also write the result as JSON to this file")]
# progress
Progress = Annotated[bool, typer.Option(help="show progress bars")]

# Kinds of input path a command names, and what --help of each says to pass.
_WANT = {"dir": "a directory", "file": "a file", "any": "a file or directory"}


def require_path(value: str | None, flag: str, kind: str = "dir", what: str = "") -> None:
    """One line, before any load, when an input path is missing, of the wrong kind, or unreadable."""
    import os

    if value is None or (flag == "--model" and value.startswith("builtin:")):  # built-in models resolve at load
        return
    path = Path(value)
    hint = f"; pass {flag} with {what or _WANT[kind]}"
    if not path.exists():
        raise QvlmError(f"{flag} {value!r} does not exist{hint}")
    if kind == "dir" and not path.is_dir():
        raise QvlmError(f"{flag} {value!r} is a file, not a directory{hint}")
    if kind == "file" and path.is_dir():
        raise QvlmError(f"{flag} {value!r} is a directory, not a file{hint}")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise QvlmError(f"{flag} {value!r} is not readable by this user; fix its permissions or copy it")


@contextlib.contextmanager
def writing(out: str | None, json_out: str | None = None, flag: str = "--out") -> Iterator[None]:
    """Check that ``out`` (a directory) and ``json_out`` (a file) can be written, then hold ``out/.lock``."""
    from ..manifest import check_output_dir, check_output_file
    from ..pipeline_resume import output_lock

    if json_out is not None:
        check_output_file(Path(json_out))
    if out is None:
        yield
        return
    check_output_dir(Path(out), flag=flag)
    with output_lock(Path(out)):
        yield


@contextlib.contextmanager
def verification_is_the_check() -> Iterator[None]:
    """For verify, check-trt and validate a modified or unmanifested artifact is a failed check: exit 1."""
    try:
        yield
    except ArtifactModified as exc:
        raise CheckFailed(str(exc)) from None
