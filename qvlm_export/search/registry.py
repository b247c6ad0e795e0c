"""Quantization methods by name: the one entry point (``search.api.quantize``) dispatches here.

A method is an object with two hooks, called by the sequential calibrator
(:mod:`qvlm_export.quant.calibrate`):

* ``plan(calibrator) -> partition | None``: optional whole-model analysis before the walk
  (Q-VLM computes activation entropies and partitions the units into blocks); ``None``
  means one unit per block. Anything worth keeping goes into ``calibrator.extras``.
* ``block(ctx: BlockContext) -> None``: quantize the Linears of one block, recording each
  decision with ``ctx.replace_linear`` (and ``ctx.set_override`` for rewritten norms).

Methods register themselves with :func:`register_method`; modules are imported lazily
so that ``import qvlm_export`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..errors import QvlmError

_MODULES = {
    "rtn": "qvlm_export.search.rtn",
    "smoothquant": "qvlm_export.search.smoothquant",
    "awq": "qvlm_export.search.awq",
    "gptq": "qvlm_export.search.gptq",
    "qvlm": "qvlm_export.search.qvlm.method",
    "qig": "qvlm_export.search.qig.method",
    "qvit": "qvlm_export.search.qvit.method",
    "qvlm_plus": "qvlm_export.search.combined.method",
}
_REGISTRY: dict[str, type] = {}


class Method(Protocol):
    def __init__(self, recipe: Any) -> None: ...

    def plan(self, calibrator: Any) -> list[list[int]] | None: ...

    def block(self, ctx: Any) -> None: ...


def register_method(name: str):
    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise QvlmError(f"unknown quantization method {name!r}; choose one of {sorted(_MODULES)}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]
