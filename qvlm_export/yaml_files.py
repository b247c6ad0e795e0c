"""Reading the project's YAML configs (recipes, build profiles, thresholds, run configs) with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import QvlmError


def parse_yaml(text: str, source: str) -> Any:
    """The data of a YAML text; a syntax error becomes one line naming ``source``."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QvlmError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None


def named_yaml(spec: str | Path, directory: Path, what: str) -> Path:
    """``spec`` as a YAML path, or the built-in ``directory/<spec>.yaml`` when it names one."""
    path = Path(spec)
    if not path.exists() and not str(spec).endswith((".yaml", ".yml")):
        path = directory / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        raise QvlmError(f"{what} {str(spec)!r} not found; pass a YAML path or one of {known}")
    return path
