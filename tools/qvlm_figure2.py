"""Reproduce Q-VLM's Figure 2 on our model: DED against activation entropy over calibration samples.

    python tools/qvlm_figure2.py                       # embedded model, W4A4, middle decoder pair, 32 samples
    python tools/qvlm_figure2.py --setting w4a8 --layer model.vision_tower.encoder.layers.1 --samples 16

For each calibration sample alone: the FP inputs of units ``k`` and ``k+1`` are searched
layer-wise and jointly (``qvlm_export.search.qvlm.ded``), giving ``DED = E_layerwise -
E_joint`` at unit ``k+1``'s output; the x-axis is the sample's probe entropy
``H(X_q^(k))`` (and, second panel, its dependency ``D(k, k+1)``), with the probe scale
calibrated on all samples as in the search's plan. Both searches are the paper's (AdaRound
from round-to-nearest) and run to convergence by one rule: complete annealed runs at doubling
budgets (``--budgets``) until neither the layer-wise nor the joint error moves by more than
``--tol`` between budgets, for ``--seeds`` seeds averaged per sample. A least-squares line, its
R^2 and a bootstrap 95% interval of R^2 are reported whatever they are; the third panel shows
the convergence curves. Writes docs/figures/qvlm_fig2.png and .json (``--mode shared``:
one search on all samples, errors split per sample: qvlm_fig2_shared.png and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def fit_line(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares ``y = a + b x`` and its coefficient of determination R^2."""
    import numpy as np

    xa, ya = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(xa, ya, 1)
    resid = ya - (a + b * xa)
    total = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 0.0
    return {"intercept": float(a), "slope": float(b), "r2": r2}


