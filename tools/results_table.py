"""Regenerate docs/results.md and docs/results.json: every method at every setting on the embedded model.

    python tools/results_table.py                       # fp + rtn, smoothquant, awq, gptq x all settings
    python tools/results_table.py --methods qvlm        # run only these, merge into the existing JSON
    python tools/results_table.py --methods rtn --settings w8a8,w4a16 --states-dir runs/states

Each row is exactly what the CLI reproduces::

    qvlm-export quantize --recipe <method>-<setting> --out S && qvlm-export eval --quant S

``accuracy`` is greedy exact match on the eval split (default builtin:eval, 500 questions);
``logit_sqnr_db`` is defined in :mod:`qvlm_export.evaluate.logits` (centred first-answer-token
logits vs the FP model on all of builtin:eval); ``search_seconds`` is the wall time of the
calibration walk recorded in the quant state (CPU unless a GPU was used; see the manifest).
Rows: ``{"method", "setting", "deployable", "accuracy", "accuracy_ci", "logit_sqnr_db", "logit_sqnr_ci",
"search_seconds", "per_question": {"correct": "0101...", "logit_noise": [...]}}``; the FP row has setting
``fp``, SQNR null, search time 0 and ``per_question.logit_signal`` (the per-question terms let the table
compare any two rows on the same questions without re-running them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from qvlm_export.errors import QvlmError
from qvlm_export.quant.recipe import METHODS, RECIPES_DIR, SETTINGS

BASELINES = ("rtn", "smoothquant", "awq", "gptq")
DOCS = Path(__file__).resolve().parent.parent / "docs"
EVAL_BATCH = 32  # `qvlm-export eval`'s default: batch composition changes left padding, so keep it identical


def fp_row(model: str | None, eval_data: str) -> tuple[dict, object]:
    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.backends import make_answerer

    answerer, _ = make_answerer(model=model)
    result = evaluate(answerer, load_dataset(eval_data), batch_size=EVAL_BATCH, progress=False)
    return {"method": "fp", "setting": "fp", "deployable": True, **accuracy_fields(result),
            "logit_sqnr_db": None, "search_seconds": 0.0,
            "per_question": {"correct": "".join("1" if c else "0" for c in result.correct)}}, answerer.vlm


def quant_row(method: str, setting: str, model: str | None, calib: str, eval_data: str, sqnr_data: str,
              fp_logits, states_dir: Path) -> dict:
    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.evaluate.accuracy import evaluate
    from qvlm_export.evaluate.backends import make_answerer
    from qvlm_export.evaluate.intervals import pooled_sqnr_db, sqnr_terms, sqnr_terms_interval
    from qvlm_export.evaluate.logits import next_token_logits
    from qvlm_export.search.api import quantize

    state = quantize(model=model, recipe=f"{method}-{setting}", calib=calib, out=states_dir / f"{method}-{setting}",
                     progress=False)
    seconds = json.loads((state / "manifest.json").read_text())["search_seconds"]
    answerer, info = make_answerer(model=model, quant=str(state))
    result = evaluate(answerer, load_dataset(eval_data), batch_size=EVAL_BATCH, progress=False)
    signal, noise = sqnr_terms(fp_logits, next_token_logits(answerer.vlm, load_dataset(sqnr_data)))
    lo, hi = sqnr_terms_interval(signal, noise)
    return {"method": method, "setting": setting, "deployable": bool(info["deployable"]), **accuracy_fields(result),
            "logit_sqnr_db": round(pooled_sqnr_db(signal, noise), 2), "logit_sqnr_ci": [round(lo, 2), round(hi, 2)],
            "search_seconds": round(float(seconds), 2),
            "per_question": {"correct": "".join("1" if c else "0" for c in result.correct),
                             "logit_noise": [float(f"{v:.5g}") for v in noise.tolist()]}}


def accuracy_fields(result) -> dict:
    lo, hi = result.interval()
    return {"accuracy": round(result.overall, 4), "accuracy_ci": [round(lo, 4), round(hi, 4)]}


def order_key(row: dict) -> tuple[int, int]:
    settings = ["fp", *SETTINGS]
    methods = list(METHODS)
    return (settings.index(row["setting"]) if row["setting"] in settings else len(settings),
            methods.index(row["method"]) if row["method"] in methods else len(methods))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with rows of the same (method, setting) replaced by ``new``, in table order."""
    fresh = {(r["method"], r["setting"]) for r in new}
    return sorted([r for r in old if (r["method"], r["setting"]) not in fresh] + new, key=order_key)


def paired_vs(row: dict, other: dict, signal: list[float] | None) -> str:
    """``other`` minus ``row`` on the same questions: SQNR difference [95% CI], accuracy points, McNemar p."""
    from qvlm_export.evaluate.intervals import mcnemar_p, paired_sqnr_difference_interval

    a, b = row.get("per_question"), other.get("per_question")
    if not a or not b or signal is None or "logit_noise" not in a or "logit_noise" not in b:
        return ""
    lo, hi = paired_sqnr_difference_interval(signal, b["logit_noise"], a["logit_noise"])
    ca, cb = [c == "1" for c in a["correct"]], [c == "1" for c in b["correct"]]
    d_sqnr = other["logit_sqnr_db"] - row["logit_sqnr_db"]
    return (f"{d_sqnr:+.2f} [{lo:+.2f}, {hi:+.2f}] dB, {100 * (other['accuracy'] - row['accuracy']):+.1f} pts "
            f"(p={mcnemar_p(cb, ca):.2g})")


