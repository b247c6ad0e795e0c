"""The export stage's one config: frozen, versioned, serialised into the bundle manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config_types import typed_fields
from ..errors import QvlmError, reject_unknown_keys

EXPORT_CONFIG_VERSION = 3  # 2: external_data_bytes; 3: ragged_int4
RAGGED_INT4 = ("float", "int8", "int4")
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class ExportConfig:
    """How the three graphs are traced.

    ``dtype`` is the graph's compute and interface float type (fp16 for TensorRT's
    strongly typed build: DQ scales take the same type). The example sizes only seed
    ``torch.export``; every one of those axes is dynamic in the graph (sizes >= 2 so the
    exporter does not specialise them to 0/1).
    """

    dtype: str = "fp32"
    opset: int = 21
    example_batch: int = 2
    example_seq: int = 3
    example_past: int = 4
    attn_implementation: str = "eager"  # softmax stays an explicit float op, as TensorRT wants
    # A graph whose traced weights exceed this many bytes is written as ONNX external data
    # (<graph>.onnx_data) without ever building one protobuf: protobuf stops at 2 GB, and the
    # in-memory proto would be a second copy of the weights. Tests lower it to exercise the path.
    external_data_bytes: int = 1_000_000_000
    # int4 layers whose K is not a multiple of the group size (SigLIP's fc2: K = 4304): TensorRT's
    # parser rejects their ragged last block. float: keep the state's dequantized weight in the graph's
    # float type (exact, 4x the bytes); int8: re-quantize it per output channel (weight-only, within half
    # an int8 step); int4: keep the ragged blocks (ONNX Runtime only; check-trt rejects them).
    ragged_int4: str = "float"
    version: int = EXPORT_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise QvlmError(f"export dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.opset < 21:
            raise QvlmError(f"export needs opset >= 21 (int4 weights and blocked DequantizeLinear), got {self.opset}")
        if self.ragged_int4 not in RAGGED_INT4:
            raise QvlmError(f"ragged_int4 must be one of {list(RAGGED_INT4)}, got {self.ragged_int4!r}")
        if self.external_data_bytes < 0:
            raise QvlmError(f"external_data_bytes must be >= 0, got {self.external_data_bytes}")
        if min(self.example_batch, self.example_seq, self.example_past) < 2:
            raise QvlmError("export example sizes must be >= 2 so torch.export keeps those axes dynamic")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_config_from_dict(raw: dict[str, Any] | None, where: str = "export config") -> ExportConfig:
    """Validate a mapping (e.g. the ``export:`` section of a run config) into an :class:`ExportConfig`."""
    if raw is not None and not isinstance(raw, dict):
        raise QvlmError(f"{where}: must be a mapping")
    raw = dict(raw or {})
    reject_unknown_keys(raw, ExportConfig, where)
    return ExportConfig(**typed_fields(ExportConfig, raw, where))
