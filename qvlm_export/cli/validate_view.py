"""Terminal rendering of a validation report (shared by ``validate`` and ``run``)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from ..errors import ParityFailure
from ..validate.report import ValidationReport
from ..validate.speed import speed_note
from ..validate.summary import failure_sentence, headline

MAX_LINES = 20


def console():
    from rich.console import Console

    return Console(width=160, log_path=False)


def _worst(report_candidate, comparison: str, stat: str):
    values = [getattr(o.stats, stat) for g in report_candidate.graphs for o in g.outputs if o.comparison == comparison]
    if not values:
        return None
    return min(values) if stat in ("cosine", "sqnr_db") else max(values)


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def skipped_once(report: ValidationReport) -> dict[str, list[str]]:
    """Each skip line (e.g. why there is no TensorRT) with the candidates it applies to, in first-seen order."""
    lines: dict[str, list[str]] = {}
    for c in report.candidates:
        for line in c.skipped:
            lines.setdefault(line, []).append(c.name)
    return lines


def _speed(decode: dict | None) -> str:
    if not decode:
        return ""
    ratio = f", {decode['x_fp']:.2f}x FP" if "x_fp" in decode else ""
    return f"; decode {decode['tokens_per_s']:.0f} tok/s{ratio} (ORT fast, spread {decode['spread']:.2f})"


def print_report(report: ValidationReport, out, report_dir: Path, said: frozenset[str] = frozenset()) -> None:
    """A summary table (one row per candidate and runner), each skip reason once, what failed, the failing checks.

    ``said``: skip lines already printed (the run's stage table), not repeated here.
    """
    from rich.table import Table

    table = Table(title="qvlm-export validation (worst graph output per runner; thresholds in report.html)")
    for column in ("candidate", "setting", "runner", "min SQNR dB", "min cosine", "max |err|", "accuracy",
                   "ref accuracy", "identical", "verdict"):
        table.add_column(column, justify="left" if column in ("candidate", "setting", "runner") else "right")
    for c in report.candidates:
        task = {t.runner: t for t in c.task}
        runners = sorted({o.comparison for g in c.graphs for o in g.outputs}, key=lambda r: (r == "drift", r))
        for runner in runners:
            checks = [ch for g in c.graphs for o in g.outputs if o.comparison == runner for ch in o.checks]
            t = task.get(runner)
            checks += list(t.checks) if t else []
            ok = all(ch.passed for ch in checks)
            table.add_row(escape(c.name), f"{c.setting} ({'deployable' if c.deployable else 'simulated'})",
                          runner if runner != "drift" else "drift (fast vs faithful)",
                          _fmt(_worst(c, runner, "sqnr_db")), _fmt(_worst(c, runner, "cosine")),
                          _fmt(_worst(c, runner, "max_abs")), _fmt(t.candidate.overall if t else None),
                          _fmt(t.reference.overall if t else None), _fmt(t.identical if t else None),
                          "[green]PASS[/]" if ok else "[red]FAIL[/]")
    out.print(table)
    data = report.to_json()
    out.print(f"[bold {'green' if report.passed else 'red'}]{escape(headline(data))}[/]", highlight=False,
              soft_wrap=True)
    for line, names in skipped_once(report).items():
        if line in said:
            continue
        who = "every candidate" if len(names) == len(report.candidates) else ", ".join(names)
        out.print(f"[yellow]skipped[/] {escape(line)} ({escape(who)})", highlight=False, soft_wrap=True)
    for c in report.candidates:
        verdicts = ", ".join(f"{k} {'[green]PASS[/]' if ok else '[red]FAIL[/]'}" for k, ok in c.verdicts().items())
        fidelity = c.export_checks.get("fidelity")
        out.print(f"{escape(c.name)}: {verdicts}" + (f" (fidelity {escape(fidelity)})" if fidelity else "")
                  + escape(_speed(c.decode)), highlight=False, soft_wrap=True)
    note = speed_note(report.reference.get("decode"))
    if note:
        out.print(escape(note), highlight=False, soft_wrap=True)
    out.print(f"quality bounds: {escape(report.thresholds.source)}", highlight=False, soft_wrap=True)
    out.print(escape(failure_sentence(data)), highlight=False, soft_wrap=True)
    failures = report.failures()
    for line in failures[:MAX_LINES]:
        out.print(f"[red]FAIL[/] {escape(line)}", highlight=False, soft_wrap=True)
    if len(failures) > MAX_LINES:
        out.print(f"... and {len(failures) - MAX_LINES} more failing checks in report.json", highlight=False)
    out.print(f"report: {report_dir / 'report.html'}  (json: {report_dir / 'report.json'})", highlight=False,
              soft_wrap=True)


def fail_on(report: ValidationReport) -> None:
    """Raise ParityFailure (exit 1) naming the first failing check and how many there are."""
    failures = report.failures()
    if failures:
        more = f" (and {len(failures) - 1} more: see the list above and report.json)" if len(failures) > 1 else ""
        raise ParityFailure(f"parity failed: {failures[0]}{more}")
