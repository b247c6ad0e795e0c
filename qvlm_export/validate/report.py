"""The validation report: what was compared, every measured number beside its threshold, the verdict.

``report.json`` is the machine-readable record (a release pipeline gates on ``passed`` or the
exit code); ``report.html`` is rendered from the same JSON by :mod:`.html`, so the two cannot
disagree (:mod:`.report_files` writes both; this module imports neither, so the report's pieces
import in one direction: report_files -> html -> summary -> report). Both live in the validate artifact directory with a ``manifest.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .parity import GraphParity
from .task import TaskParity
from .text_parity import TextParity
from .thresholds import ThresholdConfig

REPORT_KIND = "validation-report"
REPORT_FORMAT = 1
COMPARISON_ORDER = {"fidelity": 0, "faithful": 1, "tensorrt": 2, "fast": 3, "drift": 4}
# What a failure means, by comparison: the graph does not compute its quant state (export), the
# quantization costs more than its bounds allow (quality), or the fast kernels drift (kernels).
VERDICT_OF = {"fidelity": "export", "faithful": "quality", "tensorrt": "quality", "fast": "quality", "drift": "kernels"}


@dataclass
class CandidateResult:
    """One candidate bundle (optionally with engines): graph parity per runner and task parity."""

    name: str
    bundle: str
    setting: str
    deployable: bool
    runs_on: str
    method: str | None = None
    graphs: list[GraphParity] = field(default_factory=list)
    task: list[TaskParity] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "tensorrt: skipped: ..." lines
    layers: dict[str, Any] | None = None  # per-layer entropy, partition and error (see .layers)
    # Exact checks (see .static_checks): {"weights"|"metadata"|"runtime": [problem, ...]}; "fidelity": None when the
    # simulated-model comparison ran, else why it could not.
    export_checks: dict[str, Any] = field(default_factory=dict)
    bundle_bytes: int | None = None  # the graphs on disk (summary: bytes against the FP bundle)
    text: list[TextParity] = field(default_factory=list)  # perplexity / next-token agreement per runner
    text_skipped: str | None = None  # why text metrics did not run (e.g. a toy tokenizer)
    decode: dict[str, Any] | None = None  # decode tokens/s on ORT fast and x_fp (validate/speed.py)

    @property
    def export_problems(self) -> list[str]:
        return [f"export: {line}" for key in ("metadata", "weights", "runtime", "layers")
                for line in self.export_checks.get(key, [])]

    @property
    def passed(self) -> bool:
        return (not self.export_problems and all(g.passed for g in self.graphs)
                and all(t.passed for t in self.task) and all(t.passed for t in self.text))

    def verdicts(self) -> dict[str, bool]:
        """Pass/fail per question: does the graph compute its quant state, is the quantization good enough."""
        failed = {VERDICT_OF.get(o.comparison, "quality") for g in self.graphs for o in g.outputs if not o.passed}
        if any(not t.passed for t in [*self.task, *self.text]):
            failed.add("quality")
        if self.export_problems:
            failed.add("export")
        return {k: k not in failed for k in ("export", "quality", "kernels")}

    def failures(self) -> list[str]:
        """Export faults first (the graph is wrong), then quality against FP, kernel drift, then task."""
        outputs = sorted((o for g in self.graphs for o in g.outputs), key=lambda o: COMPARISON_ORDER.get(o.comparison, 9))
        lines = list(self.export_problems) + [line for o in outputs for line in o.failures()]
        lines += [line for t in self.task for line in t.failures()]
        lines += [line for t in self.text for line in t.failures()]
        return [f"{self.name} [{self.setting}]: {line}" for line in lines]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bundle": self.bundle, "setting": self.setting, "deployable": self.deployable,
                "runs_on": self.runs_on, "method": self.method, "passed": self.passed, "skipped": self.skipped,
                "verdicts": self.verdicts(), "export_checks": self.export_checks,
                "graphs": [g.to_json() for g in self.graphs], "task": [t.to_json() for t in self.task],
                "layers": self.layers, "bundle_bytes": self.bundle_bytes,
                "text": [t.to_json() for t in self.text], "text_skipped": self.text_skipped, "decode": self.decode}


@dataclass
class ValidationReport:
    reference: dict[str, Any]
    candidates: list[CandidateResult]
    thresholds: ThresholdConfig
    config: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.candidates)

    def failures(self) -> list[str]:
        return [line for c in self.candidates for line in c.failures()]

    def to_json(self) -> dict[str, Any]:
        return {"kind": REPORT_KIND, "format": REPORT_FORMAT, "passed": self.passed, "failures": self.failures(),
                "reference": self.reference, "candidates": [c.to_json() for c in self.candidates],
                "thresholds": self.thresholds.to_json(), "config": self.config, "timings_s": self.timings_s}


def _json_safe(obj: Any) -> Any:
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no such numbers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
