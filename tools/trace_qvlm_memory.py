"""Peak RSS and time of one ``quantize`` run, per phase (load, plan, each block-search start, search, save).

Runs ``qvlm_export.search.api.quantize`` in this process with a thread sampling ``VmRSS`` every
50 ms; chosen functions are wrapped so that each call records its seconds, the RSS when it began
and ended, and the peak RSS while it ran. The process stops itself (exit 3) when RSS passes
``--limit-gb``, so a run that would not fit leaves its trace up to that point.

    OMP_NUM_THREADS=1 .venv/bin/python tools/trace_qvlm_memory.py --model M --recipe qvlm-w8a8 \\
        --calib builtin:calib:2 --set iterations=2 --out /tmp/q --json trace.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import threading
import time
from pathlib import Path

# (module, attribute) wrapped; "Class.method" for methods. Names are looked up where they are called.
TRACED = [
    ("qvlm_export.load.model", "load_vlm"),
    ("qvlm_export.search.qvlm.method", "jacobian_norms"),
    ("qvlm_export.search.qvlm.method", "collect_probe_stats"),
    ("qvlm_export.search.qvlm.method", "search_block"),
    ("qvlm_export.quant.calibrate", "SequentialCalibrator._context"),
    ("qvlm_export.quant.calibrate", "SequentialCalibrator._propagate"),
    ("qvlm_export.search.qvlm.block_search", "input_statistics"),
    ("qvlm_export.search.qvlm.block_search", "rtn_block_error"),
    ("qvlm_export.search.qvlm.block_search", "choose_start"),
    ("qvlm_export.search.qvlm.block_search", "_optimise"),
    ("qvlm_export.search.qvlm.start", "rtn_start"),
    ("qvlm_export.search.qvlm.start", "gptq_start"),
    ("qvlm_export.search.qvlm.start", "collect_input_stats"),
    ("qvlm_export.search.qvlm.start", "gptq_quantize"),
    ("qvlm_export.quant.state", "QuantState.save"),
]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Background RSS sampling; ``open`` phases each track their own peak."""

    def __init__(self, limit: int, interval: float = 0.05):
        self.limit, self.interval, self.peak, self.open = limit, interval, 0, []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            now = rss()
            self.peak = max(self.peak, now)
            for rec in list(self.open):
                rec["peak_rss"] = max(rec["peak_rss"], now)
            if now > self.limit:
                print(f"RSS {now / 1e9:.2f} GB over the limit: stopping", flush=True)
                os._exit(3)
            time.sleep(self.interval)


def wrap(sampler: Sampler, records: list, label: str, fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        now = rss()
        rec = {"phase": label, "depth": len(sampler.open), "rss_in": now, "peak_rss": now}
        sampler.open.append(rec)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            rec["seconds"] = round(time.perf_counter() - start, 2)
            rec["rss_out"] = rss()
            rec["peak_rss"] = max(rec["peak_rss"], rec["rss_out"])
            sampler.open.remove(rec)
            records.append(rec)
            gb = 1e9
            print(f"{'  ' * rec['depth']}{label:<34}{rec['seconds']:>8.1f} s  in {rec['rss_in'] / gb:6.2f}  "
                  f"peak {rec['peak_rss'] / gb:6.2f}  out {rec['rss_out'] / gb:6.2f} GB", flush=True)
    return traced


def install(sampler: Sampler, records: list) -> None:
    for module_name, attr in TRACED:
        module = importlib.import_module(module_name)
        owner, name = (getattr(module, attr.split(".")[0]), attr.split(".")[1]) if "." in attr else (module, attr)
        setattr(owner, name, wrap(sampler, records, attr.split(".")[-1], getattr(owner, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", default="qvlm-w8a8")
    parser.add_argument("--calib", default="builtin:calib:2")
    parser.add_argument("--set", action="append", default=[], help="method_args key=value (YAML value)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--limit-gb", type=float, default=9.0)
    args = parser.parse_args()
    import dataclasses

    import torch
    import yaml

    from qvlm_export.quant.recipe import load_recipe
    from qvlm_export.search import api

    sampler, records = Sampler(int(args.limit_gb * 1e9)), []
    install(sampler, records)
    rec = load_recipe(args.recipe)
    samples = int(args.calib.rsplit(":", 1)[-1]) if args.calib.startswith("builtin:calib:") else rec.calibration.samples
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    rec = dataclasses.replace(rec, method_args={**rec.method_args, **extra, "progress": False},
                              calibration=dataclasses.replace(rec.calibration, samples=samples,
                                                              batch_size=min(rec.calibration.batch_size, samples)))
    start = time.perf_counter()
    api.quantize(model=args.model, recipe=rec, calib=args.calib, out=args.out, device="cpu", progress=False)
    result = {"recipe": args.recipe, "method_args": extra, "calib": args.calib, "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - start, 1), "peak_rss": sampler.peak, "phases": records}
    print(f"total {result['seconds']} s, peak RSS {sampler.peak / 1e9:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
