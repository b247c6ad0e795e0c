"""Export stage: a model (+ quant state) -> QDQ ONNX bundle (vision, embed, decoder). See docs/export.md.

Entry point: :func:`qvlm_export.export.api.export_bundle`. Submodules import torch lazily
through ``api``, so importing this package stays light.
"""
