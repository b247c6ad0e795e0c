"""Quantization methods by name: the one entry point (``search.api.quantize``) dispatches here.

A method (:class:`Method`) is built from a recipe, holds its typed ``config`` (a frozen
dataclass of its own ``config_type``, read from the recipe's ``method_args``), declares its
:class:`Capabilities` instead of callers probing it, and has two hooks, called by the
sequential calibrator (:mod:`qvlm_export.quant.calibrate`):

* ``plan(calibrator) -> partition | None``: optional whole-model analysis before the walk
  (Q-VLM computes activation entropies and partitions the units into blocks); ``None``
  means one unit per block. Anything worth keeping goes into ``calibrator.extras``.
* ``block(ctx: BlockContext) -> None``: quantize the Linears of one block, recording each
  decision with ``ctx.replace_linear`` (and ``ctx.set_override`` for rewritten norms).

Methods register themselves with :func:`register_method`, by name (what a recipe says) and
by config type (:func:`method_for` a config); modules are imported lazily so that
``import qvlm_export`` stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

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
_BY_CONFIG: dict[type, type] = {}
# The module paths the sequential calibrator's walk asks of a family (families/base.py): every method needs them.
UNIT_WALK = frozenset({"vision_tower", "vision_layers", "projector", "language_model", "embed_tokens",
                       "decoder_layers", "final_norm", "lm_head"})


@dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself; ``quantize`` and ``run`` read this, never ``getattr``."""

    data_free: bool = False  # reads no calibration data: quantize skips the dataset and every forward pass
    whole_model_plan: bool = False  # plan() runs the whole model, so it must all be on the device
    family_needs: frozenset[str] = UNIT_WALK  # the Family attributes (module paths) it relies on


class Method(Protocol):
    config_type: ClassVar[type]  # the frozen dataclass of its options; the registry dispatches on it
    config: Any

    def __init__(self, recipe: Any) -> None: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def plan(self, calibrator: Any) -> list[list[int]] | None: ...

    def block(self, ctx: Any) -> None: ...


def register_method(name: str):
    def deco(cls: type) -> type:
        config_type = cls.__dict__.get("config_type")
        if config_type is None or _BY_CONFIG.get(config_type, cls) is not cls:
            raise TypeError(f"method {name!r} must declare a config_type of its own")
        _REGISTRY[name] = cls
        _BY_CONFIG[config_type] = cls
        return cls

    return deco


def method_for(config: Any) -> type:
    """The method class whose ``config_type`` is ``type(config)``."""
    for module in _MODULES.values():  # the config's own module registered it; make sure every one has
        if type(config) in _BY_CONFIG:
            break
        importlib.import_module(module)
    if type(config) not in _BY_CONFIG:
        raise QvlmError(f"no quantization method takes a {type(config).__name__}")
    return _BY_CONFIG[type(config)]


def check_family(method: Method, model: Any) -> None:
    """Refuse, in one line, a model whose family lacks a module path the method relies on."""
    from ..families import family_of

    family = family_of(model)
    missing = sorted(n for n in method.capabilities.family_needs if not hasattr(family, n))
    if missing:
        raise QvlmError(f"{method.recipe.method} needs {missing[0]!r} from the {family.model_type} family, which does "
                        "not define it; add it to that family (qvlm_export/families/)")


def build_method(recipe: Any) -> Method:
    """The recipe's method, its ``method_args`` checked into the method's typed config."""
    return get_method(recipe.method)(recipe)


def get_method(name: str) -> type:
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise QvlmError(f"unknown quantization method {name!r}; choose one of {sorted(_MODULES)}")
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]
