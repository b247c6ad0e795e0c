"""``qvlm-export run``: the main job (quantize -> export -> check-trt -> engines -> validate -> report)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import Device, NoVerify, Progress

# CLI option -> run-config key; every other key is reachable with --set section.key=value or --config.
OPTION_KEYS = {
    "model": "model", "out": "out", "method": "quantize.method", "settings": "quantize.settings",
    "calib": "quantize.calib", "device": "quantize.device", "calib_samples": "quantize.recipe.calibration.samples",
    "iterations": "quantize.recipe.method_args.iterations", "profile": "build.profile", "engines": "build.engines",
    "eval_samples": "validate.eval_samples", "parity_samples": "validate.calib_samples",
    "thresholds": "validate.thresholds", "threads": "validate.threads",
}


def cli_overrides(given: dict[str, object]) -> list[str]:
    """``--set``-style assignments for the options given on the command line (None: not given)."""
    import yaml

    return [f"{OPTION_KEYS[k]}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in given.items() if v is not None]


@app.command("run")
def run_command(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option("--config", help="run config YAML (see qvlm_export/pipeline_config.py)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override any config key: section.key=value (repeatable)")] = None,
    model: Annotated[str | None, typer.Option(help="Hugging Face LLaVA-family directory (default: embedded model)")] = None,
    out: Annotated[str | None, typer.Option(help="run directory (default: qvlm-run)")] = None,
    method: Annotated[str | None, typer.Option(help="quantization method (default: qvlm)")] = None,
    settings: Annotated[str | None, typer.Option(help="comma-separated deployable settings (default: w8a8,w4a16)")] = None,
    calib: Annotated[str | None, typer.Option(help="calibration data (default: builtin:calib)")] = None,
    device: Device = None,
    calib_samples: Annotated[int | None, typer.Option(min=1, help="calibration samples of the search")] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="search iterations per block (Q-VLM)")] = None,
    profile: Annotated[str | None, typer.Option(help="TensorRT build profile: edge | server | YAML")] = None,
    engines: Annotated[str | None, typer.Option(help="TensorRT engines: auto | off | required")] = None,
    eval_samples: Annotated[int | None, typer.Option(min=1, help="eval samples for task parity")] = None,
    parity_samples: Annotated[int | None, typer.Option(min=1, help="calibration samples fed to graph parity")] = None,
    thresholds: Annotated[str | None, typer.Option(help="parity thresholds YAML")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="ONNX Runtime intra-op threads")] = None,
    progress: Progress = True,
    no_verify: NoVerify = False,
) -> None:
    """Embedded model + built-in calibration set -> Q-VLM W8A8 and W4A16 -> ONNX -> ORT/TensorRT -> validated report."""
    from ..pipeline import run_pipeline
    from ..pipeline_config import load_run_config
    from .validate_view import console, fail_on, print_report

    given = {name: ctx.params[name] for name in OPTION_KEYS}  # the options above that map to config keys
    resolved = load_run_config(config, [*cli_overrides(given), *(set_ or [])])
    from ..quant import distributed

    if not distributed.is_primary():  # torchrun: this rank helps rank 0 quantize, then exits 0
        from ..pipeline import quantize_share

        return quantize_share(resolved)
    term = console()
    result = run_pipeline(resolved, log=lambda m: term.log(m), progress=progress)
    print_stages(result, term)
    print_report(result.report, term, result.out / "report", said=frozenset(result.skipped))
    bad = [s for s, ok in result.check_trt.items() if not ok]
    if bad:
        from ..errors import ParityFailure

        raise ParityFailure(f"check-trt failed for {', '.join(bad)}: see {result.out / 'check-trt'}")
    fail_on(result.report)


def stage_results(result) -> dict[str, str]:
    """What each stage produced, for the stage table: Linears quantized, bundle bytes, check-trt, accuracy."""
    import json

    from rich.markup import escape

    from ..runtime.bundle import read_bundle
    from ..validate.summary import fmt_accuracy, fmt_bytes, fmt_delta, summary_rows

    notes: dict[str, str] = {}
    fp_bytes = None
    for name in [*result.seconds, *result.reused]:
        setting = name.split()[-1]
        if name.startswith("quantize"):
            state = result.out / "quant" / setting / "state.json"
            if state.is_file():
                notes[name] = f"{len(json.loads(state.read_text()).get('layers', {}))} Linears quantized"
        elif name.startswith("export"):
            size = read_bundle(result.out / "bundles" / setting, verify=False).graph_bytes()
            fp_bytes = size if setting == "fp" else fp_bytes
            notes[name] = fmt_bytes(size) + (f" ({size / fp_bytes:.2f}x FP)" if fp_bytes and setting != "fp" else "")
        elif name.startswith("check-trt"):
            notes[name] = "OK" if result.check_trt.get(setting) else "[red]violations[/]"
        elif name.startswith("build"):
            notes[name] = result.engines.get(name.split()[1], "")
    if result.report is not None:
        rows = summary_rows(result.report.to_json())
        notes["validate"] = "; ".join(
            f"{escape(r.name)} {'[green]PASS[/]' if r.passed else '[red]FAIL[/]'} acc {escape(fmt_accuracy(r))} {fmt_delta(r)}"
            + (f", worst {r.worst.stat} {r.worst.value:.4g} ({r.worst.graph})" if r.worst else "") for r in rows)
    return notes


def print_stages(result, term) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"qvlm-export run: {escape(str(result.out))}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    notes = stage_results(result)
    for name, seconds in result.seconds.items():
        table.add_row(name, f"{seconds:.1f}", notes.get(name, ""))
    for name in result.reused:
        table.add_row(name, "-", "up to date (skipped)" + (f"; {notes[name]}" if notes.get(name) else ""))
    for line in result.skipped:
        table.add_row(escape(line.split(":")[0]), "-", f"[yellow]{escape(line.split(':', 1)[1].strip())}[/]")
    term.print(table)
