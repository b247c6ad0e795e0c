"""Scale benchmark: quantize -> export -> ONNX Runtime decode on random-weight models at real widths.

Models have the widths of a real checkpoint (default LLaVA-1.5-7B: CLIP ViT-L/14 336px,
Llama-2-7B, vocab 32064, ``vision_feature_layer: -2``) and a cut depth, so they fit on a
small machine; two cut depths give the per-decoder-layer cost, extrapolated to the full
depth. Every stage runs in its own subprocess (the CLI, exactly as a user runs it) and is
measured for wall time and peak RSS (``ru_maxrss`` of that process). Decode speed: the
decoder graph alone on ONNX Runtime CPU in ``fast`` mode, a 600-token prompt then 64
decode steps, 2 threads. Prints tables and writes JSON.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_scale.py --work /tmp/bench-scale --json docs/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_scale_models as M  # noqa: E402


def measured(argv: list[str], log: Path) -> dict:
    """Run ``argv`` as a child of a fresh interpreter that reports the child's wall time and peak RSS."""
    probe = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT); "
             "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
             "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
    out = subprocess.run([sys.executable, "-c", probe, str(log), *argv], capture_output=True, text=True,
                         cwd=HERE.parent)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"stage failed ({' '.join(argv[:4])} ...): see {log}\n{log.read_text()[-2000:]}")
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qvlm_export", *args]


def recipe_file(work: Path, setting: str, samples: int) -> Path:
    path = work / f"rtn-{setting}.yaml"
    path.write_text(f"method: rtn\nsetting: {setting}\ncalibration: {{samples: {samples}, seed: 0, batch_size: 2}}\n")
    return path


def run_depth(args, work: Path, depth: int) -> dict:
    """Build one cut model and run every stage on it; returns the stage and decode records."""
    model = work / f"{args.arch}-d{depth}-{args.dtype}"
    if not (model / "config.json").is_file():
        M.build(args.arch, model, vision_layers=args.vision_layers, text_layers=depth, dtype=args.dtype)
    info = M.describe(model)
    record = {"depth": depth, "model": info, "stages": {}, "decode": {}, "graphs": {}}
    for setting in args.settings:
        quant = work / f"q-{depth}-{setting}"
        record["stages"][f"quantize {setting}"] = measured(
            cli("quantize", "--recipe", str(recipe_file(work, setting, args.calib_samples)), "--model", str(model),
                "--out", str(quant), "--calib", f"builtin:calib:{args.calib_samples}", "--device", "cpu",
                "--no-progress", "--dtype", "auto"), work / f"quantize-{depth}-{setting}.log")
    for setting in ["fp", *args.settings]:
        bundle = work / f"b-{depth}-{setting}"
        quant = [] if setting == "fp" else ["--quant", str(work / f"q-{depth}-{setting}")]
        record["stages"][f"export {setting}"] = measured(
            cli("export", "--model", str(model), *quant, "--out", str(bundle), "--dtype", "fp32"),
            work / f"export-{depth}-{setting}.log")
        record["graphs"][setting] = M.graph_bytes(bundle)
        record["decode"][setting] = json.loads(subprocess.run(
            [sys.executable, str(HERE / "bench_scale_models.py"), "decode", str(bundle), str(args.prompt),
             str(args.steps), str(args.threads)], capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).stdout.strip().splitlines()[-1])
    return record


def fp16_check(args, work: Path, depth: int) -> dict:
    """The fp32 checkpoint re-saved in fp16 (as llava-hf ships it): W4A16 quantize in fp16 (``--dtype auto``)
    and export to an fp16 graph (``--dtype auto``) with no fp32 copy; peak RSS against the fp16 model bytes."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, model = work / f"{args.arch}-d{depth}-fp32", work / f"{args.arch}-d{depth}-fp16"
    if not (model / "config.json").is_file():
        LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float16).save_pretrained(model)
        AutoProcessor.from_pretrained(src).save_pretrained(model)
    info = M.describe(model)
    quant, bundle = work / f"q-{depth}-w4a16-fp16", work / f"b-{depth}-w4a16-fp16"
    stages = {
        "quantize w4a16 fp16": measured(cli("quantize", "--recipe", str(recipe_file(work, "w4a16", 1)), "--model",
                                            str(model), "--out", str(quant), "--device", "cpu", "--no-progress"),
                                        work / "quantize-fp16.log"),
        "export w4a16 fp16": measured(cli("export", "--model", str(model), "--quant", str(quant), "--out", str(bundle),
                                          "--dtype", "auto"), work / "export-fp16.log"),
    }
    for row in stages.values():
        row["peak_over_model"] = round(row["peak_rss"] / info["bytes"], 2)
    return {"model": info, "stages": stages, "graphs": M.graph_bytes(bundle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llava-1.5-7b", choices=sorted(M.ARCHS))
    parser.add_argument("--depths", type=int, nargs=2, default=[1, 2], help="two decoder depths to cut to")
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", help="checkpoint dtype (fp32 | fp16 | bf16)")
    parser.add_argument("--settings", nargs="+", default=["w8a8", "w4a16"])
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=600)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--json", type=Path, default=Path("bench_scale.json"))
    parser.add_argument("--fp16-only", action="store_true",
                        help="only the fp16-checkpoint check at the deeper depth (needs the fp32 model of a full run)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.fp16_only:
        result = fp16_check(args, args.work, args.depths[1])
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        for name, row in result["stages"].items():
            print(f"{name:<22}{row['seconds']:>8.1f} s{row['peak_rss'] / 1e9:>8.2f} GB peak "
                  f"{row['peak_over_model']:>6.2f}x the {result['model']['bytes'] / 1e9:.2f} GB fp16 model")
        print(f"wrote {args.json}")
        return
    start = time.time()
    runs = [run_depth(args, args.work, d) for d in args.depths]
    report = M.summarise(args, runs)
    report["bench_seconds"] = round(time.time() - start, 1)
    report["machine"] = {"cpus": os.cpu_count(), "threads": args.threads,
                         "bench_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    M.print_tables(report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
