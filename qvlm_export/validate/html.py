"""Render ``report.json`` as one self-contained HTML page (inline CSS, plots as data URIs, no scripts)."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from . import plots
from .stats import STAT_NAMES
from .summary import failure_sentence, fmt_accuracy, fmt_bytes_vs_fp, fmt_decode, fmt_delta, headline, summary_rows

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#222;
background:#fff}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.pass{color:#19692c;font-weight:600}.fail{color:#b3261e;font-weight:600}
.bad{background:#fde7e7}.ok{background:#eaf6ec}.thr{color:#666;font-size:11px}
.badge{display:inline-block;padding:4px 12px;border-radius:4px;color:#fff;font-weight:700}
.badge.pass{background:#19692c}.badge.fail{background:#b3261e}.muted{color:#666}
img{max-width:100%;border:1px solid #eee;margin:6px 0}code{background:#f5f5f5;padding:1px 4px}
table.summary{font-size:14px}table.summary td{vertical-align:top}p.lead{font-size:16px;margin:8px 0 4px}
details{margin:10px 0}details>summary{cursor:pointer;font-size:18px;font-weight:600;padding:6px 0;
border-bottom:2px solid #ddd}details>summary h2{display:inline;border:0;font-size:20px}
"""


def _num(v: Any) -> str:
    if isinstance(v, str):
        return escape(v)
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _as_float(v: Any) -> float:
    return float(v) if v is not None else math.nan


def _verdict(passed: bool) -> str:
    return f'<span class="{"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</span>'


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def _stat_cell(stat: str, stats: dict, checks: dict) -> str:
    v = stats.get(stat)
    value = f"{v:.6f}" if stat == "cosine" and isinstance(v, float) else _num(v)
    if stat not in checks:
        return f"<td>{value}</td>"
    c = checks[stat]
    return (f'<td class="{"ok" if c["passed"] else "bad"}">{value}'
            f'<br><span class="thr">{escape(c["op"])} {_num(c["bound"])}</span></td>')


def _parity_section(candidate: dict) -> str:
    rows = []
    for g in candidate["graphs"]:
        for o in g["outputs"]:
            checks = {c["stat"]: c for c in o["checks"]}
            rows.append([escape(g["graph"]), escape(o["output"]), f'{escape(o["comparison"])} vs {escape(o["against"])}',
                         *[_stat_cell(s, o["stats"], checks) for s in STAT_NAMES], _verdict(o["passed"])])
    parts = ["<h3>Per-graph parity (worst calibration iteration; thresholds under each value)</h3>",
             _table(["graph", "output", "comparison", *STAT_NAMES, "verdict"], rows, left=3)]
    runners = sorted({r for g in candidate["graphs"] for r in g["runtime_ms"]})
    if runners:
        rows = [[escape(g["graph"]), str(g["iterations"]), *[_num(g["runtime_ms"].get(r)) for r in runners]]
                for g in candidate["graphs"]]
        parts += ["<h3>Mean inference time per calibration feed (ms)</h3>",
                  _table(["graph", "feeds", *runners], rows)]
    outputs = [(g["graph"], o) for g in candidate["graphs"] for o in g["outputs"]]
    if outputs:
        labels = sorted({f'{g}/{o["output"]}' for g, o in outputs})
        series: dict[str, list[float]] = {}
        for comparison in sorted({o["comparison"] for _, o in outputs}):
            by_label = {f'{g}/{o["output"]}': _as_float(o["stats"]["sqnr_db"])
                        for g, o in outputs if o["comparison"] == comparison}
            series[comparison] = [by_label.get(label, math.nan) for label in labels]
        parts.append(_img(plots.grouped_bars(labels, series, "SQNR (dB, inf drawn at 100)",
                                             "Parity SQNR per output and comparison"), "parity SQNR"))
    return "".join(parts)


