"""One results row: quantize with a recipe, then accuracy and logit SQNR against the FP model.

The row docs/results.md reports, and what ``qvlm-export quantize`` then ``qvlm-export eval
--quant`` reproduce. tools/results_table.py, variant_row.py, combined_ablation.py and
qvlm_ablation.py build their rows here, so they cannot measure a row four different ways.

Row fields: ``deployable``, ``accuracy`` and ``accuracy_ci`` (greedy exact match, Wilson 95%),
``logit_sqnr_db`` and ``logit_sqnr_ci`` (pooled, bootstrap 95%; :mod:`.logits`),
``search_seconds`` (the quant state's manifest), ``per_question`` (``correct`` as a 0/1 string,
``logit_noise``), from which two rows compare on the same questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVAL_BATCH = 32  # `qvlm-export eval`'s default: batch composition changes left padding, so keep it identical


@dataclass
class FPReference:
    """The FP model's side of every comparison: its answerer and its logits on the SQNR set."""

    answerer: Any
    logits: Any
    sqnr_data: str


def fp_reference(model: str | None = None, sqnr_data: str | None = None) -> FPReference:
    from ..data.manifest import load_dataset
    from .backends import make_answerer
    from .logits import LOGIT_SQNR_DATA, next_token_logits

    sqnr_data = sqnr_data or LOGIT_SQNR_DATA
    answerer, _ = make_answerer(model=model)
    return FPReference(answerer, next_token_logits(answerer.vlm, load_dataset(sqnr_data)), sqnr_data)


def accuracy_fields(result) -> dict[str, Any]:
    lo, hi = result.interval()
    return {"accuracy": round(result.overall, 4), "accuracy_ci": [round(lo, 4), round(hi, 4)]}


def correct_string(result) -> str:
    return "".join("1" if c else "0" for c in result.correct)


def rounded(values) -> list[float]:
    """Per-question terms at 5 significant digits (what the JSON files keep)."""
    return [float(f"{v:.5g}") for v in values.tolist()]


def state_row(state: str | Path, reference: FPReference, model: str | None = None, eval_data: str = "builtin:eval",
              batch_size: int = EVAL_BATCH) -> tuple[dict[str, Any], Any, Any]:
    """``(row, answerer, signal)`` of an existing quant state (see the module docstring for the row)."""
    from ..data.manifest import load_dataset
    from .accuracy import evaluate
    from .backends import make_answerer
    from .intervals import pooled_sqnr_db, sqnr_terms, sqnr_terms_interval
    from .logits import next_token_logits

    seconds = json.loads((Path(state) / "manifest.json").read_text())["search_seconds"]
    answerer, info = make_answerer(model=model, quant=str(state))
    result = evaluate(answerer, load_dataset(eval_data), batch_size=batch_size, progress=False)
    signal, noise = sqnr_terms(reference.logits, next_token_logits(answerer.vlm, load_dataset(reference.sqnr_data)))
    lo, hi = sqnr_terms_interval(signal, noise)
    row = {"deployable": bool(info["deployable"]), **accuracy_fields(result),
           "logit_sqnr_db": round(pooled_sqnr_db(signal, noise), 2), "logit_sqnr_ci": [round(lo, 2), round(hi, 2)],
           "search_seconds": round(float(seconds), 2),
           "per_question": {"correct": correct_string(result), "logit_noise": rounded(noise)}}
    return row, answerer, signal


def quantized_row(recipe, out: str | Path, reference: FPReference, model: str | None = None,
                  calib: str = "builtin:calib", eval_data: str = "builtin:eval",
                  batch_size: int = EVAL_BATCH) -> tuple[dict[str, Any], Any, Any]:
    """Quantize ``recipe`` (a name, path or QuantRecipe) into ``out`` quietly, then :func:`state_row`;
    the row starts with ``method`` and ``setting``."""
    from ..quant.recipe import QuantRecipe, load_recipe
    from ..search.api import quantize

    recipe = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    state = quantize(model=model, recipe=recipe, calib=calib, out=out, progress=False)
    row, answerer, signal = state_row(state, reference, model, eval_data, batch_size)
    return {"method": recipe.method, "setting": recipe.setting, **row}, answerer, signal
