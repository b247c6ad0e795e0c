"""``qvlm-export verify``: check artifact directories against the hashes their manifests record."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app


@app.command("verify")
def verify_command(
    dirs: Annotated[list[str], typer.Argument(help="artifact directories (quant state, bundle, engines, report, run)")],
) -> None:
    """One line per directory: 'ok KIND N files' or what failed; exit 1 modified or no manifest, 2 not a directory."""
    from pathlib import Path

    from ..errors import ArtifactModified, CheckFailed, QvlmError
    from ..manifest import verify_tree

    code, first = 0, ""
    for d in dirs:
        try:
            if not Path(d).is_dir():
                raise QvlmError(f"{d!r} {'is not a directory' if Path(d).exists() else 'does not exist'}; pass "
                                "artifact directories written by qvlm-export")
            kind, count = verify_tree(Path(d))
        except ArtifactModified as exc:
            typer.echo(f"{d}: FAILED: {exc}")
            code, first = max(code, 1), first or str(exc)
        except QvlmError as exc:
            typer.echo(f"{d}: {exc}")
            code, first = 2, str(exc) if code < 2 else first
        else:
            typer.echo(f"{d}: ok {kind} {count} files")
    if code:  # the stderr line: the (first) worst problem; stdout has one line per directory
        raise (QvlmError if code == 2 else CheckFailed)(first)
