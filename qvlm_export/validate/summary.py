"""The first thing a person reads: one row per candidate and one sentence on what failed.

Computed from the ``report.json`` mapping (so report.html and the terminal say the same):
the verdict, the graph check closest to (or furthest past) its bound, accuracy with a Wilson
95% interval and its delta against FP, bundle bytes against the FP bundle, and the decoder's
time per feed against FP's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..evaluate.intervals import wilson_interval
from .report import COMPARISON_ORDER

SPEED_RUNNERS = ("fast", "tensorrt", "faithful")
VS_FP = ("faithful", "tensorrt", "fast")  # comparisons against the FP reference (not fidelity, not drift)  # the deployment runner first: faithful mode unfuses QDQ


@dataclass(frozen=True)
class WorstCheck:
    graph: str
    output: str
    comparison: str
    stat: str
    value: float
    op: str
    bound: float
    passed: bool

    def text(self) -> str:
        value = f"{self.value:.6f}" if self.stat == "cosine" else f"{self.value:.4g}"
        return (f"{self.graph}/{self.output} {self.stat} {value} "
                f"({'within' if self.passed else 'past'} {self.op} {self.bound:.4g}, {self.comparison})")


@dataclass(frozen=True)
class SummaryRow:
    name: str
    setting: str
    passed: bool
    failed_verdicts: tuple[str, ...]
    worst: WorstCheck | None
    accuracy: float | None
    interval: tuple[float, float] | None
    n: int
    delta: float | None
    accuracy_runner: str | None
    bundle_bytes: int | None
    bytes_ratio: float | None
    decode_ratio: float | None  # candidate decoder ms / FP decoder ms (< 1: faster)
    decode_runner: str | None


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _margin(check: dict) -> float:
    """Relative room to the bound: negative past it, NaN values first of all."""
    value, bound = _float(check["value"]), _float(check["bound"])
    if math.isnan(value):
        return -math.inf
    if bound == 0 and check["passed"]:
        return math.inf  # a count that must be 0 (nonfinite) and is: no room to speak of, nothing to report
    room = value - bound if check["op"] == ">=" else bound - value
    return room / max(abs(bound), 1e-12)


def worst_check(candidate: dict) -> WorstCheck | None:
    """The most violated failing check; when all pass, the output with the least SQNR room against FP.

    Relative room is not comparable across statistics (a cosine of 0.9995 against 0.999 and an
    SQNR of 20 dB against 12 dB), so a passing candidate is summarised by SQNR, the figure
    quantization papers and the bounds are stated in.
    """
    found = [(g["graph"], o, c) for g in candidate["graphs"] for o in g["outputs"] for c in o["checks"]]
    failed = [t for t in found if not t[2]["passed"]]
    sqnr = [t for t in found if t[2]["stat"] == "sqnr_db" and t[1]["comparison"] in VS_FP]
    pool = failed or sqnr or found
    if not pool:
        return None
    # ties (fast runs the same graph as faithful) go to the comparison a reader checks first
    graph, output, check = min(pool, key=lambda t: (_margin(t[2]) if failed or not sqnr else _room_db(t[2]),
                                                    COMPARISON_ORDER.get(t[1]["comparison"], 9)))
    return WorstCheck(graph, output["output"], output["comparison"], check["stat"], _float(check["value"]),
                      check["op"], _float(check["bound"]), bool(check["passed"]))


def _room_db(check: dict) -> float:
    value = _float(check["value"])
    return -math.inf if math.isnan(value) else value - _float(check["bound"])


def _decode_ratio(candidate: dict) -> tuple[float | None, str | None]:
    decoder = next((g for g in candidate["graphs"] if g["graph"] == "decoder"), None)
    if decoder is None:
        return None, None
    times = {k: _float(v) for k, v in decoder["runtime_ms"].items()}
    reference = times.get("reference", math.nan)
    runner = next((r for r in SPEED_RUNNERS if math.isfinite(times.get(r, math.nan))), None)
    if runner is None or not math.isfinite(reference) or reference <= 0:
        return None, None
    return times[runner] / reference, runner


def summary_row(candidate: dict, reference: dict) -> SummaryRow:
    task = candidate["task"][0] if candidate["task"] else None
    accuracy = interval = delta = None
    n = 0
    if task is not None:
        accuracy, n = _float(task["candidate"]["overall"]), int(task["n"])
        interval = wilson_interval(round(accuracy * n), n)
        delta = _float(task["delta"].get("overall"))
    size, fp_size = candidate.get("bundle_bytes"), reference.get("bundle_bytes")
    ratio, runner = _decode_ratio(candidate)
    return SummaryRow(
        name=candidate["name"], setting=candidate["setting"], passed=bool(candidate["passed"]),
        failed_verdicts=tuple(k for k, ok in (candidate.get("verdicts") or {}).items() if not ok),
        worst=worst_check(candidate), accuracy=accuracy, interval=interval, n=n, delta=delta,
        accuracy_runner=task["runner"] if task else None, bundle_bytes=size,
        bytes_ratio=size / fp_size if size and fp_size else None, decode_ratio=ratio, decode_runner=runner)


def summary_rows(report: dict) -> list[SummaryRow]:
    return [summary_row(c, report.get("reference") or {}) for c in report["candidates"]]


def failure_sentence(report: dict) -> str:
    """One sentence: everything passed, or which candidate failed which verdict, and its first failing check."""
    rows = summary_rows(report)
    failed = [r for r in rows if not r.passed]
    if not failed:
        return f"All {len(rows)} candidates pass every check (export, quality, kernels)."
    first = {c["name"]: next((f for f in report["failures"] if f.startswith(f'{c["name"]} [')), None)
             for c in report["candidates"]}
    parts = []
    for r in failed:
        line = first.get(r.name) or ""
        what = line.split("]: ", 1)[-1] if line else "see the details"
        parts.append(f"{r.name} fails {' and '.join(r.failed_verdicts) or 'a check'} ({what})")
    passed = [r.name for r in rows if r.passed]
    tail = f"; {', '.join(passed)} pass{'es' if len(passed) == 1 else ''}" if passed else ""
    return "; ".join(parts) + tail + "."


ORT_MODES = ("fidelity", "faithful", "fast", "drift")


def _trt_reason(candidate: dict) -> str:
    """Why a candidate has no TensorRT comparison: its first "tensorrt...: skipped: <why>" line."""
    line = next((x for x in candidate.get("skipped", []) if x.startswith("tensorrt")), "")
    return line.split("skipped:", 1)[-1].strip() if line else "no engines were compared"


def headline(report: dict) -> str:
    """PASSED/FAILED and on which runtimes, e.g. "PASSED on ONNX Runtime (faithful, fast); TensorRT not run:
    no --engines given": a verdict never claims a runtime that was not compared."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    ran = {c["name"]: {o["comparison"] for g in c["graphs"] for o in g["outputs"]} | {t["runner"] for t in c["task"]}
           for c in report["candidates"]}
    modes = [m for m in ("faithful", "fast") if any(m in r for r in ran.values())]
    ort = any(r & set(ORT_MODES) for r in ran.values())
    parts = [f"ONNX Runtime ({', '.join(modes)})" if modes else "ONNX Runtime"] if ort else []
    with_trt = [c for c in report["candidates"] if "tensorrt" in ran[c["name"]]]
    without = [c for c in report["candidates"] if "tensorrt" not in ran[c["name"]]]
    if with_trt:
        parts.append("TensorRT" + (f" ({', '.join(c['name'] for c in with_trt)})" if without else ""))
    head = f"{verdict} on {' and '.join(parts)}" if parts else f"{verdict} (no runtime compared)"
    reasons: dict[str, list[str]] = {}
    for c in without:
        reasons.setdefault(_trt_reason(c), []).append(c["name"])
    for why, names in reasons.items():
        who = f" for {', '.join(names)}" if with_trt or len(reasons) > 1 else ""
        head += f"; TensorRT not run{who}: {why}"
    return head


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def fmt_accuracy(row: SummaryRow) -> str:
    if row.accuracy is None or row.interval is None:
        return "-"
    return f"{row.accuracy:.3f} [{row.interval[0]:.3f}, {row.interval[1]:.3f}] (n={row.n})"


def fmt_delta(row: SummaryRow) -> str:
    return "-" if row.delta is None or math.isnan(row.delta) else f"{row.delta:+.3f}"


def fmt_bytes_vs_fp(row: SummaryRow) -> str:
    ratio = f" ({row.bytes_ratio:.2f}x FP)" if row.bytes_ratio else ""
    return fmt_bytes(row.bundle_bytes) + ratio


def fmt_decode(row: SummaryRow) -> str:
    if row.decode_ratio is None:
        return "-"
    return f"{row.decode_ratio:.2f}x FP time ({row.decode_runner})"
