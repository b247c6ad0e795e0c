"""The quantizers a user would otherwise run, applied to qvlm-export's FP bundle (used by bench_peers.py).

Each peer takes the FP bundle's vision and decoder graphs (the embedding is a Gather every
tool leaves alone), quantizes them with the peer's own API and writes a bundle that our
ONNX Runtime runtime answers with, so every row is evaluated by the same code:

* ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations;
  MinMax, Entropy or Percentile calibration on feeds recorded from the FP bundle);
* ONNX Runtime's ``MatMulNBitsQuantizer`` (int4 weights, blocks of 128: its default RTN, HQQ,
  and GPTQ on recorded feeds);
* NVIDIA ModelOpt's ``modelopt.onnx.quantization.quantize`` (int8, int4 ``awq_clip``), run in
  its own virtual environment because its ``[onnx]`` extra pins other onnx/onnxruntime
  versions (see :func:`modelopt_graph`).

A peer that fails on a graph raises :class:`PeerFailed` with the peer's own first error line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from qvlm_export.runtime.bundle import read_bundle, refresh_bundle

QUANTIZED_GRAPHS = ("vision", "decoder")


class PeerFailed(RuntimeError):
    """A peer could not quantize a graph (message: what it said)."""


class FeedRecorder:
    """Wraps a runner's graph set and keeps every feed it runs, per graph (the calibration data)."""

    def __init__(self, graphs, limit: int = 4096):
        self.graphs, self.limit = graphs, limit
        self.feeds: dict[str, list[dict[str, np.ndarray]]] = {}

    def activate(self):
        return self.graphs.activate()

    def deactivate(self) -> None:
        self.graphs.deactivate()

    def run(self, graph: str, feeds: dict[str, np.ndarray]):
        kept = self.feeds.setdefault(graph, [])
        if len(kept) < self.limit:
            kept.append({k: np.array(v) for k, v in feeds.items()})
        return self.graphs.run(graph, feeds)


def record_feeds(fp_bundle: Path, samples, batch_size: int = 8, max_new_tokens: int = 8) -> dict[str, list[dict]]:
    """Run the FP bundle over ``samples`` (greedy generation) and return each graph's feeds."""
    from qvlm_export.runtime.generate import RunnerAnswerer
    from qvlm_export.runtime.ort_runner import OrtGraphSet
    from qvlm_export.runtime.runner import GraphSetRunner

    info = read_bundle(fp_bundle)
    recorder = FeedRecorder(OrtGraphSet(info, "faithful"))
    with RunnerAnswerer(GraphSetRunner(recorder, info, "recorder"), max_new_tokens=max_new_tokens) as answerer:
        for start in range(0, len(samples), batch_size):
            answerer.answer(samples[start:start + batch_size])
    return recorder.feeds


def _reader(feeds: list[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class ListReader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def rewind(self):
            self.items = iter(feeds)

    return ListReader()


def write_peer_bundle(fp_bundle: Path, out: Path, graphs: dict[str, onnx.ModelProto]) -> Path:
    """A copy of the FP bundle with ``graphs`` replaced (re-hashed, so it loads with verification on)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp_bundle, out)
    info = read_bundle(out, verify=False)
    for name, model in graphs.items():
        onnx.save(model, str(out / info.graphs[name].file))
    refresh_bundle(out)
    return out


def ort_static_graph(path: Path, feeds: list[dict], calibration: str, op_types: list[str] | None = None,
                     same_shape: bool = False) -> onnx.ModelProto:
    """ONNX Runtime ``quantize_static`` as its documentation shows it: QDQ, per-channel weights, its default
    types (uint8 activations, int8 weights). ``op_types``: the ops to quantize (None: every op it supports);
    ``same_shape``: calibrate on the largest group of equally shaped feeds (its histogram calibrators
    cannot stack decoder feeds of different lengths)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        try:
            quantize_static(str(path), str(out), _reader(_same_shape_group(feeds) if same_shape else feeds),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=method, op_types_to_quantize=op_types,
                            extra_options={"CalibMaxIntermediateOutputs": 64})
        except Exception as exc:  # noqa: BLE001 - the peer's own error is the finding
            raise PeerFailed(_first_line(exc)) from None
        return onnx.load(str(out))


def ort_nbits_graph(path: Path, feeds: list[dict], algorithm: str) -> onnx.ModelProto:
    """ONNX Runtime's int4 ``MatMulNBits`` weight-only quantizer: ``rtn`` (its default), ``hqq``, ``gptq``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True)
    elif algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=128, bits=4)
    else:
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=_reader(feeds), block_size=128)
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=config)
        quantizer.process()
        return quantizer.model.model
    except Exception as exc:  # noqa: BLE001
        raise PeerFailed(_first_line(exc)) from None


def modelopt_graph(path: Path, feeds: list[dict], mode: str, python: Path, options: dict) -> onnx.ModelProto:
    """ModelOpt's ONNX PTQ in its own interpreter ``python`` (``mode``: int8 | int4), calibration from ``feeds``.

    ModelOpt takes one calibration array per input with a common leading dimension, so the
    feeds are grouped by shape and the largest group of identical shapes is passed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = _same_shape_group(feeds)
        np.savez(tmp / "calib.npz", **{k: np.concatenate([f[k] for f in calib]) for k in calib[0]})
        out = tmp / "q.onnx"
        script = ("import sys, json; import numpy as np; from modelopt.onnx.quantization import quantize; "
                  "a = json.loads(sys.argv[1]); d = dict(np.load(a['calib'])); "
                  "quantize(onnx_path=a['src'], quantize_mode=a['mode'], calibration_data=d, output_path=a['out'], "
                  "calibration_eps=['cpu'], **a['options'])")
        args = {"src": str(path), "mode": mode, "calib": str(tmp / "calib.npz"), "out": str(out), "options": options}
        proc = subprocess.run([str(python), "-c", script, json.dumps(args)], capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0 or not out.is_file():
            lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            raise PeerFailed(lines[-1][:300] if lines else f"exit {proc.returncode}")
        return onnx.load(str(out))


def _same_shape_group(feeds: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for f in feeds:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(f.items())), []).append(f)
    return max(groups.values(), key=len)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def quantize_bundle(fp_bundle: Path, out: Path, feeds: dict[str, list[dict]], peer) -> Path:
    """Apply ``peer(graph_path, graph_feeds) -> ModelProto`` to the vision and decoder graphs.

    Each peer sees a private copy of the graph: some write beside their input (ModelOpt
    rewrote the FP bundle's decoder.onnx in place), and the FP bundle must stay the reference.
    """
    info = read_bundle(fp_bundle)
    graphs = {}
    for g in QUANTIZED_GRAPHS:
        with tempfile.TemporaryDirectory() as tmp:
            private = Path(tmp) / info.graph_path(g).name
            shutil.copy2(info.graph_path(g), private)
            graphs[g] = peer(private, feeds[g])
    return write_peer_bundle(fp_bundle, out, graphs)


if __name__ == "__main__":  # pragma: no cover - a module for bench_peers.py
    sys.exit("run tools/bench_peers.py")
