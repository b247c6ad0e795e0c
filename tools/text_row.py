"""Language-model text rows of recipes on one model: perplexity ratio and next-token agreement vs FP.

    python tools/text_row.py --model /tmp/smol/llava-untrained rtn-w8a8 smoothquant-w8a8 \
        my-recipe.yaml --set smoothquant-w8a8:alpha=0.8 --states-dir /tmp/states --json /tmp/rows.json
    python tools/text_row.py --model DIR fb5=rtn-w8a8 --set 'fb5:fallback={"max_layers": 5}'
    python tools/text_row.py --table /tmp/rows.json           # the rows as a markdown table

For each recipe (a built-in name or a YAML file; ``label=recipe`` names the row), quantizes the
model with ``builtin:calib`` (or reuses ``<states-dir>/<label>`` when it holds a finished state and
``--reuse`` is given), loads the simulated model and scores the language model alone on the
English text of :mod:`qvlm_export.evaluate.text` against FP, with paired bootstrap intervals.
FP is scored once: its per-token scores are cached in the JSON (keyed by model path and text
spec) and rows are added to or replaced in it, so a later call only pays for its new recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``label:key=value`` (JSON values) -> {label: {key: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        head, sep, value = item.partition("=")
        label, colon, key = head.partition(":")
        if not sep or not colon:
            raise SystemExit(f"error: --set needs LABEL:KEY=VALUE, got {item!r}")
        out.setdefault(label, {})[key] = parse_value(value)
    return out


def split_label(spec: str) -> tuple[str, str]:
    label, sep, recipe = spec.partition("=")
    if sep:
        return label, recipe
    return Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec, spec


def with_sets(recipe, values: dict):
    """method_args overrides; ``rotation`` / ``fallback`` (JSON mappings) set those recipe sections instead."""
    from qvlm_export.quant.recipe import recipe_from_dict

    sections = {k: values.pop(k) for k in ("rotation", "fallback") if k in values}
    recipe = recipe.with_method_args(**values)
    if not sections:
        return recipe
    return recipe_from_dict({**recipe.to_dict(), **sections}, source="--set")


def fp_scores(cache: dict, key: str, vlm, windows):
    from qvlm_export.evaluate.text import TextScores, score_text, torch_logits_fn

    fp = cache.get("fp")
    if fp and fp.get("key") == key:
        return TextScores(nll=np.asarray(fp["nll"], dtype=np.float64), top1=np.asarray(fp["top1"], dtype=np.int64))
    scores = score_text(torch_logits_fn(vlm.model), windows)
    cache["fp"] = {"key": key, "perplexity": scores.perplexity, "tokens": scores.tokens,
                   "nll": [[float(f"{v:.7g}") for v in row] for row in scores.nll.tolist()],
                   "top1": scores.top1.tolist()}
    return scores


def state_for(label: str, recipe, model: str, states: Path, reuse: bool) -> tuple[Path, float | None]:
    from qvlm_export.search.api import quantize

    out = states / label
    if reuse and (out / "manifest.json").is_file():
        return out, json.loads((out / "manifest.json").read_text()).get("search_seconds")
    quantize(model=model, recipe=recipe, calib="builtin:calib", out=out, progress=False)
    return out, json.loads((out / "manifest.json").read_text())["search_seconds"]


def measure(label: str, recipe, args, windows, fp) -> dict:
    from qvlm_export.evaluate.text import compare_text, score_text, torch_logits_fn
    from qvlm_export.quant.simulate import load_simulated

    state, seconds = state_for(label, recipe, args.model, Path(args.states_dir), args.reuse)
    vlm, info = load_simulated(state, model=args.model)
    start = time.perf_counter()
    scores = score_text(torch_logits_fn(vlm.model), windows)
    cmp = compare_text(fp, scores)
    meta = json.loads((state / "state.json").read_text())
    row = {"label": label, "method": recipe.method, "setting": recipe.setting, "method_args": recipe.method_args,
           "deployable": bool(info["deployable"]), "state": str(state), "search_seconds": seconds,
           "score_seconds": round(time.perf_counter() - start, 1),
           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in cmp.to_json().items()}}
    for key in ("fallback", "rotation"):  # what the outlier options did, for the report
        if key in meta.get("extras", {}):
            row[key] = meta["extras"][key]
    return row


def markdown(paths: list[str]) -> str:
    """The rows of JSONs this tool wrote, as a markdown table (one row per label)."""
    lines = ["| row | setting | perplexity / FP [95% CI] | next-token agreement [95% CI] | search (s) |",
             "|---|---|---:|---:|---:|"]
    rows: dict[str, dict] = {}  # by label: a later file's row replaces an earlier one in place
    for path in paths:
        rows.update({r["label"]: r for r in json.loads(Path(path).read_text()).get("rows", [])})
    for r in rows.values():
        lo, hi = r["perplexity_ratio_ci95"]
        alo, ahi = r["agreement_ci95"]
        lines.append(f"| {r['label']} | {r['setting']} | {r['perplexity_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{100 * r['next_token_agreement']:.1f}% [{100 * alo:.1f}, {100 * ahi:.1f}] | "
                     f"{r['search_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:  # python tools/text_row.py --table rows.json [more.json ...]
        print(markdown(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="[label=]recipe name or YAML file")
    parser.add_argument("--model", required=True, help="HF LLaVA dir (or builtin:llava-smollm2)")
    parser.add_argument("--set", action="append", default=[], metavar="LABEL:KEY=VALUE",
                        help="a method_args override of one row (JSON value); keys rotation and fallback set "
                             "those recipe sections, e.g. x:fallback='{\"max_layers\": 5}'")
    parser.add_argument("--states-dir", default="/tmp/text-row-states")
    parser.add_argument("--reuse", action="store_true", help="reuse a finished state in <states-dir>/<label>")
    parser.add_argument("--json", default=None, help="rows (and the FP cache) are merged into this file")
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args(argv)

    from qvlm_export.errors import QvlmError
    from qvlm_export.evaluate.text import TextSpec, text_windows
    from qvlm_export.load.model import load_vlm
    from qvlm_export.quant.recipe import load_recipe

    sets = parse_sets(args.set)
    try:
        jobs = [(label, load_recipe(spec)) for label, spec in map(split_label, args.recipes)]
        jobs = [(label, with_sets(r, sets.get(label, {}))) for label, r in jobs]
        out = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
        vlm = load_vlm(args.model)
        windows = text_windows(vlm.tokenizer, TextSpec(args.tokens, args.window))
        key = f"{Path(str(vlm.path)).resolve()}|{args.tokens}|{args.window}"
        fp = fp_scores(out, key, vlm, windows)
        del vlm
        rows = {r["label"]: r for r in out.get("rows", [])}
        for label, recipe in jobs:
            row = measure(label, recipe, args, windows, fp)
            rows[label] = row
            print(f"{label:32s} ppl x{row['perplexity_ratio']:.3f} [{row['perplexity_ratio_ci95'][0]:.3f}, "
                  f"{row['perplexity_ratio_ci95'][1]:.3f}]  agree {100 * row['next_token_agreement']:.1f}% "
                  f"[{100 * row['agreement_ci95'][0]:.1f}, {100 * row['agreement_ci95'][1]:.1f}]  "
                  f"search {row['search_seconds']} s", flush=True)
            if args.json:
                out["rows"] = list(rows.values())
                tmp = Path(f"{args.json}.tmp{os.getpid()}")
                tmp.write_text(json.dumps(out) + "\n")
                tmp.replace(args.json)
    except QvlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"FP perplexity {out['fp']['perplexity']:.3f} on {out['fp']['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
