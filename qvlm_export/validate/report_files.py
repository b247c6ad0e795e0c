"""Write a :class:`~.report.ValidationReport` as ``report.json`` plus ``report.html``.

The top of the import chain (report_files -> html -> summary -> report): the report itself
knows nothing of its renderings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .html import render_html
from .report import ValidationReport, _json_safe
from .summary import headline


def write_report_files(report: ValidationReport, out_dir: Path) -> dict[str, Any]:
    """Write ``report.json`` (with its ``headline``) and ``report.html`` into ``out_dir``; return the JSON mapping."""
    data = _json_safe(report.to_json())
    data["headline"] = headline(data)  # which runtimes the verdict covers
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.html").write_text(render_html(data))
    return data
