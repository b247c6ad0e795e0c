"""The TensorRT environment an engine is built or loaded in, and whether an engine fits it.

Engines are tied to the TensorRT version and the GPU they were built for (DESIGN
section 6). The build records both in the engine manifest; loading compares them with
the running environment first, so a mismatch is one actionable line instead of a
deserialisation failure deep inside TensorRT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from ..errors import QvlmError

TRT_INSTALL_HINT = ("install TensorRT 10 or 11 on a machine with an NVIDIA GPU: pip install 'qvlm-export[trt]' "
                    "(see docs/tensorrt.md); `qvlm-export check-trt` runs without it")
# (built major, runtime major) pairs TensorRT supports for version-compatible engines across majors
CROSS_MAJOR_COMPATIBLE = {(8, 10), (10, 11)}


@dataclass(frozen=True)
class TrtEnvironment:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def require_tensorrt() -> ModuleType:
    """Import tensorrt, or say how to get it (the pip wheel is a stub on machines without NVIDIA's index)."""
    try:
        import tensorrt
    except ImportError:
        raise QvlmError(f"TensorRT is not installed; {TRT_INSTALL_HINT}") from None
    except Exception as exc:  # the stub wheel raises at import when it cannot fetch the real package
        raise QvlmError(f"TensorRT failed to import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                        f"{TRT_INSTALL_HINT}") from None
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of the first visible GPU, without starting CUDA in this process if possible."""
    smi = shutil.which("nvidia-smi")
    if smi:
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
        try:
            out = subprocess.run([smi, f"--id={index}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
            name, cap = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
            return name, cap
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            pass  # old drivers lack compute_cap; fall back to torch
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # a CPU-only torch or a broken driver: report no GPU below
        pass
    raise QvlmError("no NVIDIA GPU is visible (nvidia-smi and torch.cuda found none); build and run TensorRT "
                    "engines on a GPU machine")


def detect_environment() -> TrtEnvironment:
    trt = require_tensorrt()
    name, cap = gpu_identity()
    return TrtEnvironment(tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=cap)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def version_problem(built: str, installed: str, version_compatible: bool) -> str | None:
    b, i = _version(built), _version(installed)
    if b == i:
        return None
    if version_compatible:
        if i >= b and (b[0] == i[0] or (b[0], i[0]) in CROSS_MAJOR_COMPATIBLE):
            return None
        return (f"were built version-compatible with TensorRT {built}, which runs only on TensorRT {built} or a "
                f"newer supported release, but {installed} is installed")
    return f"were built with TensorRT {built} but {installed} is installed (engines do not load across versions)"


def hardware_problem(built_cap: str, built_gpu: str, env: TrtEnvironment, level: str) -> str | None:
    here = _capability(env.compute_capability)
    if level == "ampere_plus":
        return None if here >= (8, 0) else (f"were built for Ampere-or-newer GPUs but {env.gpu_name} is "
                                            f"compute capability {env.compute_capability}")
    if here != _capability(built_cap):
        return (f"were built for {built_gpu} (compute capability {built_cap}) but this GPU is {env.gpu_name} "
                f"(compute capability {env.compute_capability})")
    return None


def check_engine_compatibility(manifest: dict[str, Any], env: TrtEnvironment, where: str = "engines") -> None:
    """Raise a one-line QvlmError if engines with this manifest cannot load in ``env``."""
    built = manifest.get("tensorrt", {}).get("version")
    gpu = manifest.get("gpu", {})
    profile = manifest.get("config", {}).get("profile", {})
    if not built or "compute_capability" not in gpu:
        raise QvlmError(f"{where}: the engine manifest records no TensorRT version or GPU; rebuild with "
                        f"`qvlm-export build`")
    problem = version_problem(built, env.tensorrt_version, bool(profile.get("version_compatible")))
    if problem is None:
        problem = hardware_problem(gpu["compute_capability"], gpu.get("name", "?"), env,
                                   profile.get("hardware_compatibility", "none"))
    if problem is not None:
        raise QvlmError(f"{where}: the engines {problem}; rebuild them here with `qvlm-export build` "
                        f"(or run them where they were built)")
