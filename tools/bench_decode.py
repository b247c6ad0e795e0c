"""Decode benchmark on ONNX Runtime CPU: tokens/s, where each step goes, and the byte limit.

For every bundle (FP32 and quantized decoders of one model, at one or more cut depths) and
every runtime variant, a fresh process loads the decoder in ``fast`` mode, prefills a
``--prompt``-token prompt of random embeddings, then runs ``--steps`` one-token steps; this is
repeated ``--repeats`` times and the fastest repeat kept (contention only slows a run down), with
the spread (slowest / fastest) reported beside it. A last run under ORT's profiler splits a step
into weights / attention / KV concat / activation Q-DQ / other / session overhead, and by decoder
layer (``qvlm_export/runtime/ort_profile.py``).

Extrapolation to the full depth uses the profiled per-layer share of the timed step, not the
difference of two noisy totals: ``t(L) = t(d) + (L - d) * layer_share * t(d) / d``.
The byte limit is the ratio of weight bytes read per token (decoder Linears + lm_head) at the
full depth: what a purely memory-bound decode would gain over FP32.

Variants: ``run`` (``session.run`` with numpy feeds: KV copied in and out each step), ``bound``
(IO binding, KV left in ORT: what ``qvlm_export``'s runner does), ``bound-acc1`` (bound, int4
MatMulNBits at accuracy level 1: fp32 activations), ``bound-nospin`` (bound, ORT's thread pool
sleeps instead of spinning between kernels).

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_decode.py /tmp/bench-decode/b-2-* --full-layers 32 \
        --json docs/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"run": {"bound": False, "int4_accuracy": None},
            "bound": {"bound": True, "int4_accuracy": None},
            "bound-acc1": {"bound": True, "int4_accuracy": 1},
            "bound-nospin": {"bound": True, "int4_accuracy": None, "spin": False}}
LAYER = re.compile(r"layers\.(\d+)\.")
ONNX_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2, 21: 0.5, 22: 0.5}


def weight_bytes(graph: Path) -> dict:
    """Initializer bytes of a decoder graph: per decoder layer (mean) and the rest (lm_head, norms)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    per_layer: dict[int, float] = {}
    rest = 0.0
    for init in model.graph.initializer:
        size = ONNX_BYTES.get(init.data_type, 4)
        for d in init.dims:
            size *= d
        match = LAYER.search(init.name)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0.0) + size
        else:
            rest += size
    return {"layer": sum(per_layer.values()) / max(len(per_layer), 1), "rest": rest, "depth": len(per_layer)}


