"""``qvlm-export export`` (QDQ ONNX bundle) and ``qvlm-export generate`` (answer one question on a bundle)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import NoVerify, OutDir, require_path, writing


@app.command("export")
def export_command(
    out: OutDir,
    model: Annotated[str | None, typer.Option(help="Hugging Face LLaVA-family directory (default: the model the "
                                                   "quant state records, else the embedded model)")] = None,
    quant: Annotated[str | None, typer.Option(help="quant-state directory (default: the FP reference bundle)")] = None,
    dtype: Annotated[str, typer.Option(help="graph float type: fp32 | fp16 (fp16 for TensorRT) | auto (fp16 for "
                                            "fp16/bf16 checkpoints, loaded without an fp32 copy)")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 21)")] = 21,
    ragged_int4: Annotated[str, typer.Option(
        help="int4 layers whose K is not a multiple of the group (TensorRT cannot parse them): float | int8 | "
             "int4 (ONNX Runtime only)")] = "float",
    external_data_bytes: Annotated[int, typer.Option(
        min=0, help="graphs with more weight bytes than this store them as ONNX external data")] = 1_000_000_000,
    no_verify: NoVerify = False,
) -> None:
    """Export vision, embed and decoder graphs with Q/DQ from a quant state, plus bundle.json and the processor."""
    import json
    from pathlib import Path

    from ..export.api import export_bundle
    from ..export.config import ExportConfig

    require_path(model, "--model", what="a Hugging Face model directory")
    require_path(quant, "--quant", what="a quant-state directory written by `qvlm-export quantize`")
    config = ExportConfig(opset=opset, ragged_int4=ragged_int4, external_data_bytes=external_data_bytes)
    with writing(out):
        path = export_bundle(model=model, quant=quant, out=out, dtype=dtype, config=config,
                             log=lambda line: typer.echo(line, err=True))
    bundle = json.loads((Path(path) / "bundle.json").read_text())
    sizes = ", ".join(f"{g} {d['weight_bytes']['total'] / 1e6:.2f} MB" for g, d in sorted(bundle["graphs"].items()))
    typer.echo(f"wrote {path}: setting {bundle['quant']['setting']}, {bundle['dtype']}, opset {bundle['opset']} "
               f"({sizes})")


@app.command("generate")
def generate_command(
    bundle: Annotated[str, typer.Option(help="ONNX bundle directory written by `qvlm-export export`")],
    image: Annotated[str, typer.Option(help="image file (PNG, JPEG)")],
    question: Annotated[str, typer.Option(help="the question to ask about the image")],
    mode: Annotated[str, typer.Option(help="ONNX Runtime session mode: faithful | fast")] = "faithful",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    no_verify: NoVerify = False,
) -> None:
    """Answer one question about one image greedily on ONNX Runtime and print the answer."""
    from pathlib import Path

    from ..data.images import open_image
    from ..runtime.factory import answerer_for_bundle

    require_path(bundle, "--bundle", what="an ONNX bundle directory written by `qvlm-export export`")
    require_path(image, "--image", kind="file", what="a PNG or JPEG file")
    picture = open_image(image)
    answerer, _ = answerer_for_bundle(Path(bundle), mode=mode, max_new_tokens=max_new_tokens)
    with answerer:
        typer.echo(answerer.ask([picture], [question])[0].strip())
