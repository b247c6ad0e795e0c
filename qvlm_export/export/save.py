"""Graph files: one protobuf, or a small graph plus ONNX external data, never a >2 GB protobuf in memory.

Small graphs (initializers up to ``ExportConfig.external_data_bytes``) keep the original
path: the traced model is serialised to one ``ModelProto``, the passes edit it and
``onnx.save`` writes one file.

Large graphs never exist as one protobuf (protobuf cannot serialise more than 2 GB, and
building one would hold a second copy of every weight):

1. the traced ``onnx_ir`` model, whose initializers still point at the torch
   parameters, is streamed tensor by tensor to ``scratch/traced.onnx`` + ``traced.data``;
2. ``traced.onnx`` is loaded *without* its data: a graph of nodes and external references;
3. the passes run on that proto; weights they read come from the file one at a time, and
   every tensor they create is appended to ``scratch/lowered.data`` (:class:`ExternalStore`)
   instead of staying in the proto;
4. ``onnx_ir`` re-reads the lowered graph lazily (memory-mapped) and streams the tensors
   that survived the passes into ``<graph>.onnx_data`` next to ``<graph>.onnx`` (the name
   transformers.js and optimum load).

Peak memory of the stage is therefore the torch model plus about one tensor.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import set_external_data

from ..errors import QvlmError

SMALL_TENSOR_BYTES = 1024  # tensors below this stay inside the graph file (scalars, shapes)


class ExternalStore:
    """Appends large new initializers to one side file so the in-memory proto stays small."""

    def __init__(self, path: Path, threshold: int = SMALL_TENSOR_BYTES):
        self.path, self.threshold = Path(path), threshold
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close(); lives across many pass calls

    def offload(self, tensor: TensorProto) -> TensorProto:
        """Move ``tensor``'s raw bytes to the side file (in place) when it is large; returns it."""
        data = tensor.raw_data
        if len(data) < self.threshold:
            return tensor
        offset = self._file.tell()
        self._file.write(data)
        set_external_data(tensor, location=self.path.name, offset=offset, length=len(data))  # needs raw_data set
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        return tensor

    def close(self) -> None:
        self._file.close()


def initializer_bytes(ir_model) -> int:
    """Bytes of the traced model's initializers (what decides the external-data path)."""
    return sum(int(v.const_value.nbytes) for v in ir_model.graph.initializers.values() if v.const_value is not None)


def to_proto(ir_model) -> onnx.ModelProto:
    """The whole traced model as one in-memory protobuf (small graphs only)."""
    import onnx_ir

    return onnx_ir.serde.serialize_model(ir_model)


def stream_to_scratch(ir_model, scratch: Path) -> tuple[onnx.ModelProto, ExternalStore]:
    """Steps 1-2 of the module docstring: (data-less proto referencing ``scratch``, store for new tensors)."""
    import onnx_ir

    scratch.mkdir(parents=True, exist_ok=True)
    onnx_ir.save(ir_model, scratch / "traced.onnx", external_data="traced.data",
                 size_threshold_bytes=SMALL_TENSOR_BYTES, max_workers=1, max_in_flight_bytes=1 << 28)
    proto = onnx.load(str(scratch / "traced.onnx"), load_external_data=False)
    return proto, ExternalStore(scratch / "lowered.data")


def save_graph(model: onnx.ModelProto, path: Path, scratch: Path | None = None) -> None:
    """Write one graph; with ``scratch`` (external path) its weights go to ``<name>_data``. Checked fully."""
    if scratch is None:
        onnx.save(model, str(path))
    else:
        import onnx_ir

        onnx.save(model, str(scratch / "lowered.onnx"))
        lazy = onnx_ir.load(scratch / "lowered.onnx")  # tensors stay memory-mapped external tensors
        onnx_ir.save(lazy, path, external_data=f"{path.name}_data", size_threshold_bytes=SMALL_TENSOR_BYTES,
                     max_workers=1, max_in_flight_bytes=1 << 28)
        del lazy
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise QvlmError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from None


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if any (what hashing and copying must include)."""
    data = path.with_name(f"{path.name}_data")
    return [path, data] if data.is_file() else [path]
