"""An lmms-eval task over a JSONL manifest (our data format), for offline runs of ``--model qvlm_export``.

``write_task(manifest, out)`` writes ``out/<name>.yaml`` and ``out/<name>_utils.py``: a
``generate_until`` task that reads the manifest with ``datasets``' json loader (no hub),
asks each question with its image and scores exact match after the same normalisation as
``qvlm-export eval``, so ``lmms-eval --include_path out --tasks <name>`` reports the number
``qvlm-export eval --data manifest`` does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QvlmError

UTILS = '''"""Written by qvlm-export lmms-task for {manifest}."""
from pathlib import Path

from PIL import Image

from qvlm_export.evaluate.accuracy import normalize_answer

ROOT = Path({root!r})


def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return {{"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}}
'''

YAML = """# Written by qvlm-export lmms-task for {manifest}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {manifest_json}
test_split: test
output_type: generate_until
doc_to_visual: !function {name}_utils.doc_to_visual
doc_to_text: !function {name}_utils.doc_to_text
doc_to_target: !function {name}_utils.doc_to_target
process_results: !function {name}_utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_task(manifest: str | Path, out: str | Path, name: str = "qvlm_vqa", max_new_tokens: int = 8) -> Path:
    """Write the task definition for ``manifest`` into ``out``; returns the YAML file."""
    manifest, out = Path(manifest).resolve(), Path(out)
    if not manifest.is_file():
        raise QvlmError(f"{str(manifest)!r} is not a JSONL manifest; write one with `qvlm-export data --out DIR`")
    if not name.isidentifier():
        raise QvlmError(f"task name {name!r} must be a Python identifier (it names the utils module)")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_utils.py").write_text(UTILS.format(manifest=manifest, root=str(manifest.parent)))
    yaml_file = out / f"{name}.yaml"
    yaml_file.write_text(YAML.format(manifest=manifest, name=name, manifest_json=json.dumps(str(manifest)),
                                     max_new_tokens=int(max_new_tokens)))
    return yaml_file
