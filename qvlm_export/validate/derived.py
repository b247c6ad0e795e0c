"""Quality bounds for a model nobody wrote a thresholds file for: derived from round-to-nearest.

The packaged ``configs/thresholds.yaml`` was measured on the embedded model; its dB figures
mean nothing on another model. For any other model, validate quantizes the same model with
the built-in ``rtn-<setting>`` recipe (same calibration data), runs that state's simulated
model on the reference's own per-graph feeds and eval questions, and asks of the candidate
that it be no worse than round-to-nearest by more than a margin:

* per output: ``sqnr_db >= SQNR_rtn - 6`` (faithful, TensorRT), ``- 12`` for ORT's fused
  kernels (their drift is the CPU's, see docs/validate.md), ``cosine >= 1 - 4 (1 - cos_rtn)``,
  no non-finite values;
* task: accuracy drop and identical-answer share within RTN's plus two standard errors of a
  paired difference on ``n`` questions (``2 sqrt(2 p (1-p) / n) + 1/n``, ``p`` the FP accuracy
  for the drop and RTN's identical share for the share: a random-weight model answers
  chaotically, so its share varies more than its accuracy).

A correct export of a method at least as good as RTN passes; a quantization much worse than
RTN fails whatever the model. Export faults are caught separately and exactly (fidelity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ..errors import QvlmError
from ..manifest import digest, hash_tree
from ..runtime.bundle import BUNDLE_FILE, GRAPHS
from .fidelity import SimulatedGraphs, SimulatedSource, masked_error, recorded_sources
from .stats import worst
from .thresholds import Bounds, ThresholdConfig

SQNR_MARGIN_DB = {"faithful": 6.0, "fast": 12.0}
COSINE_FACTOR = 4.0
# An output RTN leaves unquantized must stay so: float rounding only (the packaged fp bounds).
EXACT_SQNR_DB = 80.0
EXACT_BOUNDS = {"nonfinite": 0, "sqnr_db": 60.0, "cosine": 0.99999}


def embedded_model_digest() -> str:
    from ..load.model import EMBEDDED_MODEL_DIR

    return digest(hash_tree(EMBEDDED_MODEL_DIR))


def reference_model(reference_path: Path) -> tuple[Path | None, str | None]:
    """(model directory, content digest) behind an FP reference bundle or model directory."""
    from ..manifest import read_manifest

    path = Path(reference_path)
    if (path / "config.json").is_file() and not (path / BUNDLE_FILE).is_file():  # bundles have a config.json too
        return path, digest(hash_tree(path))
    if not (path / "manifest.json").is_file():
        return None, None
    model = recorded_sources(path).get("model")
    return (Path(model) if model else None), read_manifest(path).get("inputs", {}).get("model")


def packaged_thresholds_apply(model_digest: str | None) -> bool:
    return model_digest is not None and model_digest == embedded_model_digest()


def task_margin(p: float, n: int) -> float:
    """Two standard errors of a paired accuracy difference on ``n`` questions, plus one question."""
    return 2.0 * math.sqrt(2.0 * p * (1.0 - p) / max(n, 1)) + 1.0 / max(n, 1)


def output_bounds(stats, runner: str) -> dict[str, float]:
    sqnr = float(stats.sqnr_db)
    if not math.isfinite(sqnr) or sqnr > EXACT_SQNR_DB:  # RTN leaves this output exact (e.g. the embedding)
        return dict(EXACT_BOUNDS)
    bounds: dict[str, float] = {"nonfinite": 0, "sqnr_db": round(sqnr - SQNR_MARGIN_DB[runner], 2)}
    if runner == "faithful" and math.isfinite(stats.cosine):
        bounds["cosine"] = round(max(0.0, 1.0 - COSINE_FACTOR * (1.0 - float(stats.cosine))), 6)
    return bounds


def _rtn_state(model: Path, setting: str, calib: str, samples: int, out: Path) -> Path:
    from ..quant.recipe import RECIPES_DIR, recipe_from_dict
    from ..search.api import quantize
    from ..yaml_files import parse_yaml

    path = RECIPES_DIR / f"rtn-{setting}.yaml"
    if not path.is_file():
        raise QvlmError(f"no rtn-{setting} recipe to derive {setting} quality bounds from; pass --thresholds FILE")
    raw = parse_yaml(path.read_text(), str(path))
    raw.setdefault("calibration", {})["samples"] = samples
    return quantize(model=model, recipe=recipe_from_dict(raw, source=str(path)), calib=calib, out=out,
                    progress=False, device="cpu")


def _graph_bounds(simulated: SimulatedGraphs, reference) -> tuple[tuple[str, dict[str, float]], ...]:
    """``faithful`` bounds per ``graph/output`` and the matching ``fast`` ones, from RTN's error vs the reference."""
    faithful, fast = [], []
    for graph in GRAPHS:
        names = reference.info.graphs[graph].outputs
        per_output: dict[str, list] = {n: [] for n in names}
        for feed, ref_out in zip(reference.feeds[graph], reference.outputs(graph), strict=True):
            got = simulated.run(graph, feed, names)
            for name in names:
                per_output[name].append(masked_error(graph, name, feed, ref_out[name], got[name]))
        for name, stats in per_output.items():
            faithful.append((f"{graph}/{name}", output_bounds(worst(stats), "faithful")))
            fast.append((f"{graph}/{name}", output_bounds(worst(stats), "fast")))
    return tuple(faithful), tuple(fast)


def _task_bounds(simulated: SimulatedGraphs, samples, ref_eval, batch_size: int) -> dict[str, float]:
    from ..evaluate.accuracy import evaluate
    from ..evaluate.torch_answerer import TorchAnswerer
    from .task import identical_share

    rtn = evaluate(TorchAnswerer(simulated.vlm), samples, batch_size=batch_size, progress=False,
                   description="eval rtn")
    drop = max(0.0, ref_eval.overall - rtn.overall)
    identical = identical_share(ref_eval.predictions, rtn.predictions)
    return {"max_accuracy_drop": round(drop + task_margin(ref_eval.overall, ref_eval.n), 4),
            "min_identical_answers": round(max(0.0, identical - task_margin(identical, ref_eval.n)), 4)}


def derive_thresholds(model: Path, settings: list[str], reference, config, samples, ref_eval, scratch: Path,
                      fp_section: ThresholdConfig, log: Callable[[str], None]) -> ThresholdConfig:
    """Bounds for each quantized ``setting`` from the built-in RTN recipe on ``model`` (see module doc)."""
    precisions: dict[str, dict[str, Bounds]] = {}
    task: dict[str, dict[str, float]] = {}
    for setting in sorted(set(settings)):
        if setting == "fp":
            precisions["fp"], task["fp"] = fp_section.precisions["fp"], fp_section.task.get("fp", {})
            continue
        log(f"no thresholds file for this model: deriving {setting} bounds from rtn-{setting}")
        state = _rtn_state(model, setting, config.calib, config.calib_samples, scratch / f"rtn-{setting}")
        simulated = SimulatedGraphs(SimulatedSource(quant=state, model=model))
        faithful, fast = _graph_bounds(simulated, reference)
        precisions[setting] = {"faithful": Bounds(outputs=faithful), "fast": Bounds(outputs=fast)}
        if samples is not None and ref_eval is not None:
            task[setting] = _task_bounds(simulated, samples, ref_eval, config.batch_size)
    return ThresholdConfig(precisions=precisions, task=task, source="derived from round-to-nearest on this model",
                           absolute=fp_section.absolute)