def fit_interval(x: list[float], y: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of R^2 (resampling points)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    r2 = []
    for _ in range(resamples):
        i = rng.integers(0, len(xa), len(xa))
        if np.ptp(xa[i]) > 0:
            r2.append(fit_line(xa[i].tolist(), ya[i].tolist())["r2"])
    lo, hi = np.percentile(r2, [2.5, 97.5])
    return float(lo), float(hi)


def converged(search, budgets: list[int], tol: float) -> dict:
    """Run ``search(iterations) -> {"layerwise", "joint", "ded"}`` at doubling budgets until neither error
    moves by more than ``tol`` (relative) between consecutive budgets: the same plateau rule for both."""
    curve = []
    for it in budgets:
        curve.append({"iterations": it, **search(it)})
        if len(curve) > 1 and all(abs(curve[-1][k] - curve[-2][k]) <= tol * abs(curve[-2][k])
                                  for k in ("layerwise", "joint")):
            return {**curve[-1], "converged": True, "curve": curve}
    return {**curve[-1], "converged": False, "curve": curve}


def measure(model: str | None, setting: str, layer: str | None, n_samples: int, iterations: int,
            mode: str = "per-sample", budgets: list[int] | None = None, tol: float = 0.02,
            seeds: int = 1) -> dict:
    import torch

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.load.model import load_vlm
    from qvlm_export.quant.calibrate import SequentialCalibrator
    from qvlm_export.quant.recipe import load_recipe
    from qvlm_export.search.qvlm.config import config_from_args
    from qvlm_export.search.qvlm.ded import capture_unit_inputs, measure_ded, measure_ded_per_sample, slice_batch
    from qvlm_export.search.qvlm.method import block_seed
    from qvlm_export.search.qvlm.probes import collect_probe_stats, uses_mask

    recipe = load_recipe(f"qvlm-{setting}")
    # the paper's search (round-to-nearest start, no held-out split) for both the joint and the layer-wise side
    cfg = config_from_args({**recipe.method_args, "iterations": iterations, "progress": False, "start": ["rtn"],
                            "holdout": 0.0})
    budgets = budgets or [iterations]
    vlm = load_vlm(model)
    samples = load_dataset("builtin:calib")[:n_samples]
    cal = SequentialCalibrator(vlm, samples, recipe, batch_size=recipe.calibration.batch_size, device="cpu")
    names = [u.name for u in cal.units]
    decoder = [i for i, u in enumerate(cal.units) if u.kind == "decoder"]
    first = names.index(layer) if layer else decoder[len(decoder) // 2 - 1]
    stats = collect_probe_stats(vlm.model, cal.batches, cal.units, recipe.activations.bits, cfg.probe_bits,
                                cfg.clip_grid, None, cal.device)
    pair = capture_unit_inputs(cal, first)
    masked = uses_mask(pair["units"][0])
    h_k, d_k = stats.sample_entropy[names[first]], stats.sample_dependency[first]
    if mode == "shared":  # search once on all samples, split the two solutions' errors by sample
        masks = [b.attention_mask.bool() if masked else None for b in cal.batches]
        runs = []
        for rep in range(seeds):
            seed = block_seed(recipe.calibration.seed + rep, names[first:first + 2])
            per_budget = {}

            def search(it, seed=seed, per_budget=per_budget):
                torch.manual_seed(seed)
                per_budget[it] = measure_ded_per_sample(pair["units"], pair["modules"], pair["inputs"], pair["kwargs"],
                                                        masks, recipe, replace(cfg, iterations=it), seed)
                return {k: sum(d[k] for d in per_budget[it]) / len(per_budget[it]) for k in ("layerwise", "joint", "ded")}

            run = converged(search, budgets, tol)
            runs.append({"converged": run["converged"], "curve": run["curve"], "per_sample": per_budget[run["iterations"]]})
            print(f"seed {rep}: {run['iterations']} iterations, converged={run['converged']}", file=sys.stderr)
        points = [{"sample": i, "entropy": h_k[i], "dependency": d_k[i],
                   **{k: sum(r["per_sample"][i][k] for r in runs) / seeds for k in ("layerwise", "joint", "ded")},
                   "converged": all(r["converged"] for r in runs), "curves": [r["curve"] for r in runs]}
                  for i in range(len(runs[0]["per_sample"]))]
    else:  # search each sample alone
        points = []
        for b, x in enumerate(pair["inputs"]):
            n = x.shape[0]
            for i in range(n):
                sample = len(points)
                mask = [cal.batches[b].attention_mask[i:i + 1].bool()] if masked else [None]
                runs = []
                for rep in range(seeds):
                    seed = block_seed(recipe.calibration.seed + rep, [names[first], str(sample)])

                    def search(it, seed=seed, x=x, b=b, i=i, n=n, mask=mask):
                        torch.manual_seed(seed)
                        return measure_ded(pair["units"], pair["modules"], [x[i:i + 1]],
                                           [slice_batch(pair["kwargs"][b], i, n)], mask, recipe,
                                           replace(cfg, iterations=it), seed)

                    runs.append(converged(search, budgets, tol))
                ded = {k: sum(r[k] for r in runs) / seeds for k in ("layerwise", "joint", "ded")}
                points.append({"sample": sample, "entropy": h_k[sample], "dependency": d_k[sample], **ded,
                               "converged": all(r["converged"] for r in runs), "curves": [r["curve"] for r in runs]})
                print(f"sample {sample + 1}/{len(samples)}: H={h_k[sample]:.3f} DED={ded['ded']:.5f}", file=sys.stderr)
    from qvlm_export.manifest import digest, hash_tree

    # the directory name and a content digest: an absolute path would only name this machine
    return {"model": vlm.path.name, "model_digest": digest(hash_tree(vlm.path))[:16], "setting": setting, "mode": mode, "units": [names[first], names[first + 1]],
            "probe_bits": stats.bits, "iterations": iterations, "budgets": budgets, "tol": tol, "seeds": seeds,
            "samples": len(points), "points": points,
            "fit_entropy": fit_with_interval([p["entropy"] for p in points], [p["ded"] for p in points]),
            "fit_dependency": fit_with_interval([p["dependency"] for p in points], [p["ded"] for p in points])}


def fit_with_interval(x: list[float], y: list[float]) -> dict:
    return {**fit_line(x, y), "r2_ci": fit_interval(x, y)}


def plot_curves(ax, result: dict) -> None:
    """Error at unit k+1's output against the search budget, layer-wise and joint (median over samples)."""
    import numpy as np

    curves = [c for p in result["points"] for c in p.get("curves", [])] or result.get("curves", [])
    for key, colour in (("layerwise", "tab:blue"), ("joint", "tab:orange")):
        by_budget: dict[int, list[float]] = {}
        for curve in curves:
            for pt in curve:
                by_budget.setdefault(pt["iterations"], []).append(pt[key])
        xs = sorted(by_budget)
        ax.plot(xs, [float(np.median(by_budget[x])) for x in xs], "o-", color=colour, label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("search iterations (each a complete annealed run)")
    ax.set_ylabel("relative error at unit k+1 (median)")
    ax.set_title("convergence: doubling budgets until both move < tol")
    ax.legend()


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in ((axes[0], "entropy", "activation entropy H(X_q^(k)) [bits]"),
                           (axes[1], "dependency", "dependency D(k,k+1) [bits]")):
        xs, ys = [p[key] for p in result["points"]], [p["ded"] for p in result["points"]]
        fit = result[f"fit_{key}"]
        ax.scatter(xs, ys, s=14)
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi], "r-")
        ax.set_xlabel(label)
        ax.set_ylabel("DED (layer-wise - joint error)")
        ci = fit.get("r2_ci")
        ax.set_title(f"R^2 = {fit['r2']:.3f}" + (f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    plot_curves(axes[2], result)
    pair = " -> ".join(u.removeprefix("model.") for u in result["units"])
    fig.suptitle(f"{pair}, {result['setting'].upper()}, {result['samples']} calibration samples, {result['mode']} search")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF LLaVA directory (default: embedded model)")
    parser.add_argument("--setting", default="w4a4")
    parser.add_argument("--layer", default=None, help="unit k by name (default: the middle decoder layer)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--budgets", default="100,200,400,800,1600",
                        help="doubling search budgets tried until both errors plateau (see --tol)")
    parser.add_argument("--tol", type=float, default=0.02, help="relative change that counts as a plateau")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds averaged per sample")
    parser.add_argument("--mode", choices=("per-sample", "shared"), default="per-sample",
                        help="search each sample alone, or once on all samples and split the errors by sample")
    parser.add_argument("--out", type=Path, default=DOCS / "figures")
    args = parser.parse_args(argv)

    from qvlm_export.manifest import atomic_write_text

    start = time.perf_counter()
    budgets = [int(b) for b in args.budgets.split(",")]
    result = measure(args.model, args.setting, args.layer, args.samples, args.iterations, args.mode, budgets,
                     args.tol, args.seeds)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "qvlm_fig2" if args.mode == "per-sample" else "qvlm_fig2_shared"
    plot(result, args.out / f"{stem}.png")
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    print(f"R^2 (DED vs entropy) = {result['fit_entropy']['r2']:.3f} {result['fit_entropy']['r2_ci']}, "
          f"R^2 (DED vs dependency) = {result['fit_dependency']['r2']:.3f}; wrote {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
