"""ONNX Runtime sessions over a bundle's three graphs, in one of two modes.

``faithful``
    ``session.disable_quant_qdq = "1"``: ORT keeps every QuantizeLinear/DequantizeLinear
    as written and runs the MatMuls in float, so the result is the exact QDQ arithmetic
    (the reference that validation and the parity tests compare against PyTorch).
``fast``
    ORT's defaults: QDQ int8 groups fuse into integer kernels (MatMulIntegerToFloat /
    QLinearMatMul) and blocked int4 DQ + MatMul into MatMulNBits. Faster, and it may drift
    (DESIGN section 7), which validation reports separately from graph errors.
    ``int4_accuracy`` sets how the fused MatMulNBits computes (ORT's
    ``session.qdq_matmulnbits_accuracy_level``: 1 fp32, 2 fp16, 3 bf16, 4 int8 activations;
    ORT's default is 4, which quantizes the activations of W4A16 layers on the fly).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from .bundle import GRAPHS, BundleInfo, read_bundle
from .ort_decode import bound_decode
from .runner import GraphSetRunner

SESSION_MODES = ("faithful", "fast")
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def session_options(mode: str, threads: int | None = None, int4_accuracy: int | None = None):
    """``onnxruntime.SessionOptions`` for a mode; ``threads`` caps intra-op threads (None: ORT's default),
    ``int4_accuracy`` is the fused MatMulNBits accuracy level of ``fast`` (None: ORT's default)."""
    import onnxruntime as ort

    if mode not in SESSION_MODES:
        raise QvlmError(f"ONNX Runtime session mode must be one of {list(SESSION_MODES)}, got {mode!r}")
    if int4_accuracy is not None and int4_accuracy not in INT4_ACCURACY_LEVELS:
        raise QvlmError(f"int4 accuracy level must be one of {list(INT4_ACCURACY_LEVELS)} "
                        f"(1 fp32, 2 fp16, 3 bf16, 4 int8), got {int4_accuracy!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if mode == "faithful":
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    elif int4_accuracy is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int4_accuracy))
    return options


def make_session(path: Path, mode: str, threads: int | None = None, int4_accuracy: int | None = None):
    import onnxruntime as ort

    try:
        options = session_options(mode, threads, int4_accuracy)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types per failure
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QvlmError(f"ONNX Runtime cannot load {path.name}: {first[:300]}") from None


class OrtGraphSet:
    """The bundle's graphs as ORT sessions keyed by graph name (a :class:`~.runner.GraphSet`)."""

    def __init__(self, info: BundleInfo, mode: str = "faithful", threads: int | None = None,
                 int4_accuracy: int | None = None):
        session_options(mode, int4_accuracy=int4_accuracy)  # validate the options now, not at activation
        self.info = info
        self.mode = mode
        self.threads = threads
        self.int4_accuracy = int4_accuracy
        self.sessions: dict[str, Any] = {}

    def activate(self) -> OrtGraphSet:
        for graph in GRAPHS:
            self.sessions[graph] = make_session(self.info.graph_path(graph), self.mode, self.threads, self.int4_accuracy)
        return self

    def deactivate(self) -> None:
        self.sessions.clear()

    def session(self, graph: str) -> Any:
        if graph not in self.sessions:
            raise QvlmError(f"ONNX Runtime graph set is not active (or has no {graph!r} graph); call activate()")
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in session.get_outputs()]
        with ort_errors(graph, self.info):
            return dict(zip(names, session.run(names, feeds)))


@contextmanager
def ort_errors(graph: str, info: BundleInfo) -> Iterator[None]:
    """ORT's pybind errors (InvalidArgument, Fail, ...) as one line, not a traceback."""
    try:
        yield
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = " ".join(str(exc).split())
        raise QvlmError(f"ONNX Runtime failed running the {graph} graph of {str(info.path)!r}: {first[:300]}") from None


class OrtRunner(GraphSetRunner):
    """The ORT runner: vision and embed through the graph set, decoder steps with IO binding
    (``runtime/ort_decode.py``: the KV cache stays in ORT between steps; same results)."""

    graphs: OrtGraphSet

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        if not self.active:
            raise QvlmError(f"runner {self.name!r} is not active; use it as a context manager or call activate()")
        with ort_errors("decoder", self.info):
            return bound_decode(self.graphs.session("decoder"), self.info, inputs_embeds, attention_mask,
                                position_ids, past)


def ort_runner(bundle: str | Path | BundleInfo, mode: str = "faithful", threads: int | None = None,
               int4_accuracy: int | None = None) -> GraphSetRunner:
    """A :class:`~.runner.VLMRunner` on ONNX Runtime (CPU) over an exported bundle; activate before use."""
    info = bundle if isinstance(bundle, BundleInfo) else read_bundle(Path(bundle))
    return OrtRunner(OrtGraphSet(info, mode, threads, int4_accuracy), info, name=f"onnxruntime-{mode}")
