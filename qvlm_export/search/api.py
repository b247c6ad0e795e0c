"""``quantize``: the one Python entry point of the search stage (the CLI's ``quantize`` calls it).

recipe -> method (registry) -> ``method.plan`` -> ``SequentialCalibrator.run(method.block)``
-> quant-state artifact (``quant.safetensors``, ``recipe.yaml``, ``state.json``,
``manifest.json``), written atomically.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import time
from pathlib import Path

import numpy as np

from ..data.synthetic import Sample
from ..errors import QvlmError
from ..manifest import atomic_directory, build_manifest, digest, hash_tree, write_manifest
from ..quant.recipe import CalibrationSpec, QuantRecipe, load_recipe
from ..quant.state import QuantState

ARTIFACT_KIND = "quant-state"


def calibration_samples(calib: str | Path, spec: CalibrationSpec) -> list[Sample]:
    """The recipe's ``samples`` calibration samples of ``calib`` (a seeded subset when it has more)."""
    from ..data.manifest import load_dataset

    samples = load_dataset(calib)
    if len(samples) <= spec.samples:
        return samples
    keep = np.sort(np.random.default_rng(spec.seed).choice(len(samples), spec.samples, replace=False))
    return [samples[int(i)] for i in keep]


def samples_digest(samples: list[Sample]) -> str:
    """SHA-256 over the pixels, questions and answers of ``samples`` (builtin or file, same rule)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s.image).tobytes())
        h.update(f"{s.question}|{s.answer}|{s.qtype}\n".encode())
    return h.hexdigest()


def state_to_cpu(state: QuantState) -> QuantState:
    layers = {}
    for name, lq in state.layers.items():
        layers[name] = dataclasses.replace(
            lq, weight_codes=lq.weight_codes.cpu(), weight_scale=lq.weight_scale.cpu(),
            weight_zero_point=lq.weight_zero_point.cpu(),
            input_scale=None if lq.input_scale is None else lq.input_scale.cpu())
    overrides = {k: v.cpu() for k, v in state.float_overrides.items()}
    return dataclasses.replace(state, layers=layers, float_overrides=overrides)


def block_weights(method, device: str) -> bool:
    """Keep only the current block's weights on an accelerator (not on the host, where it changes nothing;
    not for methods whose plan runs the whole model, such as Q-VLM's Jacobian and entropy probes)."""
    return device != "cpu" and not getattr(method, "whole_model_plan", False)


def _calibrator(vlm, samples, recipe: QuantRecipe, device: str, checkpoint_dir: str | Path | None, blocks: bool):
    from ..quant.calibrate import SequentialCalibrator

    return SequentialCalibrator(vlm, samples, recipe, batch_size=recipe.calibration.batch_size, device=device,
                                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                                block_weights=blocks)


def _run(method, calibrator, progress: bool) -> QuantState:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    partition = method.plan(calibrator)
    block = method.block
    if "fallback" in calibrator.extras:  # recipe fallback: chosen Linears keep float inputs
        from .fallback import with_fallback

        block = with_fallback(block, set(calibrator.extras["fallback"]["layers"]))
    total = len(partition) if partition else len(calibrator.units)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
               TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{calibrator.recipe.method} {calibrator.recipe.setting}", total=total)
        return calibrator.run(block, partition,
                              progress=lambda name: bar.update(task, advance=1, description=name.rsplit(",")[-1]))


