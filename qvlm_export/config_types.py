"""Type checks for config mappings read from YAML, before they become frozen dataclasses.

YAML gives whatever the user typed (``bits: eight``, ``runners: 3``, ``samples: [1]``); a
dataclass accepts it silently and the first comparison raises a bare ``TypeError`` far away.
:func:`typed_fields` checks each value against the field's annotation and fails in one line
naming the key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any

from .errors import QvlmError


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of strings" if typing.get_args(tp)[:1] == (str,) else "a list"
    return names.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(value fits ``tp``, the value as stored: lists become tuples, ints become floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = _coerce(arg, value)
            if ok:
                return True, coerced
        return False, value
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, list | tuple):
            return False, value
        coerced = [_coerce(item, v) for v in value]
        return all(ok for ok, _ in coerced), tuple(v for _, v in coerced)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value  # nested dataclasses and anything else: their own validation


def typed_fields(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw`` with every value checked against ``cls``'s field annotation (and lists made tuples)."""
    hints = _hints(cls)
    out = dict(raw)
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        ok, value = _coerce(hints[f.name], raw[f.name])
        if not ok:
            shown = repr(raw[f.name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise QvlmError(f"{where}: {f.name} must be {_describe(hints[f.name])}, got {shown}")
        out[f.name] = value
    return out


def known_options(cls: type, raw: dict[str, Any], where: str, what: str) -> dict[str, Any]:
    """:func:`typed_fields` after refusing, in one line, an option ``cls`` does not have (``what``: "Q-VLM option")."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise QvlmError(f"{where}: unknown {what} {unknown[0]!r}; allowed: {sorted(names)}")
    return typed_fields(cls, raw, where)
