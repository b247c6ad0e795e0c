"""qvlm-export: Q-VLM post-training quantization and QDQ deployment of vision-language models.

Importing the package is cheap: it does not import torch's CUDA runtime, tensorrt or
onnxruntime. Stages live in subpackages (``data``, ``load``, ``quant``, ``search``,
``export``, ``runtime``, ``build``, ``validate``) and are imported on use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
