"""Fault-injection benchmark: does ``validate`` catch every broken bundle, and pass every correct one?

For each method and setting: quantize the embedded model, export the correct bundle, make one
broken copy per fault of :mod:`qvlm_export.validate.faults`, and validate them all in one call
against the FP bundle (one reference run). Prints the detection table (which check caught each
fault: ``export`` = weights/metadata/fidelity against the quant state, ``quality`` = bounds
against FP) and writes JSON. Target: every fault detected, no false alarm on the correct bundles.

    OMP_NUM_THREADS=2 python tools/fault_injection.py --methods rtn,gptq,awq,qvlm --settings w8a8,w4a16
    python tools/fault_injection.py --model builtin:llava-smollm2 --methods rtn --json docs/fault_injection_real.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qvlm_export.export.api import export_bundle
from qvlm_export.search.api import quantize
from qvlm_export.validate.api import CandidateSpec, validate
from qvlm_export.validate.config import ValidateConfig
from qvlm_export.validate.faults import FAULTS, inject


def _verdict(candidate: dict) -> str:
    """'pass', or the checks that failed ('export', 'quality', 'kernels'), comma-separated."""
    failed = [k for k, ok in candidate["verdicts"].items() if not ok]
    return ",".join(failed) if failed else "pass"


def run_case(method: str, setting: str, fp_bundle: Path, work: Path, config: ValidateConfig,
             model: str | None = None) -> dict:
    quant = quantize(model=model, recipe=f"{method}-{setting}", calib="builtin:calib:16",
                     out=work / f"quant-{method}-{setting}", progress=False, device="cpu")
    good = export_bundle(quant=quant, out=work / f"bundle-{method}-{setting}")
    specs = [CandidateSpec(bundle=good, name="correct")]
    changes = {}
    for fault in FAULTS:
        if setting not in fault.settings:
            continue
        broken = work / f"broken-{method}-{setting}-{fault.name}"
        changes[fault.name] = inject(good, fault, broken)
        specs.append(CandidateSpec(bundle=broken, name=fault.name))
    report = validate(fp_bundle, specs, work / f"report-{method}-{setting}", config, progress=False)
    rows = {}
    for cand in report.to_json()["candidates"]:
        rows[cand["name"]] = {"verdict": _verdict(cand), "failures": [f for f in report.failures()
                                                                      if f.startswith(cand["name"] + " ")][:3],
                              "change": changes.get(cand["name"])}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or builtin: name (default: the embedded model)")
    parser.add_argument("--methods", default="rtn,gptq,awq,qvlm")
    parser.add_argument("--settings", default="w8a8,w4a16")
    parser.add_argument("--eval-samples", type=int, default=24)
    parser.add_argument("--text-tokens", type=int, default=3072, help="English text scored per candidate (real LMs)")
    parser.add_argument("--work", default="runs/fault-injection")
    parser.add_argument("--json", default="docs/fault_injection.json")
    args = parser.parse_args()
    work = Path(args.work)
    config = ValidateConfig(eval_samples=args.eval_samples, text_tokens=args.text_tokens)
    fp_bundle = export_bundle(model=args.model, out=work / "bundle-fp")
    results, start = {}, time.perf_counter()
    for method in args.methods.split(","):
        for setting in args.settings.split(","):
            results[f"{method}-{setting}"] = run_case(method, setting, fp_bundle, work, config, args.model)
    summarise(results, args.json, time.perf_counter() - start)


def summarise(results: dict, json_path: str, seconds: float) -> None:
    cases = list(results)
    table = Table(title="validate on broken bundles (verdict per method-setting)")
    for col in ("fault", "target", *cases):
        table.add_column(col)
    targets = {f.name: f.target for f in FAULTS}
    for name in ["correct", *targets]:
        table.add_row(name, targets.get(name, "-"), *(results[c].get(name, {}).get("verdict", "n/a") for c in cases))
    injected = [(c, n) for c in cases for n in results[c] if n != "correct"]
    detected = sum(results[c][n]["verdict"] != "pass" for c, n in injected)
    false_alarms = sum(results[c]["correct"]["verdict"] != "pass" for c in cases)
    Console().print(table)
    print(f"detected {detected}/{len(injected)} injected faults; false alarms {false_alarms}/{len(cases)} "
          f"correct bundles; {seconds:.0f} s")
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"detected": detected, "injected": len(injected),
                                           "false_alarms": false_alarms, "correct_bundles": len(cases),
                                           "seconds": round(seconds, 1), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
