"""Written by qvlm-export lmms-task for /tmp/qvlm-fuzz-zulk07qq/file."""
from pathlib import Path

from PIL import Image

from qvlm_export.evaluate.accuracy import normalize_answer

ROOT = Path('/tmp/qvlm-fuzz-zulk07qq')


def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
