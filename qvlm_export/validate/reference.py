"""The reference side of validation: resolve the FP reference, build calibration feeds, run it once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from ..runtime.bundle import BUNDLE_FILE, GRAPHS, BundleInfo, read_bundle
from .config import ValidateConfig
from .feeds import decoder_feeds
from .parity import load_reference, run_reference

Log = Callable[[str], None]
IDENTITY_FILE = "reference.json"


@dataclass
class Reference:
    info: BundleInfo
    kind: str  # "bundle" | "model (exported to an FP bundle for this run)"
    path: str
    feeds: dict[str, list[dict[str, np.ndarray]]]
    results: dict[str, Any]  # graph -> Polygraphy RunResults of the reference

    def outputs(self, graph: str) -> list[Any]:
        """The reference's outputs for ``graph``, one mapping per feed (its only runner's iterations)."""
        return [iterations for _, iterations in self.results[graph].items()][0]


def resolve_reference(reference: str | Path, scratch: Path, log: Log) -> tuple[BundleInfo, str]:
    """An FP bundle as given, or the FP export of a Hugging Face model directory."""
    path = Path(reference)
    if (path / BUNDLE_FILE).is_file():
        info, kind = read_bundle(path), "bundle"
    elif (path / "config.json").is_file():
        from ..export.api import export_bundle

        log(f"reference {path} is a model directory: exporting its FP bundle")
        info, kind = read_bundle(export_bundle(model=path, out=scratch / "reference-bundle")), "model"
    else:
        raise QvlmError(f"--reference {str(path)!r} is neither an ONNX bundle (no bundle.json) nor a Hugging Face "
                        "model directory (no config.json)")
    if info.setting != "fp":
        raise QvlmError(f"--reference {str(path)!r} is a quantized ({info.setting}) bundle; pass the FP bundle "
                        "(qvlm-export export without --quant) or the model directory")
    return info, kind


def calibration_batches(info: BundleInfo, config: ValidateConfig) -> list[dict[str, np.ndarray]]:
    """Processor outputs of the calibration samples in batches: input_ids, attention_mask, and ``tiles`` (the
    vision graph's input) plus what packing their features needs (``images``, see runtime/images.py)."""
    from ..data.manifest import load_dataset
    from ..load.model import build_prompt
    from ..runtime.images import image_inputs, vision_tiles

    samples = load_dataset(config.calib, limit=config.calib_samples)
    processor = info.load_processor()
    batches = []
    for start in range(0, len(samples), config.batch_size):
        chunk = samples[start:start + config.batch_size]
        enc = processor(images=[s.image for s in chunk], text=[build_prompt(processor, s.question) for s in chunk],
                        return_tensors="np", padding=True)
        images = image_inputs(info, enc)
        batches.append({"input_ids": enc["input_ids"].astype(np.int64),
                        "attention_mask": enc["attention_mask"].astype(np.int64),
                        "tiles": vision_tiles(info, images), "images": images})
    return batches


def build_feeds(info: BundleInfo, config: ValidateConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-graph feeds; decoder feeds are advanced with the reference graphs (faithful ORT)."""
    from ..runtime.images import pack_features
    from ..runtime.ort_runner import OrtGraphSet

    vision_in, embed_in = info.graphs["vision"].inputs[0], info.graphs["embed"].inputs[0]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in GRAPHS}
    graphs = OrtGraphSet(info, "faithful", config.threads).activate()
    try:
        for batch in calibration_batches(info, config):
            feeds["vision"].append({vision_in: batch["tiles"]})
            feeds["embed"].append({embed_in: batch["input_ids"]})
            tile_features = graphs.run("vision", {vision_in: batch["tiles"]})[info.graphs["vision"].outputs[0]]
            features = pack_features(info, tile_features, batch["images"])
            feeds["decoder"] += decoder_feeds(graphs.run, info, batch["input_ids"], batch["attention_mask"],
                                              features, config.decode_steps)
    finally:
        graphs.deactivate()
    return feeds


def prepare_reference(reference: str | Path, config: ValidateConfig, polygraphy_dir: Path, scratch: Path,
                      log: Log, reuse: Path | None = None) -> Reference:
    """Resolve the reference, then run it once per graph (saving feeds and outputs) or reload a saved run."""
    from .runners import ort_graph_runner

    info, kind = resolve_reference(reference, scratch, log)
    feeds, results = {}, {}
    identity = reference_identity(info, config)
    if reuse is not None:
        log(f"reusing the saved reference run in {reuse}")
        check_reusable(Path(reuse), identity)
        for graph in GRAPHS:
            feeds[graph], results[graph] = load_reference(graph, reuse)
            run_reference_copy(reuse, polygraphy_dir, graph)
    else:
        log(f"building calibration feeds ({config.calib_samples} samples of {config.calib})")
        feeds = build_feeds(info, config)
        for graph in GRAPHS:
            log(f"reference {graph}: {len(feeds[graph])} feeds")
            results[graph] = run_reference(graph, ort_graph_runner(info, graph, "faithful", config.threads),
                                           feeds[graph], polygraphy_dir)
    (polygraphy_dir / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    return Reference(info=info, kind=kind, path=str(reference), feeds=feeds, results=results)


def reference_identity(info: BundleInfo, config: ValidateConfig) -> dict[str, Any]:
    """What a saved reference run depends on: the graphs' hashes and how the feeds were made."""
    return {"graphs": {g: info.graphs[g].sha256 for g in GRAPHS},
            "feeds": {k: getattr(config, k) for k in ("calib", "calib_samples", "batch_size", "decode_steps")}}


def check_reusable(saved_dir: Path, identity: dict[str, Any]) -> None:
    path = saved_dir / IDENTITY_FILE
    if not path.is_file():
        raise QvlmError(f"--reuse-reference {str(saved_dir)!r} has no {IDENTITY_FILE}; point it at the polygraphy/ "
                        "folder of an earlier validate report")
    saved = json.loads(path.read_text())
    for section in ("graphs", "feeds"):
        for key, value in identity[section].items():
            if saved.get(section, {}).get(key) != value:
                raise QvlmError(f"the saved reference in {str(saved_dir)!r} was made with a different {section[:-1]} "
                                f"{key!r} ({saved.get(section, {}).get(key)!r} vs {value!r}); run without reuse")


def run_reference_copy(src: Path, dst: Path, graph: str) -> None:
    """Copy a reused reference run into this report, so every report carries the numbers it was judged on."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in (f"{graph}.inputs.json", f"{graph}.reference.json", IDENTITY_FILE):
        shutil.copyfile(Path(src) / name, dst / name)
