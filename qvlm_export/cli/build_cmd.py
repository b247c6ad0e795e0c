"""``qvlm-export build`` (TensorRT engines from an ONNX bundle) and ``qvlm-export check-trt``."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app


@app.command("check-trt")
def check_trt_command(
    path: Annotated[str, typer.Argument(help="ONNX bundle directory or one .onnx file")],
    json_out: Annotated[str | None, typer.Option("--json", help="write the report as JSON here")] = None,
) -> None:
    """Static check of every TensorRT Q/DQ rule (no TensorRT needed); exit 1 on violations."""
    from rich.console import Console
    from rich.table import Table

    from ..build.check_trt import check_path

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
    raise typer.Exit(1)
