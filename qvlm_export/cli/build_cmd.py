"""``qvlm-export build`` (TensorRT engines from an ONNX bundle) and ``qvlm-export check-trt``."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import JsonOut, NoVerify, require_path, verification_is_the_check, writing


@app.command("check-trt")
def check_trt_command(
    path: Annotated[str, typer.Argument(help="ONNX bundle directory or one .onnx file")],
    json_out: JsonOut = None,
    no_verify: NoVerify = False,
) -> None:
    """Static check of every TensorRT Q/DQ rule (no TensorRT needed); exit 1 on violations or manifest mismatch."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..engine.check_trt import check_path
    from ..errors import QvlmError
    from ..manifest import verify_directory

    require_path(path, "PATH", kind="any", what="an ONNX bundle directory or an .onnx file")
    if Path(path).is_file() and (Path(path).suffix != ".onnx" or Path(path).stat().st_size == 0):
        # protobuf parses an empty file as an empty model, which breaks no rule: found by tests/test_fuzz_cli.py
        raise QvlmError(f"{path!r} is not an ONNX model (an empty file or not .onnx); pass an .onnx file or a "
                        "bundle directory")
    with writing(None, json_out):
        with verification_is_the_check():
            verify_directory(path)
        report = check_path(path)
        if json_out:
            report.write_json(json_out)
    console = Console(width=200)
    if report.ok:
        console.print(f"check-trt: OK ({len(report.graphs)} graphs, {report.qdq_nodes} Q/DQ nodes)")
        return
    table = Table(title=f"check-trt: {len(report.violations)} violations in {path}")
    for column in ("graph", "node", "rule", "problem", "fix"):
        table.add_column(column, overflow="fold")
    for v in report.violations:
        table.add_row(v.graph, v.node, v.rule, v.detail, v.fix)
    console.print(table)
    from ..errors import CheckFailed

    raise CheckFailed(f"check-trt found {len(report.violations)} TensorRT rule violations in {path!r} (table above); "
                      "apply each row's fix and re-export")


@app.command("build")
def build_command(
    bundle: Annotated[str, typer.Option(help="ONNX bundle directory written by `qvlm-export export`")],
    profile: Annotated[str, typer.Option(help="build profile: edge | server | path to a YAML profile")],
    out: Annotated[str | None, typer.Option(help="engine directory to write (replaced atomically; locked while "
                                                 "written)")] = None,
    timing_cache: Annotated[str | None, typer.Option(help="timing cache file (default: the profile's)")] = None,
    skip_check: Annotated[bool, typer.Option(help="build even if check-trt finds rule violations")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the engines and optimization-profile shapes; no TensorRT")] = False,
    no_verify: NoVerify = False,
) -> None:
    """Strongly typed TensorRT engines (vision, embed, decoder prefill/decode) with a manifest."""
    from pathlib import Path

    from ..engine.builder import build_engines, dump_plan, plan_build
    from ..engine.profiles import load_profile
    from ..errors import QvlmError

    require_path(bundle, "--bundle", what="an ONNX bundle directory written by `qvlm-export export`")
    if timing_cache is not None and Path(timing_cache).is_dir():
        raise QvlmError(f"--timing-cache {timing_cache!r} is a directory; pass a file path")
    resolved = load_profile(profile)
    if dry_run:
        typer.echo(dump_plan(plan_build(Path(bundle), resolved)))
        return
    if out is None:
        raise QvlmError("build needs --out DIR (the engine directory to write), or --dry-run to only print the plan")
    with writing(out):
        path = build_engines(Path(bundle), resolved, Path(out),
                             timing_cache=Path(timing_cache) if timing_cache else None, skip_check=skip_check)
    typer.echo(f"engines written to {path}")
