"""``qvlm-export validate``: per-graph Polygraphy parity and task parity of a bundle against the FP reference."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import NoVerify, OutDir, require_path, verification_is_the_check, writing


@app.command("validate")
def validate_command(
    reference: Annotated[str, typer.Option(help="FP ONNX bundle, or a Hugging Face model directory (exported to FP here)")],
    candidate: Annotated[str, typer.Option(help="quantized ONNX bundle written by `qvlm-export export --quant`")],
    out: OutDir,
    engines: Annotated[str | None, typer.Option(help="TensorRT engine directory of the candidate (`qvlm-export build`)")] = None,
    quant: Annotated[str | None, typer.Option(help="the candidate's quant state: adds per-layer error and Q-VLM plots")] = None,
    thresholds: Annotated[str | None, typer.Option(help="thresholds YAML (default: the packaged file for the embedded model, bounds derived from round-to-nearest on the same model for any other)")] = None,
    calib: Annotated[str, typer.Option(help="calibration data for graph parity")] = "builtin:calib",
    calib_samples: Annotated[int, typer.Option(min=1, help="calibration samples fed to the graphs")] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    decode_steps: Annotated[int, typer.Option(min=0, help="decoder decode-step feeds after each prefill")] = 1,
    data: Annotated[str, typer.Option(help="eval data for task parity")] = "builtin:eval",
    eval_samples: Annotated[int | None, typer.Option(min=1, help="eval samples (default 100; 0 is not allowed)")] = 100,
    runners: Annotated[str, typer.Option(help="ONNX Runtime modes to compare, comma separated: faithful,fast")] = "faithful,fast",
    task: Annotated[bool, typer.Option(help="run task-level parity (greedy answers on the eval set)")] = True,
    layer_errors: Annotated[bool, typer.Option(help="measure per-layer hidden-state error when --quant is given")] = True,
    text: Annotated[bool, typer.Option(help="perplexity ratio and next-token agreement on English text (real-LM models)")] = True,
    text_tokens: Annotated[int, typer.Option(min=2, help="tokens of English text scored")] = 3072,
    text_window: Annotated[int, typer.Option(min=2, help="tokens per scored window of English text")] = 512,
    speed_steps: Annotated[int, typer.Option(min=0, help="decode steps timed on ORT fast for the summary's tokens/s (0: off)")] = 16,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = None,
    int4_accuracy_level: Annotated[int | None, typer.Option(
        help="fast mode's int4 MatMulNBits compute: 1 fp32, 2 fp16, 3 bf16, 4 int8 (default: ORT's, 4)")] = None,
    reuse_reference: Annotated[str | None, typer.Option(help="polygraphy/ folder of an earlier report: skip the reference run")] = None,
    no_verify: NoVerify = False,
) -> None:
    """Exit 0 when every threshold holds, 1 naming each failing check (or manifest mismatch), 2 on bad input."""
    from pathlib import Path

    from ..validate.api import CandidateSpec, validate
    from ..validate.config import validate_config_from_dict
    from .validate_view import console, fail_on, print_report

    config = validate_config_from_dict({
        "calib": calib, "calib_samples": calib_samples, "batch_size": batch_size, "decode_steps": decode_steps,
        "eval_data": data, "eval_samples": eval_samples, "runners": runners, "task": task,
        "layer_errors": layer_errors, "thresholds": thresholds, "threads": threads,
        "int4_accuracy_level": int4_accuracy_level, "text": text, "text_tokens": text_tokens,
        "text_window": text_window, "speed_steps": speed_steps}, source="validate")
    require_path(reference, "--reference", what="an FP ONNX bundle or a Hugging Face model directory")
    require_path(candidate, "--candidate", what="an ONNX bundle written by `qvlm-export export`")
    for value, flag in ((engines, "--engines"), (quant, "--quant"), (reuse_reference, "--reuse-reference")):
        require_path(value, flag)
    if thresholds is not None:
        require_path(thresholds, "--thresholds", kind="file", what="a thresholds YAML file")
    skipped = () if engines else ("tensorrt: skipped: no --engines given",)
    spec = CandidateSpec(bundle=Path(candidate), engines=Path(engines) if engines else None,
                         quant=Path(quant) if quant else None, skipped=skipped)
    out_console = console()
    with writing(out), verification_is_the_check():
        report = validate(reference, [spec], out, config, reuse_reference=reuse_reference,
                          log=lambda m: out_console.log(m), progress=True)
    print_report(report, out_console, Path(out))
    fail_on(report)