def render_markdown(rows: list[dict], eval_data: str, sqnr_data: str, model_digest: str) -> str:
    fp = next((r for r in rows if r["method"] == "fp"), None)
    signal = (fp or {}).get("per_question", {}).get("logit_signal")
    lines = [
        "# Simulated-quantization results on the embedded model",
        "",
        "Generated by `python tools/results_table.py` (do not edit by hand).",
        f"Model: the embedded tiny-llava-shapes (files digest `{model_digest[:16]}`).",
        f"Accuracy: greedy exact match on `{eval_data}` with its Wilson 95% interval. Logit SQNR (the primary",
        f"figure): centred first-answer-token logits vs FP on `{sqnr_data}` (defined in",
        "`qvlm_export/evaluate/logits.py`), with a bootstrap 95% interval over questions. *Q-VLM minus this*:",
        "the paired comparison on the same questions: SQNR difference with its paired bootstrap 95% interval,",
        "accuracy difference and the exact McNemar p (an interval that excludes 0 / p < 0.05 separates the two).",
        "Search: calibration wall time.",
        "Every row is `qvlm-export quantize --recipe <method>-<setting>` then `qvlm-export eval --quant`.",
        "*deployable* settings run on TensorRT / ONNX Runtime integer kernels; *simulated* ones only as fake-quant.",
        "",
        "| setting | kind | method | accuracy [95% CI] | vs FP | logit SQNR dB [95% CI] | Q-VLM minus this (paired) "
        "| search (s) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        kind = "reference" if r["method"] == "fp" else ("deployable" if r["deployable"] else "simulated")
        delta = "" if fp is None or r["method"] == "fp" else f"{100 * (r['accuracy'] - fp['accuracy']):+.1f}"
        sqnr = "" if r["logit_sqnr_db"] is None else f"{r['logit_sqnr_db']:.2f}"
        if r.get("logit_sqnr_ci"):
            sqnr += f" [{r['logit_sqnr_ci'][0]:.2f}, {r['logit_sqnr_ci'][1]:.2f}]"
        acc = f"{100 * r['accuracy']:.1f}"
        if r.get("accuracy_ci"):
            acc += f" [{100 * r['accuracy_ci'][0]:.1f}, {100 * r['accuracy_ci'][1]:.1f}]"
        qvlm = next((o for o in rows if o["method"] == "qvlm" and o["setting"] == r["setting"]), None)
        vs = paired_vs(r, qvlm, signal) if qvlm is not None and r["method"] not in ("qvlm", "fp") else ""
        lines.append(f"| {r['setting']} | {kind} | {r['method']} | {acc} | {delta} | {sqnr} | {vs} "
                     f"| {r['search_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated subset (fp, rtn, smoothquant, awq, gptq, qvlm, qig, qvit, "
                        "qvlm_plus); "
                        "rows are merged into the existing results.json")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings")
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    parser.add_argument("--calib", default="builtin:calib")
    parser.add_argument("--eval-data", default="builtin:eval")
    parser.add_argument("--sqnr-data", default=None, help="logit-SQNR data (default: builtin:eval, all 500)")
    parser.add_argument("--states-dir", default=None, help="keep the quant states here (default: a temp dir)")
    parser.add_argument("--out-dir", default=str(DOCS))
    args = parser.parse_args(argv)

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.evaluate.intervals import sqnr_terms
    from qvlm_export.evaluate.logits import LOGIT_SQNR_DATA, next_token_logits

    sqnr_data = args.sqnr_data or LOGIT_SQNR_DATA
    methods = args.methods.split(",") if args.methods else ["fp", *BASELINES]
    settings = args.settings.split(",")
    unknown = [m for m in methods if m not in METHODS] + [s for s in settings if s not in SETTINGS]
    if unknown:
        print(f"error: unknown method or setting {unknown[0]!r}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    json_path = out_dir / "results.json"
    rows: list[dict] = []
    fp, fp_vlm = fp_row(args.model, args.eval_data)
    if "fp" in methods:
        rows.append(fp)
        print(f"{'fp':12s} {'fp':6s} acc {fp['accuracy']:.4f}", flush=True)
    fp_logits = next_token_logits(fp_vlm, load_dataset(sqnr_data))
    fp["per_question"]["logit_signal"] = [float(f"{v:.5g}") for v in sqnr_terms(fp_logits, fp_logits)[0].tolist()]
    with tempfile.TemporaryDirectory() as tmp:
        states = Path(args.states_dir) if args.states_dir else Path(tmp)
        for method in (m for m in methods if m != "fp"):
            for setting in settings:
                if not (RECIPES_DIR / f"{method}-{setting}.yaml").is_file():
                    print(f"skip {method}-{setting}: no recipe in {RECIPES_DIR}", file=sys.stderr)
                    continue
                start = time.perf_counter()
                try:
                    row = quant_row(method, setting, args.model, args.calib, args.eval_data, sqnr_data,
                                    fp_logits, states)
                except QvlmError as exc:
                    print(f"error: {method}-{setting}: {exc}", file=sys.stderr)
                    return 2
                rows.append(row)
                print(f"{method:12s} {setting:6s} acc {row['accuracy']:.4f}  sqnr {row['logit_sqnr_db']:6.2f} dB  "
                      f"search {row['search_seconds']:6.1f} s  ({time.perf_counter() - start:.0f} s)", flush=True)
    old = json.loads(json_path.read_text()) if args.methods and json_path.is_file() else []
    merged = merge(old, rows)
    from qvlm_export.manifest import atomic_write_text

    atomic_write_text(json_path, json.dumps(merged, indent=2) + "\n")
    from qvlm_export.load.model import resolve_model_path
    from qvlm_export.manifest import digest, hash_tree

    model_digest = digest(hash_tree(resolve_model_path(args.model)))
    atomic_write_text(out_dir / "results.md", render_markdown(merged, args.eval_data, sqnr_data, model_digest))
    print(f"wrote {json_path} and {out_dir / 'results.md'} ({len(merged)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
