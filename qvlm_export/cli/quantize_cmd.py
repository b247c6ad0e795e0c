"""``qvlm-export quantize``: calibrate a model with a recipe and write a quant-state directory."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app


@app.command("quantize")
def quantize_command(
    recipe: Annotated[str, typer.Option(help="recipe name (e.g. awq-w4a16, see calibration/recipes/) or YAML path")],
    out: Annotated[str, typer.Option(help="quant-state directory to write (replaced atomically)")],
    model: Annotated[str | None, typer.Option(help="Hugging Face LLaVA-family directory (default: embedded model)")] = None,
    calib: Annotated[str, typer.Option(help="calibration data: builtin:calib, builtin:calib:N or a JSONL manifest")] = "builtin:calib",
    device: Annotated[str | None, typer.Option(help="cuda | cpu (default: cuda when available)")] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="resume/checkpoint directory for long searches")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar per block")] = True,
    dtype: Annotated[str, typer.Option(help="load/calibration dtype: auto (the checkpoint's) | fp32 | fp16 | bf16")] = "auto",
) -> None:
    """Quantize with RTN, SmoothQuant, AWQ, GPTQ, Q-VLM, QIG, Q-ViT or Q-VLM+QIG+Q-ViT; evaluate the result with 'eval --quant'."""
    import json
    from pathlib import Path

    from ..search.api import quantize

    path = quantize(model=model, recipe=recipe, calib=calib, out=out, device=device, progress=progress,
                    checkpoint_dir=checkpoint_dir, dtype=dtype)
    meta = json.loads((Path(path) / "state.json").read_text())
    seconds = json.loads((Path(path) / "manifest.json").read_text()).get("search_seconds", 0)
    kind = "deployable" if meta["deployable"] else "simulated only"
    typer.echo(f"wrote {path}: {meta['method']} {meta['setting']} ({kind}), {len(meta['layers'])} quantized Linears, "
               f"search {seconds:.1f} s")
