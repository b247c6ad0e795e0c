"""ONNX Runtime fast vs faithful sessions: accuracy and logit error against the PyTorch simulated model.

For each setting (default W8A8 and W4A16): quantize the model with ``<method>-<setting>``
(RTN by default), export the bundle, then answer the first ``--samples`` eval questions
with the simulated PyTorch model and with both ORT session modes. Reported per mode:
accuracy, its delta to PyTorch, the share of answers identical to PyTorch's, and the max
absolute error of the first-answer-token logits (centred per sample, as
``evaluate/logits.py`` defines them) against PyTorch, also as a fraction of the logit range.
Weight-only settings add ``fast`` with ``int4_accuracy=1`` (MatMulNBits in fp32 instead of
ORT's default int8 activations).

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_ort_modes.py --samples 100 --json bench_ort_modes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def torch_reference(state_dir: Path, samples, batch_size: int) -> tuple[list[str], np.ndarray]:
    from qvlm_export.evaluate.logits import next_token_logits
    from qvlm_export.evaluate.torch_answerer import TorchAnswerer
    from qvlm_export.quant.simulate import load_simulated

    vlm, _ = load_simulated(state_dir)
    answers = []
    for start in range(0, len(samples), batch_size):
        answers += TorchAnswerer(vlm).answer(samples[start:start + batch_size])
    return answers, next_token_logits(vlm, samples, batch_size).numpy()


def ort_mode(bundle: Path, mode: str, samples, batch_size: int, threads: int,
             int4_accuracy: int | None = None) -> tuple[list[str], np.ndarray, float]:
    from qvlm_export.runtime.factory import answerer_for_bundle

    answerer, _ = answerer_for_bundle(bundle, mode=mode, threads=threads, int4_accuracy=int4_accuracy)
    start_time = time.perf_counter()
    with answerer:
        answers, logits = answerer.answer_with_logits(samples, batch_size)
    seconds = time.perf_counter() - start_time
    return answers, logits, seconds / len(samples) * 1e3


def bench_setting(setting: str, args, samples, work: Path) -> list[dict]:
    from qvlm_export.evaluate.accuracy import score
    from qvlm_export.export.api import export_bundle
    from qvlm_export.search.api import quantize

    state = quantize(model=args.model, recipe=f"{args.method}-{setting}", calib=args.calib,
                     out=work / f"quant-{setting}", progress=False, device="cpu")
    bundle = export_bundle(model=args.model, quant=state, out=work / f"bundle-{setting}")
    ref_answers, ref_logits = torch_reference(state, samples, args.batch_size)
    ref_acc = score(samples, ref_answers).overall
    span = float(np.ptp(ref_logits))
    rows = [{"setting": setting, "runner": "torch-simulated", "accuracy": ref_acc, "delta_accuracy": 0.0,
             "same_answers": 1.0, "max_logit_error": 0.0, "relative_logit_error": 0.0, "ms_per_sample": None}]
    variants = [("faithful", None, "faithful"), ("fast", None, "fast")]
    if setting.endswith("a16"):  # int4 MatMulNBits: also its fp32 accuracy level
        variants.append(("fast", 1, "fast-int4fp32"))
    for mode, int4_accuracy, label in variants:
        answers, logits, ms = ort_mode(bundle, mode, samples, args.batch_size, args.threads, int4_accuracy)
        error = float(np.abs(logits - ref_logits).max())
        acc = score(samples, answers).overall
        rows.append({"setting": setting, "runner": f"onnxruntime-{label}", "accuracy": acc,
                     "delta_accuracy": acc - ref_acc,
                     "same_answers": float(np.mean([a == b for a, b in zip(answers, ref_answers)])),
                     "max_logit_error": error, "relative_logit_error": error / span, "ms_per_sample": ms})
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("setting", "runner", "accuracy", "Δ acc", "same answers", "max |Δlogit|", "/ range", "ms/sample"):
        table.add_column(column, justify="left" if column in ("setting", "runner") else "right")
    for r in rows:
        ms = "-" if r["ms_per_sample"] is None else f"{r['ms_per_sample']:.1f}"
        table.add_row(r["setting"], r["runner"], f"{r['accuracy']:.4f}", f"{r['delta_accuracy']:+.4f}",
                      f"{r['same_answers']:.3f}", f"{r['max_logit_error']:.2e}", f"{r['relative_logit_error']:.2e}", ms)
    Console().print(table)


def main() -> None:
    import tempfile

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.manifest import library_versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF LLaVA directory (default: the embedded model)")
    parser.add_argument("--settings", default="w8a8,w4a16")
    parser.add_argument("--method", default="rtn", help="recipe method: rtn | smoothquant | awq | gptq | qvlm")
    parser.add_argument("--calib", default="builtin:calib:32")
    parser.add_argument("--samples", type=int, default=100, help="first N questions of builtin:eval")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--work", default=None, help="directory for quant states and bundles (default: temporary)")
    parser.add_argument("--json", default="bench_ort_modes.json", help="where to write the rows")
    args = parser.parse_args()

    samples = load_dataset(f"builtin:eval:{args.samples}")
    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp:
        work = Path(args.work or tmp)
        rows = [row for setting in args.settings.split(",") for row in bench_setting(setting, args, samples, work)]
    title = f"ONNX Runtime fast vs faithful ({args.method}, {len(samples)} eval samples, {args.threads} thread(s))"
    print_table(rows, title)
    Path(args.json).write_text(json.dumps({"title": title, "libraries": library_versions(), "rows": rows},
                                          indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