def _task_section(candidate: dict) -> str:
    if not candidate["task"]:
        return ""
    first = candidate["task"][0]
    qtypes = [*first["reference"]["by_type"], "overall"]

    def acc(result: dict, t: str) -> float:
        return result["overall"] if t == "overall" else result["by_type"].get(t, math.nan)

    headers, columns = ["question type", "reference"], [[acc(first["reference"], t) for t in qtypes]]
    series = {"reference": columns[0]}
    for task in candidate["task"]:
        headers += [task["runner"], f'delta ({task["runner"]})']
        values = [acc(task["candidate"], t) for t in qtypes]
        columns += [values, [task["delta"].get(t, math.nan) for t in qtypes]]
        series[task["runner"]] = values
    rows = [[escape(t), *[_num(col[i]) for col in columns]] for i, t in enumerate(qtypes)]
    checks = [[escape(t["runner"]), escape(c["stat"]), _num(c["value"]), f'{escape(c["op"])} {_num(c["bound"])}',
               _verdict(c["passed"])] for t in candidate["task"] for c in t["checks"]]
    checks += [[escape(t["runner"]), "identical_answers", _num(t["identical_answers"]), "-", "-"]
               for t in candidate["task"] if not any(c["stat"] == "identical_answers" for c in t["checks"])]
    return "".join([
        f'<h3>Task parity ({first["n"]} eval samples, greedy exact match)</h3>', _table(headers, rows),
        _table(["runner", "statistic", "measured", "threshold", "verdict"], checks),
        _img(plots.grouped_bars(qtypes, series, "accuracy", "Accuracy by question type", cap=1.0), "accuracy"),
    ])


def _text_section(candidate: dict) -> str:
    if not candidate.get("text"):
        skipped = candidate.get("text_skipped")
        return f'<h3>Text parity</h3><p class="muted">skipped: {escape(skipped)}</p>' if skipped else ""
    rows = [[escape(t["runner"]), _num(t["reference_perplexity"]), _num(t["candidate_perplexity"]),
             f'{_num(t["perplexity_ratio"])} [{_num(t["perplexity_ratio_ci95"][0])}, {_num(t["perplexity_ratio_ci95"][1])}]',
             f'{_num(t["next_token_agreement"])} [{_num(t["agreement_ci95"][0])}, {_num(t["agreement_ci95"][1])}]']
            for t in candidate["text"]]
    checks = [[escape(t["runner"]), escape(c["stat"]), _num(c["value"]), f'{escape(c["op"])} {_num(c["bound"])}',
               _verdict(c["passed"])] for t in candidate["text"] for c in t["checks"]]
    return "".join([
        f'<h3>Text parity ({candidate["text"][0]["tokens"]} tokens of English, language model alone)</h3>',
        _table(["runner", "FP perplexity", "perplexity", "ratio [95% CI]", "next-token agreement [95% CI]"], rows),
        _table(["runner", "statistic", "measured", "threshold", "verdict"], checks),
    ])


def _layers_section(candidate: dict) -> str:
    layers = candidate.get("layers") or {}
    parts = ["<h3>Per-layer quantization</h3>"]
    entropy, error = layers.get("entropy"), layers.get("error")
    if entropy:
        blocks = entropy.get("blocks") or None
        parts.append(_img(plots.layer_line(entropy["names"], {"activation entropy H (bits)": entropy["values"]},
                                           "entropy (bits)", "Per-layer activation entropy and Q-VLM block partition",
                                           blocks), "entropy and partition"))
        if entropy.get("dependency"):
            p = entropy.get("p")
            parts.append(_img(plots.layer_line(
                entropy["names"], {"d(k, k+1) = D / b": [*map(_as_float, entropy["dependency"]), math.nan]},
                "normalised dependency", "Dependency of consecutive layers" + (f" (joins when > p = {p})" if p else ""),
                blocks, hline=p), "dependency and partition"))
    else:
        parts.append('<p class="muted">No per-layer entropy: the quant state records none (not a Q-VLM search, '
                     'or no quant state given).</p>')
    if error:
        values = [_as_float(v) for v in error["sqnr_db"]]
        parts.append(_img(plots.layer_line(error["names"], {"output SQNR vs FP (dB)": values}, "SQNR (dB)",
                                           "Per-layer error: layer output, simulated quantized vs FP"),
                          "per-layer error"))
    return "".join(parts)


VERDICT_QUESTIONS = {
    "export": "the graphs compute their quant state (exact weights, metadata, fidelity to the simulated model)",
    "quality": "the quantization is within its bounds against the FP reference",
    "kernels": "ONNX Runtime's fused kernels stay within their drift bounds",
}


