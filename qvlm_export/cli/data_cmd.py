"""``qvlm-export data``: write a built-in split as PNG files plus a JSONL manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app
from .options import OutDir, require_path, writing


@app.command("data")
def data_command(
    out: OutDir,
    split: Annotated[str, typer.Option(help="calib | eval | train")] = "eval",
    n: Annotated[int | None, typer.Option(min=1, help="number of samples (required for train)")] = None,
) -> None:
    """Materialise the synthetic shapes-VQA split in the user-facing manifest format."""
    from ..data.manifest import load_dataset, write_manifest
    from ..manifest import atomic_directory

    spec = f"builtin:{split}" + (f":{n}" if n else "")
    samples = load_dataset(spec)
    with writing(out):
        with atomic_directory(Path(out)) as tmp:
            write_manifest(samples, tmp)
    typer.echo(f"wrote {len(samples)} samples to {Path(out) / 'manifest.jsonl'}")


@app.command("lmms-task")
def lmms_task_command(
    data: Annotated[str, typer.Option(help="JSONL manifest (qvlm-export data writes one)")],
    out: Annotated[str, typer.Option(help="directory for the task YAML and its utils module")],
    name: Annotated[str, typer.Option(help="task name for lmms-eval --tasks")] = "qvlm_vqa",
) -> None:
    """Write an lmms-eval task over a JSONL manifest (run it with lmms-eval --include_path OUT --tasks NAME)."""
    from ..evaluate.lmms_task import write_task
    from ..manifest import check_output_dir

    require_path(data, "--data", kind="file", what="a JSONL manifest (qvlm-export data writes one)")
    check_output_dir(Path(out))
    path = write_task(Path(data), Path(out), name)
    typer.echo(f"wrote {path}: lmms-eval --model qvlm_export --model_args bundle=B --include_path {out} "
               f"--tasks {name}")
