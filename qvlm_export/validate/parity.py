"""Per-graph numerical parity with Polygraphy.

The reference runner runs once over the saved calibration feeds; Polygraphy saves the feeds
and the reference outputs as JSON (``<graph>.inputs.json``, ``<graph>.reference.json``) so a
second candidate (or a later run) compares against the same numbers without re-running it.
Candidates (ORT faithful, ORT fast, TensorRT) run with ``Comparator.run`` and are compared
with ``Comparator.compare_accuracy`` using explicit pairs against the reference, plus
faithful -> fast ("drift": the fused integer kernels' own error, separate from the graph's).
The compare function computes the project's statistics (:mod:`.stats`) and checks them
against the thresholds (:mod:`.thresholds`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from .stats import ErrorStats, error_stats, worst
from .thresholds import Check, ThresholdConfig

REFERENCE = "reference"
DRIFT = "drift"
Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class OutputParity:
    """One output of one graph, one comparison: worst-iteration statistics and their checks."""

    graph: str
    output: str
    comparison: str  # faithful | fast | tensorrt | drift
    against: str  # the runner compared against: reference, or faithful for drift
    stats: ErrorStats
    per_iteration: tuple[ErrorStats, ...]
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"graph {self.graph!r} output {self.output!r} ({self.comparison} vs {self.against}): {c.describe()}"
                for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "output": self.output, "comparison": self.comparison, "against": self.against,
                "passed": self.passed, "stats": self.stats.to_json(), "checks": [c.to_json() for c in self.checks],
                "per_iteration": [s.to_json() for s in self.per_iteration]}


@dataclass(frozen=True)
class GraphParity:
    graph: str
    iterations: int
    outputs: tuple[OutputParity, ...]
    runtime_ms: dict[str, float]  # mean inference time per runner
    polygraphy_passed: dict[str, bool]  # Polygraphy's own per-comparison verdict

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[str]:
        return [line for o in self.outputs for line in o.failures()]

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "iterations": self.iterations, "passed": self.passed,
                "runtime_ms": self.runtime_ms, "polygraphy_passed": self.polygraphy_passed,
                "outputs": [o.to_json() for o in self.outputs]}


@contextlib.contextmanager
def polygraphy_quiet(verbose: bool = False) -> Iterator[None]:
    """Silence Polygraphy's per-iteration logging and turn its exceptions into QvlmError."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # otherwise Polygraphy prints a hint about the optional 'colored' module
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL):
        try:
            yield
        except PolygraphyException as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QvlmError(f"Polygraphy failed: {first}") from None


def _paths(polygraphy_dir: Path, graph: str) -> tuple[Path, Path]:
    return polygraphy_dir / f"{graph}.inputs.json", polygraphy_dir / f"{graph}.reference.json"


def run_reference(graph: str, runner: Any, feeds: Sequence[Feed], polygraphy_dir: Path):
    """Run the reference once over ``feeds``; save feeds and outputs with Polygraphy's JSON."""
    from polygraphy.comparator import Comparator

    if not feeds:
        raise QvlmError(f"graph {graph!r}: no calibration feeds to compare on; pass more calibration samples")
    polygraphy_dir.mkdir(parents=True, exist_ok=True)
    inputs_path, outputs_path = _paths(polygraphy_dir, graph)
    runner.name = REFERENCE
    with polygraphy_quiet():
        return Comparator.run([runner], data_loader=[OrderedDict(f) for f in feeds],
                              save_inputs_path=str(inputs_path), save_outputs_path=str(outputs_path))


