"""Engine build profiles: one frozen, versioned config per deployment target.

A profile file (``engines/<name>.yaml``, package data in ``qvlm_export/profiles/``) says how large the engines' inputs may get
and how TensorRT should build them; it never says which precision to use, because
strongly typed networks take precision from the graph's dtypes and Q/DQ nodes::

    name: edge
    max_batch: 1              # images (vision) and sequences (decoder) per call
    max_prompt: 256           # longest prefill, image tokens included
    max_context: 512          # prompt + generated tokens (KV-cache length)
    workspace_mib: 2048
    builder_optimization_level: 3
    timing_cache: ~/.cache/qvlm-export/timing-edge.cache
    hardware_compatibility: none   # none | ampere_plus | same_compute_capability
    version_compatible: false
    graph_dtype: fp16              # which bundle variant to build: fp32 | fp16
    size_from_bundle: false        # true: max_prompt/max_context from the bundle (below)
    text_tokens: 256               # longest expected text around one image (size_from_bundle)
    new_tokens: 256                # longest expected answer (size_from_bundle)
    decoder_logits: last           # last: prefill returns [batch, 1, vocab] (.last_token); all: every position

``load_profile("auto")`` is the edge profile with ``size_from_bundle: true``;
``"auto:server"`` (or ``auto:<path>``) sizes another base profile. ``plan_build`` then
derives max_prompt / max_context from the bundle (:mod:`.fit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_types import typed_fields
from ..errors import QvlmError, reject_unknown_keys
from ..yaml_files import named_yaml, parse_yaml

PROFILE_VERSION = 1
# Package data, so an installed wheel has them; the repo's engines/ links here.
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
GRAPH_DTYPES = ("fp32", "fp16")
DECODER_LOGITS = ("last", "all")


@dataclass(frozen=True)
class BuildProfile:
    """How to build one set of engines (vision, embed, decoder) from an ONNX bundle."""

    name: str
    max_batch: int = 1
    opt_batch: int | None = None  # None: max_batch
    max_prompt: int = 256
    opt_prompt: int | None = None  # None: max_prompt // 2
    max_context: int = 512
    opt_context: int | None = None  # None: max_context // 2
    workspace_mib: int = 2048
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    hardware_compatibility: str = "none"
    version_compatible: bool = False
    graph_dtype: str = "fp16"
    size_from_bundle: bool = False  # plan_build sizes max_prompt/max_context from the bundle (.fit)
    text_tokens: int = 256  # longest expected text around one image (size_from_bundle only)
    new_tokens: int = 256  # longest expected answer (size_from_bundle only)
    decoder_logits: str = "last"  # last: the engine's logits are the last position's (.last_token); all: every one
    version: int = PROFILE_VERSION

    @property
    def batch_range(self) -> tuple[int, int, int]:
        return 1, self.opt_batch or self.max_batch, self.max_batch

    @property
    def prompt_range(self) -> tuple[int, int, int]:
        return 1, self.opt_prompt or max(1, self.max_prompt // 2), self.max_prompt

    @property
    def past_range(self) -> tuple[int, int, int]:
        """KV-cache length during decode: one generated token at a time, at most max_context - 1 behind."""
        opt = self.opt_context or max(1, self.max_context // 2)
        return 1, min(opt, self.max_context - 1), self.max_context - 1

    def timing_cache_path(self) -> Path | None:
        return Path(self.timing_cache).expanduser() if self.timing_cache else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """SHA-256 of the resolved profile: what the engine manifest records as the profile hash."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _check_int(raw: dict[str, Any], key: str, source: str, low: int, high: int | None = None) -> None:
    value = raw.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise QvlmError(f"{source}: {key} must be {bound}, got {value!r}")


def profile_from_dict(raw: Any, source: str = "profile") -> BuildProfile:
    """Validate a profile mapping; every error names the key and the allowed values."""
    if not isinstance(raw, dict):
        raise QvlmError(f"{source}: a build profile must be a YAML mapping with at least 'name'")
    reject_unknown_keys(raw, BuildProfile, source)
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise QvlmError(f"{source}: 'name' must be a non-empty string")
    for key in ("max_batch", "opt_batch", "max_prompt", "opt_prompt", "workspace_mib", "opt_context",
                "text_tokens", "new_tokens"):
        _check_int(raw, key, source, 1)
    _check_int(raw, "max_context", source, 2)
    _check_int(raw, "builder_optimization_level", source, 0, 5)
    _check_int(raw, "version", source, PROFILE_VERSION, PROFILE_VERSION)
    profile = BuildProfile(**typed_fields(BuildProfile, raw, source))
    if profile.hardware_compatibility not in HARDWARE_LEVELS:
        raise QvlmError(f"{source}: hardware_compatibility must be one of {list(HARDWARE_LEVELS)}, "
                        f"got {profile.hardware_compatibility!r}")
    if profile.decoder_logits not in DECODER_LOGITS:
        raise QvlmError(f"{source}: decoder_logits must be one of {list(DECODER_LOGITS)}, got {profile.decoder_logits!r}")
    if profile.graph_dtype not in GRAPH_DTYPES:
        raise QvlmError(f"{source}: graph_dtype must be one of {list(GRAPH_DTYPES)}, got {profile.graph_dtype!r}")
    for key in ("version_compatible", "size_from_bundle"):
        if not isinstance(getattr(profile, key), bool):
            raise QvlmError(f"{source}: {key} must be true or false")
    if profile.timing_cache is not None and not isinstance(profile.timing_cache, str):
        raise QvlmError(f"{source}: timing_cache must be a path string or null")
    _check_order(profile, source)
    return profile


def _check_order(p: BuildProfile, source: str) -> None:
    if p.opt_batch is not None and p.opt_batch > p.max_batch:
        raise QvlmError(f"{source}: opt_batch ({p.opt_batch}) exceeds max_batch ({p.max_batch})")
    if p.opt_prompt is not None and p.opt_prompt > p.max_prompt:
        raise QvlmError(f"{source}: opt_prompt ({p.opt_prompt}) exceeds max_prompt ({p.max_prompt})")
    if p.max_prompt >= p.max_context:
        raise QvlmError(f"{source}: max_context ({p.max_context}) must exceed max_prompt ({p.max_prompt}) "
                        f"to leave room for generated tokens")
    if p.opt_context is not None and p.opt_context >= p.max_context:
        raise QvlmError(f"{source}: opt_context ({p.opt_context}) must be below max_context ({p.max_context})")


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) if PROFILES_DIR.is_dir() else []


def load_profile(spec: str | Path) -> BuildProfile:
    """A profile from a YAML path or a built-in name (``edge``, ``server``).

    ``auto`` / ``auto:<name or path>``: that profile (edge by default) sized from the bundle
    when the build is planned (``size_from_bundle``).
    """
    text = str(spec)
    if text == "auto" or text.startswith("auto:"):
        base = load_profile(text[len("auto:"):] or "edge")
        return dataclasses.replace(base, name=f"auto:{base.name}", size_from_bundle=True)
    path = named_yaml(spec, PROFILES_DIR, "build profile")
    return profile_from_dict(parse_yaml(path.read_text(), str(path)), source=str(path))
