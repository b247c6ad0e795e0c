"""``qvlm-export run``: the main job (quantize -> export -> check-trt -> engines -> validate -> report)."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from . import app
from .options import Device, NoVerify, Progress


def _opt(kind, help: str, **kw):
    return Annotated[kind | None, typer.Option(help=help, **kw)]


# Each option once: its run-config key and its declaration (the device group from options.py).
# Every other key is reachable with --set section.key=value or --config.
RUN_OPTIONS: dict[str, tuple[str, object]] = {
    "model": ("model", _opt(str, "Hugging Face LLaVA-family directory (default: embedded model)")),
    "out": ("out", _opt(str, "run directory (default: qvlm-run)")),
    "method": ("quantize.method", _opt(str, "quantization method (default: qvlm)")),
    "settings": ("quantize.settings", _opt(str, "comma-separated deployable settings (default: w8a8,w4a16)")),
    "calib": ("quantize.calib", _opt(str, "calibration data (default: builtin:calib)")),
    "device": ("quantize.device", Device),
    "calib_samples": ("quantize.recipe.calibration.samples", _opt(int, "calibration samples of the search", min=1)),
    "iterations": ("quantize.recipe.method_args.iterations", _opt(int, "search iterations per block (Q-VLM)", min=1)),
    "profile": ("build.profile", _opt(str, "TensorRT build profile: edge | server | YAML")),
    "engines": ("build.engines", _opt(str, "TensorRT engines: auto | off | required")),
    "eval_samples": ("validate.eval_samples", _opt(int, "eval samples for task parity", min=1)),
    "parity_samples": ("validate.calib_samples", _opt(int, "calibration samples fed to graph parity", min=1)),
    "thresholds": ("validate.thresholds", _opt(str, "parity thresholds YAML")),
    "threads": ("validate.threads", _opt(int, "ONNX Runtime intra-op threads", min=1)),
}
OPTION_KEYS = {name: key for name, (key, _) in RUN_OPTIONS.items()}  # CLI option -> run-config key


def cli_overrides(given: dict[str, object]) -> list[str]:
    """``--set``-style assignments for the options given on the command line (None: not given)."""
    import yaml

    return [f"{OPTION_KEYS[k]}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in given.items() if v is not None]


def run_command(
    config: Annotated[str | None, typer.Option("--config", help="run config YAML (see qvlm_export/pipeline_config.py)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override any config key: section.key=value (repeatable)")] = None,
    progress: Progress = True,
    no_verify: NoVerify = False,
    **given: object,  # the RUN_OPTIONS, added to the signature below
) -> None:
    """Embedded model + built-in calibration set -> Q-VLM W8A8 and W4A16 -> ONNX -> ORT/TensorRT -> validated report."""
    from ..pipeline import run_pipeline
    from ..pipeline_config import load_run_config
    from .validate_view import console, fail_on, print_report

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


def _with_run_options(command):
    """Typer reads options from the signature: put RUN_OPTIONS in it, in --help's order (after --set)."""
    fixed = list(inspect.signature(command, eval_str=True).parameters.values())[:-1]  # drop **given
    extra = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation)
             for name, (_, annotation) in RUN_OPTIONS.items()]
    command.__signature__ = inspect.Signature([*fixed[:2], *extra, *fixed[2:]])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


app.command("run")(_with_run_options(run_command))


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