def load_reference(graph: str, polygraphy_dir: Path) -> tuple[list[OrderedDict], Any]:
    """Feeds and reference outputs saved by :func:`run_reference`."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs_path, outputs_path = _paths(Path(polygraphy_dir), graph)
    for p in (inputs_path, outputs_path):
        if not p.is_file():
            raise QvlmError(f"saved reference {str(p)!r} is missing; run validate without --reuse-reference once")
    with polygraphy_quiet():
        return list(load_json(str(inputs_path))), RunResults.load(str(outputs_path))


class ParityCompareFunc:
    """Polygraphy compare function: the project's statistics, checked per iteration against thresholds.

    It records every iteration's statistics keyed by (comparison, output) so the report can
    show them; Polygraphy's verdict per iteration is "every bound held".
    """

    def __init__(self, graph: str, precision: str, thresholds: ThresholdConfig, labels: dict[tuple[str, str], str]):
        self.graph, self.precision, self.thresholds, self.labels = graph, precision, thresholds, labels
        self.records: dict[tuple[str, str], list[ErrorStats]] = {}

    def __call__(self, result0, result1) -> OrderedDict:
        comparison = self.labels[(result0.runner_name, result1.runner_name)]
        verdict = OrderedDict()
        for name, ref in result0.items():
            if name not in result1:
                raise QvlmError(f"graph {self.graph!r}: candidate {comparison!r} has no output {name!r}; "
                                "was it exported from a different model?")
            got = result1[name]
            if name == "logits" and np.ndim(ref) == np.ndim(got) == 3 and 0 < np.shape(got)[1] < np.shape(ref)[1]:
                ref = np.asarray(ref)[:, -np.shape(got)[1]:]  # TensorRT engines return the last position only
            try:
                stats = error_stats(ref, got)
            except ValueError as exc:
                raise QvlmError(f"graph {self.graph!r} output {name!r} ({comparison}): {exc}") from None
            self.records.setdefault((comparison, name), []).append(stats)
            checks = self.thresholds.check(self.precision, comparison, self.graph, name, stats)
            verdict[name] = all(c.passed for c in checks)
        return verdict


def _mean_runtime_ms(iterations) -> float:
    times = [it.runtime for it in iterations if it.runtime is not None]
    return 1000.0 * float(np.mean(times)) if times else float("nan")


def compare_graph(graph: str, reference, candidates: Mapping[str, Any], feeds: Sequence[Feed],
                  precision: str, thresholds: ThresholdConfig) -> GraphParity:
    """Run candidate runners (name -> Polygraphy runner) on ``feeds`` and compare them with the reference."""
    from polygraphy.comparator import Comparator, RunResults

    if not candidates:
        raise QvlmError(f"graph {graph!r}: no candidate runner to compare")
    for name, runner in candidates.items():
        runner.name = name
    with polygraphy_quiet():
        results = Comparator.run(list(candidates.values()), data_loader=[OrderedDict(f) for f in feeds])
    merged = RunResults()
    for name, iterations in [*reference.items(), *results.items()]:
        merged.append((name, iterations))
    names = [n for n, _ in merged.items()]
    pairs = [(0, names.index(c)) for c in candidates]
    labels = {(REFERENCE, c): c for c in candidates}
    if "faithful" in candidates and "fast" in candidates:
        pairs.append((names.index("faithful"), names.index("fast")))
        labels[("faithful", "fast")] = DRIFT
    func = ParityCompareFunc(graph, precision, thresholds, labels)
    with polygraphy_quiet():
        accuracy = Comparator.compare_accuracy(merged, comparisons=pairs, compare_func=func)[0]
    outputs = []
    for (comparison, output), per_iter in func.records.items():
        stats = worst(per_iter)
        outputs.append(OutputParity(
            graph=graph, output=output, comparison=comparison,
            against="faithful" if comparison == DRIFT else REFERENCE, stats=stats, per_iteration=tuple(per_iter),
            checks=tuple(thresholds.check(precision, comparison, graph, output, stats))))
    return GraphParity(
        graph=graph, iterations=len(feeds), outputs=tuple(outputs),
        runtime_ms={name: _mean_runtime_ms(its) for name, its in merged.items()},
        polygraphy_passed={labels[pair]: all(all(bool(v) for v in it.values()) for it in its)
                           for pair, its in accuracy.items()},
    )
