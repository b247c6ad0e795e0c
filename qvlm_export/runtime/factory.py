"""Answerers over exported artifacts, for ``eval``, ``generate`` and validation.

``answerer_for_bundle`` runs an ONNX bundle on ONNX Runtime; ``answerer_for_engines`` runs a
TensorRT engine directory (tensorrt is imported only when its runner activates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import read_bundle
from .generate import RunnerAnswerer
from .ort_runner import ort_runner


def _describe(info, backend: str, **extra: Any) -> dict[str, Any]:
    quant = info.quant
    return {"backend": backend, "bundle": str(info.path), "setting": info.setting, "dtype": info.dtype,
            "method": quant.get("method"), "deployable": quant.get("deployable", True),
            "runs_on": quant.get("runs_on"), **extra}


def answerer_for_bundle(bundle: Path, mode: str = "faithful", threads: int | None = None,
                        max_new_tokens: int = 8, int4_accuracy: int | None = None) -> tuple[RunnerAnswerer, dict[str, Any]]:
    """Greedy answers from an ONNX bundle on ONNX Runtime (``mode``: faithful | fast)."""
    info = read_bundle(Path(bundle))
    runner = ort_runner(info, mode=mode, threads=threads, int4_accuracy=int4_accuracy)
    return RunnerAnswerer(runner, max_new_tokens=max_new_tokens), _describe(info, f"onnxruntime-{mode}", mode=mode)


def answerer_for_engines(engines: Path, bundle: Path | None = None,
                         max_new_tokens: int = 8) -> tuple[RunnerAnswerer, dict[str, Any]]:
    """Greedy answers from TensorRT engines; the bundle metadata comes from the copy beside the engines.

    ``bundle`` (an ONNX bundle directory) overrides where the processor is read from.
    """
    from ..engine.trt_runner import tensorrt_runner

    runner = tensorrt_runner(Path(engines))
    processor = read_bundle(Path(bundle)).load_processor() if bundle is not None else None
    return (RunnerAnswerer(runner, processor=processor, max_new_tokens=max_new_tokens),
            _describe(runner.info, "tensorrt", engines=str(engines)))