def resolve_device(device: str | None) -> str:
    """``device`` or the default (cuda when available), refusing cuda without CUDA."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QvlmError(f"device {device!r} requested but CUDA is not available; pass --device cpu")
    return device


def quantize_identity(model_path: Path, rec: QuantRecipe, calib: str | Path, samples: list[Sample] | None,
                      device: str, load_dtype: str) -> tuple[dict, dict]:
    """The (config, inputs) a quant state's manifest records: what ``run`` compares to skip a redo.

    ``samples`` is None for data-free methods (weight-only RTN), which read no calibration data.
    """
    config = {"recipe": rec.to_dict(), "calib": None if samples is None else str(calib),
              "calibration_samples": 0 if samples is None else len(samples), "device": device, "dtype": load_dtype}
    inputs = {"model": digest(hash_tree(model_path))}
    if samples is not None:
        inputs["calibration"] = samples_digest(samples)
    return config, inputs


def _calibrated_state(method, vlm, rec: QuantRecipe, calib, device: str, progress: bool,
                      checkpoint_dir) -> tuple[QuantState, list[Sample] | None]:
    """The state and the samples it saw; data-free methods (weight-only RTN) read no data at all."""
    from ..quant.calibrate import quantize_without_data

    if getattr(method, "data_free", lambda: False)():
        state = quantize_without_data(vlm, rec, method.weight_rule, device)
        state.extras["calibration"] = {"data": None, "samples": 0, "device": device,
                                       "why": "weight-only round-to-nearest reads no activations"}
        return state, None
    samples = calibration_samples(calib, rec.calibration)
    blocks = block_weights(method, device)
    calibrator = _calibrator(vlm, samples, rec, device, checkpoint_dir, blocks)
    if rec.fallback is not None and rec.fallback.max_layers:
        from .fallback import choose_fallback

        calibrator.extras["fallback"] = choose_fallback(
            vlm, calibrator.batches, rec, calibrator.device if calibrator.block_weights else None)
    state = _run(method, calibrator, progress)
    state.extras["calibration"] = {"data": str(calib), "samples": len(samples), "device": device,
                                   "block_weights": blocks}
    return state, samples


def _rotate(model, rec: QuantRecipe) -> tuple[dict, dict]:
    """Fold the recipe's rotation into ``model``; (what it did, the rewritten parameters' values)."""
    from .rotation import rotate_model, rotated_parameters

    info = rotate_model(model, rec.rotation)
    params = dict(model.named_parameters(remove_duplicate=False))
    return info, {n: params[n].detach().cpu().clone() for n in rotated_parameters(model)}


def _record_rotation(state: QuantState, info: dict, values: dict) -> None:
    """Rotated floats the state does not carry as codes become overrides (a method's own overrides win)."""
    for name, value in values.items():
        if not (name.endswith(".weight") and name[:-len(".weight")] in state.layers):
            state.float_overrides.setdefault(name, value)
    state.extras["rotation"] = info


def quantize(model: str | Path | None = None, recipe: str | Path | QuantRecipe = "rtn-w8a8",
             calib: str | Path = "builtin:calib", out: str | Path = "quant", device: str | None = None,
             progress: bool = True, checkpoint_dir: str | Path | None = None, dtype: str = "auto") -> Path:
    """Calibrate ``model`` (default: the embedded model) with ``recipe`` and write a quant state to ``out``.

    ``dtype`` (auto | fp32 | fp16 | bf16) is the dtype the model is loaded and calibrated
    in; ``auto`` keeps the checkpoint's own, so a bf16 7B model holds 13.5 GB, not 27.
    """
    import torch

    from ..load.model import load_vlm, resolve_model_path
    from ..memory import QUANTIZE_FACTOR, require_memory, resolve_load_dtype
    from .registry import get_method

    rec = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    if rec.method == "fp":
        raise QvlmError("method 'fp' is the unquantized model; evaluate it with 'qvlm-export eval' without --quant")
    method = get_method(rec.method)(rec)
    device = resolve_device(device)
    path = resolve_model_path(model)
    load_dtype = resolve_load_dtype(dtype, path)
    require_memory("quantize", path, load_dtype, QUANTIZE_FACTOR)
    # per-block placement (and data-free methods) load on the host and move weights as they go
    on_host = block_weights(method, device) or getattr(method, "data_free", lambda: False)()
    vlm = load_vlm(path, device="cpu" if on_host else device, dtype=load_dtype)
    start = time.perf_counter()
    rotated = _rotate(vlm.model, rec) if rec.rotation is not None else None
    state, samples = _calibrated_state(method, vlm, rec, calib, device, progress, checkpoint_dir)
    if rotated is not None:
        _record_rotation(state, *rotated)
    seconds = time.perf_counter() - start
    state.extras["load_dtype"] = load_dtype
    state = state_to_cpu(state)
    config, inputs = quantize_identity(vlm.path, rec, calib, samples, device, load_dtype)
    del vlm  # the state is all that is written; free the model before serialising it
    gc.collect()  # (safetensors copies every tensor into bytes while saving)
    with atomic_directory(Path(out)) as tmp:
        state.save(tmp)
        write_manifest(tmp, build_manifest(ARTIFACT_KIND, config, inputs, tmp,
                                           extra={"setting": rec.setting, "deployable": rec.deployable,
                                                  "runs_on": rec.runs_on,
                                                  # wall time lives here, not in state.json, so that the
                                                  # state's files are byte-identical across identical runs
                                                  "search_seconds": round(seconds, 3),
                                                  # float reductions, hence searched codes, depend on it
                                                  "torch_threads": torch.get_num_threads()}))
    return Path(out)