def _verdicts_section(c: dict) -> str:
    verdicts = c.get("verdicts") or {}
    checks = c.get("export_checks") or {}
    rows = [[escape(k), escape(VERDICT_QUESTIONS[k]), _verdict(ok)] for k, ok in verdicts.items()
            if k in VERDICT_QUESTIONS]
    notes = [f"fidelity {escape(checks['fidelity'])}"] if checks.get("fidelity") else []
    notes += [escape(line) for key in ("metadata", "weights", "runtime") for line in checks.get(key, [])]
    listed = "".join(f"<li><code>{n}</code></li>" for n in notes)
    return (_table(["verdict", "question", "result"], rows, left=2) if rows else "") + (f"<ul>{listed}</ul>" if listed else "")


def _candidate(c: dict) -> str:
    """One candidate's details, collapsible (open when it failed: that is what the reader came for)."""
    skipped = "".join(f"<li>{escape(s)}</li>" for s in c["skipped"])
    setting = (f'setting <b>{escape(c["setting"].upper())}</b> ({"deployable" if c["deployable"] else "simulated only"}'
               f'; runs on: {escape(c["runs_on"])})')
    return "".join([
        f'<details{"" if c["passed"] else " open"}><summary><h2>{escape(c["name"])}</h2> {_verdict(c["passed"])} '
        '<span class="muted">details</span></summary>',
        f'<p>{setting}; method <code>{escape(str(c.get("method")))}</code>; bundle <code>{escape(c["bundle"])}</code></p>',
        f"<ul>{skipped}</ul>" if skipped else "",
        _verdicts_section(c), _parity_section(c), _task_section(c), _text_section(c), _layers_section(c),
        "</details>",
    ])


def _summary_section(report: dict[str, Any]) -> str:
    """The first screen: one row per candidate, then the sentence saying what failed."""
    rows = []
    for r in summary_rows(report):
        worst = escape(r.worst.text()) if r.worst else "-"
        worst_cell = f'<td class="l {"ok" if r.worst is None or r.worst.passed else "bad"}">{worst}</td>'
        verdict = _verdict(r.passed) + (f'<br><span class="thr">{escape(", ".join(r.failed_verdicts))}</span>'
                                        if r.failed_verdicts else "")
        rows.append([escape(r.name), escape(r.setting.upper()), verdict, worst_cell,
                     escape(fmt_accuracy(r)) + (f'<br><span class="thr">{escape(r.accuracy_runner)}</span>'
                                                if r.accuracy_runner else ""),
                     escape(fmt_delta(r)), escape(fmt_bytes_vs_fp(r)), escape(fmt_decode(r))])
    headers = ["candidate", "setting", "verdict", "worst graph check (vs its bound)",
               "accuracy [Wilson 95%]", "delta vs FP", "bundle bytes", "decoder time per feed"]
    table = _table(headers, rows, left=4).replace("<table>", '<table class="summary">', 1)
    return f'{table}<p class="lead">{escape(failure_sentence(report))}</p>'


def _skipped_once(report: dict[str, Any]) -> str:
    """Skip reasons shared by every candidate (no TensorRT here), said once."""
    shared = set.intersection(*[set(c["skipped"]) for c in report["candidates"]]) if report["candidates"] else set()
    return "".join(f'<p class="muted">{escape(line)}</p>' for line in sorted(shared))


def render_html(report: dict[str, Any]) -> str:
    """The whole page for a ``report.json`` mapping: the summary first, every detail below it."""
    passed = report["passed"]
    # the badge's verdict never stands alone: the headline's rest says which runtimes it covers
    runtimes = (report.get("headline") or headline(report)).split(" ", 1)[-1]
    failures = "".join(f"<li><code>{escape(f)}</code></li>" for f in report["failures"])
    ref = report["reference"]
    timings = ", ".join(f"{escape(k)} {v:.1f} s" for k, v in report.get("timings_s", {}).items())
    body = "".join([
        f'<h1>qvlm-export validation <span class="badge {"pass" if passed else "fail"}">'
        f'{"PASSED" if passed else "FAILED"}</span> <small>{escape(runtimes)}</small></h1>',
        _summary_section(report), _skipped_once(report),
        f'<p class="muted">Reference: <code>{escape(str(ref.get("path")))}</code> ({escape(str(ref.get("kind")))}); '
        f'thresholds: <code>{escape(report["thresholds"]["source"])}</code>.'
        + (f" Stage times: {timings}." if timings else "") + "</p>",
        f'<details><summary>Failing checks ({len(report["failures"])})</summary><ul>{failures}</ul></details>'
        if failures else "",
        *[_candidate(c) for c in report["candidates"]],
    ])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<link rel=\"icon\" href=\"data:,\"><title>qvlm-export validation report</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
