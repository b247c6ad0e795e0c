"""``qvlm-export verify``: check artifact directories against the hashes their manifests record."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app


@app.command("verify")
def verify_command(
    dirs: Annotated[list[str], typer.Argument(help="artifact directories (quant state, bundle, engines, report, run)")],
) -> None:
    """One line per directory: 'ok KIND N files' or what changed; exit 1 if any was modified, 2 if one is not an artifact."""
    from pathlib import Path

    from ..errors import ArtifactModified, QvlmError
    from ..manifest import verify_tree

    code = 0
    for d in dirs:
        try:
            kind, count = verify_tree(Path(d))
        except ArtifactModified as exc:
            typer.echo(f"{d}: MODIFIED: {exc}")
            code = max(code, 1)
        except QvlmError as exc:
            typer.echo(f"{d}: error: {exc}", err=True)
            code = 2
        else:
            typer.echo(f"{d}: ok {kind} {count} files")
    if code:
        raise typer.Exit(code)
