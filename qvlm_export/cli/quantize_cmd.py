"""``qvlm-export quantize``: calibrate a model with a recipe and write a quant-state directory."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import Device, OutDir, Progress, writing


@app.command("quantize")
def quantize_command(
    recipe: Annotated[str, typer.Option(help="recipe name (e.g. awq-w4a16, see calibration/recipes/) or YAML path")],
    out: OutDir,
    model: Annotated[str | None, typer.Option(help="Hugging Face LLaVA-family directory (default: embedded model)")] = None,
    calib: Annotated[str, typer.Option(help="calibration data: builtin:calib, builtin:calib:N or a JSONL manifest")] = "builtin:calib",
    device: Device = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="resume/checkpoint directory for long searches")] = None,
    progress: Progress = True,
    dtype: Annotated[str, typer.Option(help="load/calibration dtype: auto (the checkpoint's) | fp32 | fp16 | bf16")] = "auto",
) -> None:
    """Quantize with RTN, SmoothQuant, AWQ, GPTQ, Q-VLM, QIG, Q-ViT or Q-VLM+QIG+Q-ViT; evaluate the result with 'eval --quant'."""
    import json
    from pathlib import Path

    from ..manifest import check_output_dir
    from ..quant import distributed
    from ..search.api import quantize

    # (the recipe, its method_args and --model are checked by quantize() itself, before the load)
    if checkpoint_dir is not None:
        check_output_dir(Path(checkpoint_dir), flag="--checkpoint-dir")
    primary = distributed.is_primary()  # under torchrun rank 0 alone locks and writes --out
    with writing(out if primary else None):
        path = quantize(model=model, recipe=recipe, calib=calib, out=out, device=device, progress=progress,
                        checkpoint_dir=checkpoint_dir, dtype=dtype,
                        log=None if progress else (lambda line: typer.echo(line, err=True)))
    if not primary:
        return
    meta = json.loads((Path(path) / "state.json").read_text())
    seconds = json.loads((Path(path) / "manifest.json").read_text()).get("search_seconds", 0)
    kind = "deployable" if meta["deployable"] else "simulated only"
    typer.echo(f"wrote {path}: {meta['method']} {meta['setting']} ({kind}), {len(meta['layers'])} quantized Linears, "
               f"search {seconds:.1f} s")
