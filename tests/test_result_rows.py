"""evaluate/rows.py: the one results row the tools build (quantize -> accuracy -> logit SQNR vs FP)."""

from __future__ import annotations

import json

import pytest

from qvlm_export.data.manifest import load_dataset
from qvlm_export.evaluate.accuracy import evaluate
from qvlm_export.evaluate.backends import make_answerer
from qvlm_export.evaluate.intervals import pooled_sqnr_db, sqnr_terms
from qvlm_export.evaluate.logits import next_token_logits
from qvlm_export.evaluate.rows import fp_reference, quantized_row
from qvlm_export.quant.recipe import recipe_from_dict


def test_quantized_row_measures_what_eval_measures(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    reference = fp_reference(model, sqnr_data="builtin:eval:6")
    assert reference.logits.shape[0] == 6
    recipe = recipe_from_dict({"method": "rtn", "setting": "w4a16", "weights": {"group_size": 16}})
    row, answerer, signal = quantized_row(recipe, tmp_path / "q", reference, model=model, eval_data="builtin:eval:8",
                                          batch_size=4)
    assert list(row)[:3] == ["method", "setting", "deployable"] and (row["method"], row["setting"]) == ("rtn", "w4a16")
    direct = evaluate(make_answerer(model=model, quant=str(tmp_path / "q"))[0], load_dataset("builtin:eval:8"),
                      batch_size=4, progress=False)
    assert row["accuracy"] == round(direct.overall, 4) and len(row["per_question"]["correct"]) == 8
    assert row["per_question"]["correct"] == "".join("1" if c else "0" for c in direct.correct)
    q_logits = next_token_logits(answerer.vlm, load_dataset("builtin:eval:6"))
    assert row["logit_sqnr_db"] == round(pooled_sqnr_db(*sqnr_terms(reference.logits, q_logits)), 2)
    assert len(row["per_question"]["logit_noise"]) == 6 and len(signal) == 6
    lo, hi = row["logit_sqnr_ci"]
    assert lo <= row["logit_sqnr_db"] <= hi
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert row["search_seconds"] == pytest.approx(manifest["search_seconds"], abs=0.005)
