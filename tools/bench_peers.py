"""Peers side by side, one process: ONNX Runtime's and ModelOpt's quantizers vs qvlm-export on one FP bundle.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench_peers.py --modelopt-python /path/to/modelopt-venv/bin/python

Every row starts from the same FP bundle of the embedded model (``qvlm-export export``),
calibrates on the same ``builtin:calib`` images (peers get the graph feeds our runtime
produced on them) and is answered by the same runtime (ONNX Runtime, ``faithful``
sessions: each graph's own arithmetic) on the same ``builtin:eval`` questions. Ours are
``qvlm-export quantize --recipe qvlm-<setting>`` + ``qvlm-export export``. Columns: accuracy
with its Wilson 95% interval; the paired comparison with ours at the same setting (the
difference's bootstrap interval and exact McNemar p over the same questions); logit SQNR
of the first answer token vs the FP bundle (pooled, centred, bootstrap interval); graph
bytes; decode tokens/s in ``fast`` sessions relative to the FP bundle, measured in this run.
A peer that cannot run on a graph gets a row saying why. Writes docs/peers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from peer_quantizers import (
    PeerFailed,
    modelopt_graph,
    ort_nbits_graph,
    ort_static_graph,
    quantize_bundle,
    record_feeds,
)

from qvlm_export.evaluate.intervals import (
    mcnemar_p,
    paired_difference_interval,
    paired_sqnr_difference_interval,
    sqnr_interval,
    sqnr_terms,
    wilson_interval,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODELOPT_WORKING = {"op_types_to_quantize": ["MatMul", "Gemm"], "disable_mha_qdq": True}


def peers(modelopt_python: Path | None) -> list[tuple[str, str, str, object]]:
    """(name, setting, options shown in the table, graph quantizer or None with the reason)."""
    rows = []
    for calibration in ("MinMax", "Entropy", "Percentile"):
        histogram = calibration != "MinMax"
        rows.append((f"ORT quantize_static {calibration} (defaults)", "w8a8", "QDQ, per_channel",
                     partial(ort_static_graph, calibration=calibration.lower())))
        rows.append((f"ORT quantize_static {calibration}", "w8a8",
                     "QDQ, per_channel, op_types_to_quantize=[MatMul, Gemm]"
                     + (", calibrated on equal-shape feeds" if histogram else ""),
                     partial(ort_static_graph, calibration=calibration.lower(), op_types=["MatMul", "Gemm"],
                             same_shape=histogram)))
    rows += [
        ("ORT MatMulNBits RTN", "w4a16", "block 128, symmetric", partial(ort_nbits_graph, algorithm="rtn")),
        ("ORT MatMulNBits HQQ", "w4a16", "block 128", partial(ort_nbits_graph, algorithm="hqq")),
        ("ORT MatMulNBits GPTQ", "w4a16", "block 128, recorded feeds", partial(ort_nbits_graph, algorithm="gptq")),
    ]
    for name, setting, mode, options in (("ModelOpt int8 (defaults)", "w8a8", "int8", {}),
                                         ("ModelOpt int8", "w8a8", "int8", MODELOPT_WORKING),
                                         ("ModelOpt int4 awq_clip", "w4a16", "int4", {})):
        shown = (", ".join(f"{k}={v}" for k, v in options.items()) or "defaults") + ", calibrated on equal-shape feeds"
        quantizer = (partial(modelopt_graph, mode=mode, python=modelopt_python, options=options)
                     if modelopt_python else "ModelOpt not installed (pass --modelopt-python)")
        rows.append((name, setting, shown, quantizer))
    return rows


def answer_bundle(bundle: Path, samples, batch_size: int) -> tuple[list[bool], np.ndarray]:
    """Per-question exact match and centred first-answer-token logits, ORT faithful sessions."""
    from qvlm_export.evaluate.accuracy import score
    from qvlm_export.runtime.factory import answerer_for_bundle

    answerer, _ = answerer_for_bundle(bundle, mode="faithful")
    with answerer:
        predictions, logits = answerer.answer_with_logits(samples, batch_size)
    return score(samples, predictions).correct, logits


def decode_speed(bundle: Path, samples, steps: int = 16, repeats: int = 3) -> float:
    """Decoder tokens/s of a batch of 8 in ``fast`` sessions (median of ``repeats``), after one warm-up."""
    from qvlm_export.runtime.factory import answerer_for_bundle
    from qvlm_export.runtime.generate import position_ids, prompt_embeds
    from qvlm_export.runtime.images import image_inputs

    answerer, _ = answerer_for_bundle(bundle, mode="fast")
    runner = answerer.runner
    feeds = answerer.inputs([s.image for s in samples[:8]], [s.question for s in samples[:8]])
    runner.activate()
    try:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        embeds = prompt_embeds(runner, ids, image_inputs(runner.info, feeds))
        times = []
        for _ in range(repeats + 1):
            logits, past = runner.decode(embeds, mask, position_ids(mask), runner.info.empty_past(len(ids)))
            m = mask
            start = time.perf_counter()
            for _ in range(steps):
                nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
                m = np.concatenate([m, np.ones((len(ids), 1), np.int64)], axis=1)
                logits, past = runner.decode(runner.embed(nxt), m, position_ids(m, past=m.shape[1] - 1), past)
            times.append(time.perf_counter() - start)
        return len(ids) * steps / statistics.median(times[1:])
    finally:
        runner.deactivate()


def graph_bytes(bundle: Path) -> int:
    from qvlm_export.runtime.bundle import read_bundle

    info = read_bundle(bundle)
    total = 0
    for g, io in info.graphs.items():
        total += info.graph_path(g).stat().st_size + ((bundle / io.data_file).stat().st_size if io.data_file else 0)
    return total


def measure(name: str, setting: str, options: str, bundle: Path, samples, fp: dict, ours: dict | None,
            batch_size: int) -> dict:
    correct, logits = answer_bundle(bundle, samples, batch_size)
    k, n = sum(correct), len(correct)
    row = {"peer": name, "setting": setting, "options": options, "accuracy": k / n,
           "accuracy_ci": wilson_interval(k, n), "logit_sqnr_db": _sqnr(fp["logits"], logits),
           "logit_sqnr_ci": sqnr_interval(fp["logits_t"], _t(logits)), "graph_bytes": graph_bytes(bundle),
           "decode_tok_s": fp["decode_tok_s"] if ours is None and setting == "fp" else decode_speed(bundle, samples),
           "error": None}
    row["decode_vs_fp"] = row["decode_tok_s"] / fp["decode_tok_s"] if fp.get("decode_tok_s") else 1.0
    signal, noise = sqnr_terms(fp["logits_t"], _t(logits))
    if ours is not None:
        row["vs_ours_diff_ci"] = paired_difference_interval(correct, ours["correct"])
        row["vs_ours_mcnemar_p"] = mcnemar_p(correct, ours["correct"])
        row["vs_ours_sqnr_ci"] = paired_sqnr_difference_interval(signal, noise, ours["noise"])
    row["_noise"] = noise
    row["_correct"], row["_logits"] = correct, logits
    return row


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - approx) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref.astype(np.float64) ** 2) / noise))


def ours(setting: str, work: Path, states: Path | None) -> Path:
    from qvlm_export.export.api import export_bundle
    from qvlm_export.search.api import quantize

    state = (states or work) / f"qvlm-{setting}"
    if not (state / "manifest.json").is_file():
        quantize(recipe=f"qvlm-{setting}", out=state, progress=False)
    return export_bundle(quant=state, out=work / f"ours-{setting}")


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.export.api import export_bundle

    samples = load_dataset(args.eval_data)
    fp_bundle = export_bundle(out=work / "fp", dtype="fp32")
    correct, logits = answer_bundle(fp_bundle, samples, args.batch_size)
    fp = {"logits": logits, "logits_t": _t(logits), "decode_tok_s": decode_speed(fp_bundle, samples)}
    rows = [measure("FP (reference)", "fp", "", fp_bundle, samples, fp, None, args.batch_size)]
    print(_line(rows[-1]), flush=True)
    mine: dict[str, dict] = {}
    for setting in ("w8a8", "w4a16"):
        rows.append(measure("qvlm-export Q-VLM", setting, f"recipe qvlm-{setting}", ours(setting, work, args.states_dir),
                            samples, fp, None, args.batch_size))
        mine[setting] = {"correct": rows[-1]["_correct"], "noise": rows[-1]["_noise"]}
        print(_line(rows[-1]), flush=True)
    feeds = record_feeds(fp_bundle, load_dataset(args.calib))
    for name, setting, options, quantizer in peers(args.modelopt_python):
        if args.only and not any(s.lower() in name.lower() for s in args.only.split(",")):
            continue
        try:
            if isinstance(quantizer, str):
                raise PeerFailed(quantizer)
            bundle = quantize_bundle(fp_bundle, work / name.replace(" ", "_"), feeds, quantizer)
            rows.append(measure(name, setting, options, bundle, samples, fp, mine[setting], args.batch_size))
        except PeerFailed as exc:
            rows.append({"peer": name, "setting": setting, "options": options, "error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - a peer graph that ORT cannot run is a finding, not a crash
            rows.append({"peer": name, "setting": setting, "options": options,
                         "error": f"runs but fails in ONNX Runtime: {' '.join(str(exc).split())[:300]}"})
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    if row.get("error"):
        return f"{row['peer']:34s} {row['setting']:6s} FAILED: {row['error']}"
    lo, hi = row["accuracy_ci"]
    return (f"{row['peer']:34s} {row['setting']:6s} acc {100 * row['accuracy']:5.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"SQNR {row['logit_sqnr_db']:6.2f} dB  {row['graph_bytes'] / 1e6:6.2f} MB  decode x{row['decode_vs_fp']:.2f}")


def render_markdown(rows: list[dict], command: str) -> str:
    lines = ["# qvlm-export vs the quantizers a user would otherwise run", "",
             f"Generated by `{command}` (one run, one machine; do not edit by hand).",
             "Same FP bundle of the embedded model, same `builtin:calib` calibration images, same 500 `builtin:eval`",
             "questions, same runtime (ONNX Runtime `faithful` sessions: each graph's own arithmetic). Accuracy with",
             "its Wilson 95% interval; *minus ours*: the peer minus qvlm-export's Q-VLM bundle at the same setting on",
             "the same questions (paired bootstrap 95% intervals of the logit-SQNR and accuracy differences, exact",
             "McNemar p; an SQNR interval below 0 means ours is closer to FP); logit SQNR of the first answer",
             "token vs FP (bootstrap 95% interval); decode: tokens/s of `fast` sessions relative to FP, same run.", "",
             "| setting | quantizer | options | accuracy [95% CI] | minus ours, paired: SQNR [95% CI]; accuracy [95% CI], p "
             "| logit SQNR dB [95% CI] "
             "| graph MB | decode vs FP |", "|---|---|---|---|---|---|---:|---:|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['setting']} | {r['peer']} | {r['options']} | fails: {r['error']} | | | | |")
            continue
        lo, hi = r["accuracy_ci"]
        sq = "" if r["setting"] == "fp" else (f"{r['logit_sqnr_db']:.2f} [{r['logit_sqnr_ci'][0]:.2f}, "
                                               f"{r['logit_sqnr_ci'][1]:.2f}]")
        vs = ""
        if "vs_ours_diff_ci" in r:
            d = 100 * (r["accuracy"] - next(o["accuracy"] for o in rows if o["peer"].startswith("qvlm-export")
                                             and o["setting"] == r["setting"]))
            ours_sqnr = next(o["logit_sqnr_db"] for o in rows if o["peer"].startswith("qvlm-export")
                             and o["setting"] == r["setting"])
            lo_s, hi_s = r["vs_ours_sqnr_ci"]
            vs = (f"{r['logit_sqnr_db'] - ours_sqnr:+.2f} [{lo_s:+.2f}, {hi_s:+.2f}] dB; "
                  f"{d:+.1f} [{100 * r['vs_ours_diff_ci'][0]:+.1f}, {100 * r['vs_ours_diff_ci'][1]:+.1f}] pts, "
                  f"p={r['vs_ours_mcnemar_p']:.3g}")
        lines.append(f"| {r['setting']} | {r['peer']} | {r['options']} | {100 * r['accuracy']:.1f} "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {vs} | {sq} | {r['graph_bytes'] / 1e6:.2f} "
                     f"| {r['decode_vs_fp']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modelopt-python", type=Path, default=None,
                        help="python of a virtual environment with nvidia-modelopt[onnx] (its own pins)")
    parser.add_argument("--eval-data", default="builtin:eval")
    parser.add_argument("--calib", default="builtin:calib")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--states-dir", type=Path, default=None, help="reuse/keep our quant states here")
    parser.add_argument("--only", default=None, help="comma-separated substrings of peer names to run")
    parser.add_argument("--out-dir", type=Path, default=DOCS)
    parser.add_argument("--work", type=Path, default=None, help="keep the bundles here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.modelopt_python and not args.modelopt_python.is_file():
        print(f"error: --modelopt-python {args.modelopt_python} does not exist", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run(args, work)
    command = "python tools/bench_peers.py" + (" --modelopt-python <modelopt venv>/bin/python" if args.modelopt_python else "")
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "peers.json").write_text(json.dumps({"command": command, "rows": public}, indent=2) + "\n")
    (args.out_dir / "peers.md").write_text(render_markdown(rows, command))
    print(f"wrote {args.out_dir / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
