"""One recipe with ``method_args`` overrides, measured as docs/results.md measures a row, and compared
on the same questions with rows of docs/results.json (or of a JSON this tool wrote).

    python tools/variant_row.py qig-w3a16 --set awq_candidate=true --vs awq,qig
    python tools/variant_row.py qvlm_plus-w4a4 --set choose_per_block=true --vs qvlm --json /tmp/r.json
    python tools/variant_row.py qvlm-w4a4 --vs-json /tmp/r.json      # against a row written by --json

Prints the row (accuracy with its Wilson interval, logit SQNR with its bootstrap interval, search
seconds) and, per compared row, ``this minus that``: the SQNR difference with its paired bootstrap
95% interval, the accuracy difference and the exact McNemar p (``tools/results_table.py``'s
:func:`paired_vs`). For method variants that are not (yet) a built-in recipe; a default-recipe
row belongs in docs/results.md through ``tools/results_table.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import DOCS, paired_vs  # noqa: E402


def parse_value(text: str):
    """``true``/``false``/numbers/JSON lists as YAML would read them; anything else stays a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(recipe_name: str, overrides: dict, states: Path) -> tuple[dict, list[float]]:
    from qvlm_export.evaluate.rows import fp_reference, quantized_row, rounded
    from qvlm_export.quant.recipe import load_recipe

    recipe = load_recipe(recipe_name).with_method_args(**overrides)
    row, _, signal = quantized_row(recipe, states / recipe_name, fp_reference())
    return {"method": row.pop("method"), "setting": row.pop("setting"), "overrides": overrides, **row}, rounded(signal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="built-in recipe name, e.g. qig-w3a16")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method_args override")
    parser.add_argument("--vs", default="", help="methods whose docs/results.json row (same setting) to compare with")
    parser.add_argument("--vs-json", action="append", default=[], help="rows written by --json to compare with")
    parser.add_argument("--json", default=None, help="write the row here")
    parser.add_argument("--states-dir", default=None, help="keep the quant state here (default: a temp dir)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = parse_value(value)
    with tempfile.TemporaryDirectory() as tmp:
        row, signal = measure(args.recipe, overrides, Path(args.states_dir or tmp))
    print(f"{args.recipe} {overrides}: acc {100 * row['accuracy']:.1f} [{100 * row['accuracy_ci'][0]:.1f}, "
          f"{100 * row['accuracy_ci'][1]:.1f}] ({row['per_question']['correct'].count('1')}/"
          f"{len(row['per_question']['correct'])})  logit SQNR {row['logit_sqnr_db']:.2f} "
          f"[{row['logit_sqnr_ci'][0]:.2f}, {row['logit_sqnr_ci'][1]:.2f}] dB  search {row['search_seconds']:.1f} s")
    results = json.loads((DOCS / "results.json").read_text())
    others = [(f"{m} (docs/results.json)", r) for m in filter(None, args.vs.split(","))
              for r in results if r["method"] == m and r["setting"] == row["setting"]]
    for path in args.vs_json:
        other = json.loads(Path(path).read_text())
        others.append((f"{other['method']} {other.get('overrides', {})} ({path})", other))
    for label, other in others:
        print(f"  this minus {label}: {paired_vs(other, row, signal)} "
              f"[{other['per_question']['correct'].count('1')} vs {row['per_question']['correct'].count('1')} correct]")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