def worker(bundle: Path, variant: str, prompt: int, steps: int, threads: int, repeats: int, profile_steps: int) -> dict:
    """Runs in its own process: timed repeats, then one profiled run."""
    import onnxruntime as ort

    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.decode_speed import time_decode
    from qvlm_export.runtime.ort_decode import bound_decode
    from qvlm_export.runtime.ort_profile import summarise_trace
    from qvlm_export.runtime.ort_runner import session_options

    info, spec = read_bundle(bundle), VARIANTS[variant]
    names = info.past_names()

    def stepper(session):
        if spec["bound"]:
            return lambda e, m, p, past: bound_decode(session, info, e, m, p, past)[1]
        return lambda e, m, p, past: session.run(None, {"inputs_embeds": e, "attention_mask": m, "position_ids": p,
                                                        **dict(zip(names, past))})[1:]

    def session(profile_dir: str | None = None):
        options = session_options("fast", threads, spec["int4_accuracy"])
        if not spec.get("spin", True):  # idle pool threads sleep instead of spinning (a loaded machine)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "decode")
        return ort.InferenceSession(str(info.graph_path("decoder")), options, providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    timed_session = session()
    load = time.perf_counter() - t0
    timing = time_decode(stepper(timed_session), info, prompt, steps, repeats)
    del timed_session
    with tempfile.TemporaryDirectory() as tmp:
        profiled = session(tmp)
        time_decode(stepper(profiled), info, prompt, profile_steps, repeats=1)
        trace = json.loads(Path(profiled.end_profiling()).read_text())
    profile = summarise_trace(trace, skip_runs=2)  # the prefill and the first decode step
    return {"bundle": str(bundle), "setting": info.setting, "variant": variant, "depth": info.model.num_layers,
            "load_s": load, "prefill_s": list(timing.prefill_s), "step_s": list(timing.step_s), "profile": profile,
            "weights": weight_bytes(info.graph_path("decoder"))}


def measure(bundle: Path, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(bundle), variant, str(args.prompt), str(args.steps),
           str(args.threads), str(args.repeats), str(args.profile_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"worker failed for {bundle} {variant}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def derive(row: dict, full_layers: int) -> dict:
    """Fastest step, spread, per-layer share from the profile, and the extrapolation to ``full_layers``."""
    best, worst = min(row["step_s"]), max(row["step_s"])
    prof = row["profile"]
    layer_share = sum(prof["layers_ms"].values()) / prof["run_ms"]
    per_layer = layer_share * best / row["depth"]
    full = best + (full_layers - row["depth"]) * per_layer
    w = row["weights"]
    return {"tokens_per_s": 1 / best, "spread": worst / best, "per_layer_ms": per_layer * 1e3,
            "tokens_per_s_full": 1 / full, "weight_bytes_full": w["rest"] + full_layers * w["layer"],
            "prefill_s": min(row["prefill_s"]),
            "kinds_share": {k: v / prof["run_ms"] for k, v in prof["kinds_ms"].items()}}


def report(rows: list[dict], full_layers: int) -> dict:
    for row in rows:
        row["derived"] = derive(row, full_layers)
    fp = {(r["depth"], r["variant"]): r["derived"] for r in rows if r["setting"] == "fp"}
    fp_run = {r["depth"]: r["derived"] for r in rows if r["setting"] == "fp" and r["variant"] == "run"}
    for row in rows:
        d = row["derived"]
        ref = fp.get((row["depth"], row["variant"])) or fp_run.get(row["depth"])
        if ref:
            d["x_fp_full"] = d["tokens_per_s_full"] / ref["tokens_per_s_full"]
            # the ratio's range when either run could be off by its own spread
            d["x_fp_full_range"] = [d["x_fp_full"] / d["spread"], d["x_fp_full"] * ref["spread"]]
            d["byte_limit_full"] = ref["weight_bytes_full"] / d["weight_bytes_full"]
            d["of_byte_limit"] = d["x_fp_full"] / d["byte_limit_full"]
    return {"rows": rows, "full_layers": full_layers}


def print_table(result: dict, args) -> None:
    L = result["full_layers"]
    print(f"decode on ONNX Runtime CPU (fast), prompt {args.prompt} + {args.steps} steps, {args.threads} threads, "
          f"best of {args.repeats} (spread = slowest/fastest); x FP is against FP32 with the same variant")
    head = (f"{'setting':<14}{'variant':<11}{'depth':>5}{'tok/s':>8}{'spread':>7}{'ms/layer':>9}{'tok/s@' + str(L):>10}"
            f"{'x FP@' + str(L):>8}{'range':>12}{'limit':>7}{'of lim':>7}{'prefill s':>10}   step: "
            "weights/attn/kv/qdq/other/session %")
    print(head)
    for r in result["rows"]:
        d = r["derived"]
        rng = "-" if "x_fp_full" not in d else f"{d['x_fp_full_range'][0]:.2f}-{d['x_fp_full_range'][1]:.2f}"
        share = "/".join(f"{100 * d['kinds_share'][k]:.0f}" for k in ("weights", "attention", "kv", "qdq", "other",
                                                                      "session"))
        print(f"{r['setting'] + r.get('tag', ''):<14}{r['variant']:<11}{r['depth']:>5}{d['tokens_per_s']:>8.2f}"
              f"{d['spread']:>7.2f}{d['per_layer_ms']:>9.1f}{d['tokens_per_s_full']:>10.3f}"
              f"{d.get('x_fp_full', float('nan')):>8.2f}{rng:>12}{d.get('byte_limit_full', float('nan')):>7.2f}"
              f"{d.get('of_byte_limit', float('nan')):>7.0%}{d['prefill_s']:>10.2f}   {share}")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        bundle, variant, *nums = sys.argv[2:]
        print(json.dumps(worker(Path(bundle), variant, *map(int, nums))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", type=Path, nargs="+", help="exported bundles (FP32 and quantized, any depths)")
    parser.add_argument("--variants", nargs="+", default=["run", "bound"], choices=sorted(VARIANTS))
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--full-layers", type=int, default=32, help="depth to extrapolate to (LLaVA-1.5-7B: 32)")
    parser.add_argument("--json", type=Path, default=Path("bench_decode.json"))
    args = parser.parse_args()
    rows = []
    for bundle in args.bundles:
        for variant in args.variants:
            rows.append(measure(bundle, variant, args))
            rows[-1]["tag"] = bundle.name.split("-", 2)[-1].replace(rows[-1]["setting"], "")
            print(f"measured {bundle.name} {variant}: {1 / min(rows[-1]['step_s']):.2f} tok/s", file=sys.stderr)
    result = report(rows, args.full_layers)
    result["settings"] = vars(args) | {"bundles": [str(b) for b in args.bundles], "json": str(args.json)}
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(result, args)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
