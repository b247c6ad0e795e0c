"""Model families: one adapter per HF ``model_type`` (see ``base.py`` for what a family answers).

Adding a family: a module with a :class:`~.base.Family` subclass and one line in ``FAMILIES``.
"""

from __future__ import annotations

from ..errors import QvlmError
from .base import Family
from .llava_next import LlavaNextFamily
from .llava_onevision import LlavaOnevisionFamily

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Family(), LlavaNextFamily(), LlavaOnevisionFamily())}


def family_for(model_type: str | None) -> Family:
    """The adapter of ``model_type`` (a config's ``model_type``); a one-line error for any other."""
    try:
        return FAMILIES[model_type or "llava"]
    except KeyError:
        raise QvlmError(f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})") from None


def family_of(model_or_config) -> Family:
    """The adapter of a loaded HF model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for(getattr(config, "model_type", None))
