"""Validation stage: Polygraphy per-graph parity, task parity, and the report.

Entry point: :func:`qvlm_export.validate.api.validate` (``qvlm-export validate`` calls it).
Maths in :mod:`.stats` (statistics) and :mod:`.thresholds` (bounds); Polygraphy
orchestration in :mod:`.parity`; the report in :mod:`.report`, :mod:`.html`, :mod:`.plots`.
Submodules are imported on use, so importing this package loads neither onnxruntime nor torch.
"""
