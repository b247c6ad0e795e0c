"""``validate``: the one Python entry point of the validation stage (the CLI and ``run`` call it).

reference (FP bundle or model) -> calibration feeds -> reference run once (Polygraphy JSON)
-> per candidate: per-graph parity (ORT faithful, ORT fast, TensorRT engines when given),
task parity on the eval set, per-layer data -> report.json, report.html, manifest.json,
written atomically. The returned report says pass/fail; the CLI maps it to the exit code.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QvlmError
from ..manifest import atomic_directory, build_manifest, digest, hash_tree, write_manifest
from ..runtime.bundle import GRAPHS, BundleInfo, read_bundle
from .config import ValidateConfig
from .derived import derive_thresholds, packaged_thresholds_apply, reference_model
from .fidelity import SimulatedGraphs, compare_fidelity, resolve_source, with_fidelity
from .parity import compare_graph
from .reference import Reference, prepare_reference
from .report import REPORT_KIND, CandidateResult, ValidationReport
from .report_files import write_report_files
from .speed import decode_speed, with_ratio
from .static_checks import metadata_matches, weights_match_state
from .task import task_parity
from .text_parity import TextReference, runner_scores, text_parity, text_reference
from .thresholds import ThresholdConfig, load_thresholds

POLYGRAPHY_DIR = "polygraphy"


@dataclass(frozen=True)
class CandidateSpec:
    """A quantized bundle to validate, with its optional TensorRT engines and quant state."""

    bundle: Path
    engines: Path | None = None
    quant: Path | None = None  # enables per-layer error and Q-VLM diagnostics in the report
    name: str | None = None
    skipped: tuple[str, ...] = ()  # lines such as "tensorrt: skipped: ..." decided by the caller


def _quiet(_: str) -> None:
    pass


def check_candidate(spec: CandidateSpec) -> BundleInfo:
    """Every input of a candidate, checked before anything expensive runs."""
    info = read_bundle(spec.bundle)
    if spec.engines is not None and not (Path(spec.engines) / "manifest.json").is_file():
        raise QvlmError(f"--engines {str(spec.engines)!r} is not an engine directory (no manifest.json); "
                        "write one with `qvlm-export build`")
    if spec.quant is None:
        return info
    expected = info.quant.get("state_sha256")
    actual = digest(hash_tree(Path(spec.quant)))
    if expected and actual != expected:
        raise QvlmError(f"--quant {str(spec.quant)!r} is not the quant state bundle {str(spec.bundle)!r} was exported "
                        "from (hash differs); pass the matching state or omit --quant")
    return info


def _graph_runners(info: BundleInfo, spec: CandidateSpec, graph: str, config: ValidateConfig,
                   reference: BundleInfo) -> dict[str, Any]:
    from .runners import ort_graph_runner, trt_graph_runner

    runners = {mode: ort_graph_runner(info, graph, mode, config.threads, config.int4_accuracy_level)
               for mode in config.runners}
    if spec.engines is not None:
        runners["tensorrt"] = trt_graph_runner(spec.engines, graph, reference.float_dtype)
    return runners


def _task(reference: Reference, info: BundleInfo, spec: CandidateSpec, config: ValidateConfig, samples, ref_eval,
          thresholds: ThresholdConfig, progress: bool):
    from ..evaluate.accuracy import evaluate
    from ..runtime.factory import answerer_for_bundle, answerer_for_engines

    results = []
    answerers = [(mode, lambda mode=mode: answerer_for_bundle(info.path, mode=mode, threads=config.threads,
                                                              int4_accuracy=config.int4_accuracy_level)[0])
                 for mode in config.runners]
    if spec.engines is not None:
        answerers.append(("tensorrt", lambda: answerer_for_engines(spec.engines)[0]))
    errors = []
    for runner, make in answerers:
        answerer = make()
        try:
            result = evaluate(answerer, samples, batch_size=config.batch_size, progress=progress,
                              description=f"eval {spec.name} {runner}")
        except QvlmError as exc:  # the reference answered these prompts: a candidate that cannot is broken
            errors.append(f"{runner} runtime cannot answer the eval prompts: {exc}")
            continue
        finally:
            answerer.close()
        results.append(task_parity(runner, ref_eval, result, thresholds.task_bounds(info.setting)))
    return results, errors


def _text(text_ref: TextReference, info: BundleInfo, config: ValidateConfig, thresholds: ThresholdConfig):
    """Perplexity ratio and next-token agreement of each ONNX Runtime mode against the reference's scores.

    TensorRT engines compute last-token logits only (``decoder_logits: last``): text runs on ORT.
    """
    from ..runtime.ort_runner import ort_runner

    return [text_parity(mode, text_ref, runner_scores(ort_runner(info, mode, config.threads,
                                                                 config.int4_accuracy_level), text_ref.windows),
                        info.setting, thresholds)
            for mode in config.runners]


def _layers(spec: CandidateSpec, config: ValidateConfig) -> dict[str, Any] | None:
    if spec.quant is None:
        return None
    import json

    from .layers import layer_summary, search_diagnostics

    if not config.layer_errors:
        extras = json.loads((Path(spec.quant) / "state.json").read_text()).get("extras", {})
        return {"entropy": search_diagnostics(extras), "error": None}
    from ..data.manifest import load_dataset

    return layer_summary(Path(spec.quant), load_dataset(config.calib, limit=config.batch_size))


def validate_candidate(reference: Reference, spec: CandidateSpec, info: BundleInfo, config: ValidateConfig,
                       thresholds: ThresholdConfig, samples, ref_eval, log, progress: bool,
                       text_ref: TextReference | None = None) -> CandidateResult:
    if info.float_dtype != reference.info.float_dtype:
        raise QvlmError(f"candidate {str(spec.bundle)!r} is {info.dtype} but the reference is {reference.info.dtype}; "
                        "validate the fp32 bundle on ONNX Runtime (fp16 bundles are for TensorRT: pass --engines)")
    name = spec.name or Path(spec.bundle).name
    result = CandidateResult(name=name, bundle=str(spec.bundle), setting=info.setting,
                             deployable=bool(info.quant.get("deployable", True)), runs_on=str(info.quant.get("runs_on")),
                             method=info.quant.get("method"), skipped=list(spec.skipped),
                             bundle_bytes=info.graph_bytes())
    fidelity = _export_checks(reference, spec, info, config, result, log)
    for graph in GRAPHS:
        runners = _graph_runners(info, spec, graph, config, reference.info)
        log(f"{name}: comparing {graph} ({', '.join(runners)} vs reference)")
        parity = compare_graph(graph, reference.results[graph], runners, reference.feeds[graph], info.setting,
                               thresholds)
        result.graphs.append(with_fidelity(parity, fidelity.get(graph, ())))
    if config.task:
        log(f"{name}: task parity on {len(samples)} eval samples")
        result.task, errors = _task(reference, info, spec, config, samples, ref_eval, thresholds, progress)
        if errors:
            result.export_checks["runtime"] = errors
    if text_ref is not None and text_ref.scores is not None:
        log(f"{name}: perplexity and next-token agreement on {text_ref.scores.tokens} tokens of English text")
        result.text = _text(text_ref, info, config, thresholds)
    elif text_ref is not None:
        result.text_skipped = text_ref.skipped
    log(f"{name}: per-layer data")
    result.layers = _layers(spec, config)
    return result


def _export_checks(reference: Reference, spec: CandidateSpec, info: BundleInfo, config: ValidateConfig,
                   result: CandidateResult, log) -> dict[str, tuple]:
    """Metadata and weights against their sources, then the graphs against the simulated model."""
    from ..quant.state import load_state

    checks: dict[str, Any] = {"metadata": metadata_matches(reference.info, info)}
    source = resolve_source(spec.bundle, info, spec.quant)
    if isinstance(source, str):
        log(f"{result.name}: export fidelity not checked: {source}")
        checks["fidelity"] = f"not checked: {source}"
        result.export_checks = checks
        return {}
    log(f"{result.name}: export fidelity against the simulated model of {source.quant}")
    checks["weights"] = weights_match_state(info, load_state(source.quant))
    checks["fidelity"] = None
    result.export_checks = checks
    fp_outputs = {g: reference.outputs(g) for g in GRAPHS}
    simulated = SimulatedGraphs(source)
    fidelity = compare_fidelity(info, simulated, reference.feeds, fp_outputs, config.threads)
    if info.quant.get("act_bits") is None:  # weight-only: nothing rounds differently, the whole graph is exact
        return fidelity
    from .layer_fidelity import compare_layers, excuse_accumulated_flips

    log(f"{result.name}: export fidelity layer by layer (each graph layer fed its simulated layer's input)")
    layers = compare_layers(info, simulated, reference.feeds, config.threads)
    checks["fidelity_layers"] = [layer.to_json() for layer in layers]
    checks["layers"] = [layer.describe() for layer in layers if not layer.passed]
    fidelity, note = excuse_accumulated_flips(fidelity, layers)
    if note:
        checks["fidelity_note"] = note
    return fidelity


def _text_reference(reference: Reference, config: ValidateConfig, log) -> TextReference:
    from ..evaluate.text import TextSpec
    from ..runtime.ort_runner import ort_runner

    if not config.text:
        return TextReference(skipped="turned off (validate text: false)")
    ref = text_reference(reference.info, TextSpec(config.text_tokens, config.text_window),
                         lambda: ort_runner(reference.info, "faithful", config.threads))
    log(f"text metrics: {'skipped: ' + ref.skipped if ref.skipped else f'reference perplexity {ref.scores.perplexity:.3f}'}")
    return ref


def _text_summary(ref: TextReference) -> dict[str, Any]:
    if ref.scores is None:
        return {"skipped": ref.skipped}
    return {"perplexity": ref.scores.perplexity, "tokens": ref.scores.tokens}


def _reference_eval(reference: Reference, config: ValidateConfig, progress: bool):
    from ..data.manifest import load_dataset
    from ..evaluate.accuracy import evaluate
    from ..runtime.factory import answerer_for_bundle

    samples = load_dataset(config.eval_data, limit=config.eval_samples)
    answerer, _ = answerer_for_bundle(reference.info.path, mode="faithful", threads=config.threads)
    try:
        return samples, evaluate(answerer, samples, batch_size=config.batch_size, progress=progress,
                                 description="eval reference")
    finally:
        answerer.close()


def validate(reference: str | Path, candidates: list[CandidateSpec], out: str | Path,
             config: ValidateConfig | None = None, reuse_reference: str | Path | None = None,
             log: Callable[[str], None] | None = None, progress: bool = True,
             verify: bool | None = None) -> ValidationReport:
    """Compare each candidate with the FP reference and write the report directory ``out``.

    Returns the report whatever the verdict (``report.passed``); raises QvlmError for bad input.
    ``verify=False`` loads bundles, states and engines without checking their manifest hashes
    (e.g. bundles edited on purpose by fault-injection tests); None: the process-wide setting.
    """
    if verify is not None:
        from ..manifest import verification

        with verification(verify):
            return validate(reference, candidates, out, config, reuse_reference, log, progress)
    config = config or ValidateConfig()
    log = log or _quiet
    if not candidates:
        raise QvlmError("validate needs at least one --candidate bundle")
    model_path, model_digest = reference_model(Path(reference))
    derive = config.thresholds is None and not packaged_thresholds_apply(model_digest)
    thresholds = load_thresholds(config.thresholds)
    infos = [check_candidate(spec) for spec in candidates]
    for info in infos:
        if not derive:
            thresholds.bounds(info.setting, "faithful", "vision", "image_features")  # a missing section fails now
    if derive and (model_path is None or not (model_path / "config.json").is_file()):
        raise QvlmError(f"no thresholds for the model behind {str(reference)!r} and its model directory "
                        f"({str(model_path)!r}) is not available to derive them from; pass --thresholds FILE "
                        "or --reference MODEL_DIR")
    timings: dict[str, float] = {}
    with atomic_directory(Path(out)) as tmp, tempfile.TemporaryDirectory(prefix="qvlm-validate-") as scratch:
        start = time.perf_counter()
        reference = prepare_reference(reference, config, tmp / POLYGRAPHY_DIR, Path(scratch), log,
                                      None if reuse_reference is None else Path(reuse_reference))
        samples, ref_eval = (_reference_eval(reference, config, progress) if config.task else (None, None))
        if derive:
            thresholds = derive_thresholds(model_path, [i.setting for i in infos], reference, config, samples,
                                           ref_eval, Path(scratch), thresholds, log)
        text_ref = _text_reference(reference, config, log)
        ref_speed = decode_speed(reference.info, config.speed_steps, config.threads, config.int4_accuracy_level)
        timings["reference"] = time.perf_counter() - start
        results = []
        for spec, info in zip(candidates, infos):
            start = time.perf_counter()
            results.append(validate_candidate(reference, spec, info, config, thresholds, samples, ref_eval, log,
                                              progress, text_ref))
            results[-1].decode = with_ratio(decode_speed(info, config.speed_steps, config.threads,
                                                         config.int4_accuracy_level), ref_speed)
            timings[results[-1].name] = time.perf_counter() - start
        report = ValidationReport(
            reference={"path": reference.path, "kind": reference.kind, "setting": "fp", "dtype": reference.info.dtype,
                       "bundle_bytes": reference.info.graph_bytes(),
                       "eval": ref_eval.to_json() if ref_eval is not None else None,
                       "text": _text_summary(text_ref), "decode": ref_speed},
            candidates=results, thresholds=thresholds, config=config.to_dict(), timings_s=timings)
        write_report_files(report, tmp)
        inputs = {"reference": digest(hash_tree(Path(reference.info.path)))}
        inputs.update({f"candidate:{r.name}": digest(hash_tree(Path(s.bundle))) for r, s in zip(results, candidates)})
        write_manifest(tmp, build_manifest(REPORT_KIND, {"validate": config.to_dict(),
                                                         "thresholds": thresholds.to_json()}, inputs, tmp,
                                           extra={"passed": report.passed}))
    return report
