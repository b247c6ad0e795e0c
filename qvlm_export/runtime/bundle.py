"""``bundle.json``: what a runtime needs to run an exported bundle without the HF model directory.

Bundle directory (written by :func:`qvlm_export.export.api.export_bundle`)::

    onnx/vision_encoder{sfx}.onnx  onnx/embed_tokens{sfx}.onnx  onnx/decoder_model_merged{sfx}.onnx
                                   the three graphs (opset 21; fp32 or fp16 interface), named as
                                   transformers.js loads them ({sfx}: dtype suffix, see export.hf_layout)
    onnx/<file>.onnx_data          its weights, for graphs over ExportConfig.external_data_bytes
    config.json, processor and tokenizer files   the HF model directory minus its weights
    bundle.json                    this description (format below)
    manifest.json                  versions, resolved export config, input/output hashes

Bundles written before the HF layout keep ``vision.onnx`` etc. at the top and the
processor in ``processor/``; every reader goes through ``graphs.*.file`` and
``processor``, so both layouts load.

``bundle.json``::

    {"format": 1, "dtype": "fp32" | "fp16", "opset": 21,
     "graphs": {"vision": {"file", "inputs", "outputs", "sha256",
                           "weight_bytes": {"total", "linear", "linear_fp16"}}, "embed": ..., "decoder": ...},
     "model": {"image_token_id", "eos_token_id", "pad_token_id", "num_layers", "num_kv_heads", "head_dim",
               "hidden_size", "vocab_size", "image_seq_length", "image_size", "max_positions",
               "family", "image_layout"},   (the last two only for families other than llava:
               the HF model_type, and families/anyres.py's tile-packing layout)
     "quant": {"setting", "method", "deployable", "runs_on", "weight_bits", "act_bits", "group_size",
               "layers", "state_sha256"},
     "processor": "."}   (the processor's directory, relative to the bundle)

``weight_bytes.linear`` counts the Linear weights as stored (integer codes + scales for
quantized layers), ``linear_fp16`` what the same weights take in fp16.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError

BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
GRAPHS = ("vision", "embed", "decoder")


@dataclass(frozen=True)
class GraphIO:
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str = ""
    weight_bytes: dict[str, int] = field(default_factory=dict)
    data_file: str = ""  # ONNX external data beside the graph ("" when the weights are inside it)
    data_sha256: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """The model config a runtime needs: special tokens and cache geometry."""

    image_token_id: int
    eos_token_id: int
    pad_token_id: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    image_seq_length: int
    image_size: int
    max_positions: int | None = None  # text model's max_position_embeddings (None: bundles before it was recorded)
    family: str = "llava"  # the HF model_type (qvlm_export.families)
    image_layout: dict[str, Any] = field(default_factory=dict)  # how tile features become image tokens

    def to_json(self) -> dict[str, Any]:
        """LLaVA-1.5 bundles keep the fields they always had (their bundle.json stays byte-identical)."""
        raw = asdict(self)
        if self.family == "llava" and not self.image_layout:
            del raw["family"], raw["image_layout"]
        return raw


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    dtype: str
    opset: int
    graphs: dict[str, GraphIO]
    model: ModelSpec
    quant: dict[str, Any]
    processor: str = "processor"

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.dtype == "fp16" else np.float32)

    @property
    def setting(self) -> str:
        return str(self.quant.get("setting", "fp"))

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.model.num_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.model.num_layers) for kv in ("key", "value")]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.model.num_kv_heads, 0, self.model.head_dim)
        return [np.zeros(shape, self.float_dtype) for _ in self.past_names()]

    def graph_path(self, graph: str) -> Path:
        path = self.path / self.graphs[graph].file
        if not path.is_file():
            raise QvlmError(f"bundle {str(self.path)!r} lacks {self.graphs[graph].file}; re-run `qvlm-export export`")
        return path

    def graph_bytes(self) -> int:
        """Bytes of the three graphs on disk, external data included (what a client downloads for weights)."""
        files = [self.path / io.file for io in self.graphs.values()]
        files += [self.path / io.data_file for io in self.graphs.values() if io.data_file]
        return sum(f.stat().st_size for f in files if f.is_file())

    def load_processor(self):
        """The processor saved in the bundle (left padding, as generation needs)."""
        from transformers.utils import logging as hf_logging

        from ..families import family_for

        hf_logging.set_verbosity_error()
        processor = family_for(self.model.family).load_processor(self.path / self.processor)
        processor.tokenizer.padding_side = "left"
        return processor

    def to_json(self) -> dict[str, Any]:
        graphs = {g: {"file": io.file, "inputs": list(io.inputs), "outputs": list(io.outputs), "sha256": io.sha256,
                      "weight_bytes": dict(io.weight_bytes),
                      **({"data_file": io.data_file, "data_sha256": io.data_sha256} if io.data_file else {})}
                  for g, io in self.graphs.items()}
        return {"format": BUNDLE_FORMAT, "dtype": self.dtype, "opset": self.opset, "graphs": graphs,
                "model": self.model.to_json(), "quant": self.quant, "processor": self.processor}


def write_bundle_json(info: BundleInfo, out_dir: Path) -> None:
    (Path(out_dir) / BUNDLE_FILE).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")


def verify_bundle(path: Path) -> None:
    """Check the bundle's files against its manifest (or the engine directory's, for its ``bundle/`` copy)."""
    from ..manifest import verify_artifact

    if not (path / "manifest.json").is_file() and (path.parent / "manifest.json").is_file():
        verify_artifact(path.parent, "engines", verify=True)
    else:
        verify_artifact(path, "onnx-bundle", verify=True)


def refresh_bundle(path: str | Path) -> None:
    """After a deliberate edit of a bundle's graphs (fault injection): re-hash bundle.json and manifest.json."""
    from ..manifest import refresh_manifest_outputs, sha256_file

    path = Path(path)
    raw = json.loads((path / BUNDLE_FILE).read_text())
    for graph in raw["graphs"].values():
        graph["sha256"] = sha256_file(path / graph["file"])
    (path / BUNDLE_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    refresh_manifest_outputs(path)


def read_bundle(path: str | Path, verify: bool | None = None) -> BundleInfo:
    """Read ``bundle.json`` from a bundle directory (or the ``bundle/`` copy inside an engine directory).

    ``verify`` (None: the process-wide setting, on by default) first checks every file
    against the SHA-256 the manifest records (cached per process).
    """
    from ..manifest import should_verify

    path = Path(path)
    file = path / BUNDLE_FILE
    if not file.is_file():
        raise QvlmError(f"{str(path)!r} is not an ONNX bundle: no {BUNDLE_FILE} (write one with `qvlm-export export`)")
    if should_verify(verify):
        verify_bundle(path)
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise QvlmError(f"{file} is not valid JSON ({exc.msg}); re-run `qvlm-export export`") from None
    if raw.get("format") != BUNDLE_FORMAT:
        raise QvlmError(f"{file}: bundle format {raw.get('format')!r} is not supported (expected {BUNDLE_FORMAT}); "
                        "re-export with this version")
    try:
        graphs = {g: GraphIO(file=d["file"], inputs=tuple(d["inputs"]), outputs=tuple(d["outputs"]),
                             sha256=d.get("sha256", ""), weight_bytes=dict(d.get("weight_bytes", {})),
                             data_file=d.get("data_file", ""), data_sha256=d.get("data_sha256", ""))
                  for g, d in raw["graphs"].items()}
        info = BundleInfo(path=path, dtype=raw["dtype"], opset=int(raw["opset"]), graphs=graphs,
                          model=ModelSpec(**raw["model"]), quant=dict(raw.get("quant", {})),
                          processor=raw.get("processor", "processor"))
    except (KeyError, TypeError) as exc:
        raise QvlmError(f"{file} is missing or has a malformed field ({exc}); re-run `qvlm-export export`") from None
    missing = [g for g in GRAPHS if g not in info.graphs]
    if missing:
        raise QvlmError(f"{file} describes no {missing[0]!r} graph; a bundle has {', '.join(GRAPHS)}")
    return info
