"""What a stage will hold in memory, estimated before the heavy work starts, and refused if it cannot fit.

The numbers come from the checkpoint's safetensors headers (parameter counts and dtypes,
read without loading a tensor) and ``MemAvailable`` of ``/proc/meminfo``. Each stage
states its own model of what it holds (docs/scale.md, "memory model"):

* quantize: the model in its load dtype, plus the quantized Linears' integer codes
  (1 byte a weight) and one block's full-precision copy; ``QUANTIZE_FACTOR`` x model bytes;
* export: the model in the graph dtype, plus one graph's lowered tensors streamed to disk
  (large graphs) or held as one protobuf (small ones); ``EXPORT_FACTOR`` x model bytes.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from .errors import QvlmError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SAFETENSORS_TO_TORCH = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
LOAD_DTYPES = ("auto", "fp32", "fp16", "bf16")
QUANTIZE_FACTOR = 1.3
EXPORT_FACTOR = 2.0


def _headers(model_dir: Path) -> list[dict]:
    out = []
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        out.append(header)
    return out


def checkpoint_params(model_dir: Path) -> tuple[int, str]:
    """(number of float parameters, their most common dtype: fp32 | fp16 | bf16) from the safetensors headers."""
    count, dtypes = 0, Counter()
    for header in _headers(model_dir):
        for meta in header.values():
            n = 1
            for d in meta["shape"]:
                n *= d
            if meta["dtype"] in SAFETENSORS_TO_TORCH:
                count += n
                dtypes[SAFETENSORS_TO_TORCH[meta["dtype"]]] += n
    if not dtypes:  # e.g. pytorch_model.bin: no header to read; config's dtype, size unknown (0)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        return 0, {"float16": "fp16", "bfloat16": "bf16"}.get(name, "fp32")
    return count, dtypes.most_common(1)[0][0]


def resolve_load_dtype(requested: str, model_dir: Path) -> str:
    """``auto`` -> the checkpoint's own dtype; anything else must be one of fp32 | fp16 | bf16."""
    if requested not in LOAD_DTYPES:
        raise QvlmError(f"--dtype must be one of {list(LOAD_DTYPES)}, got {requested!r}")
    return checkpoint_params(model_dir)[1] if requested == "auto" else requested


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def available_bytes() -> int:
    """``MemAvailable`` (what the kernel can give without swapping), or total RAM where it is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(stage: str, model_dir: Path, dtype: str, factor: float, available: int | None = None) -> int:
    """Refuse in one line when ``factor`` x the model's bytes in ``dtype`` exceed the available memory.

    Returns the estimate in bytes. ``available`` is for tests (default: :func:`available_bytes`).
    """
    params, _ = checkpoint_params(model_dir)  # 0 when unknown: nothing to refuse on
    model_bytes = params * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    need = int(model_bytes * factor)
    have = available_bytes() if available is None else available
    if need > have:
        raise QvlmError(f"{stage} needs about {need / 2**30:.1f} GiB ({params / 1e9:.2f}B parameters in {dtype} "
                        f"x {factor}) but {have / 2**30:.1f} GiB is available; free memory, use a smaller --dtype, "
                        "or run on a larger machine")
    return need
