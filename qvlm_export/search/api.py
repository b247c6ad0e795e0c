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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..data.synthetic import Sample
from ..errors import QvlmError
from ..manifest import atomic_directory, build_manifest, digest, hash_tree, write_manifest
from ..quant import distributed
from ..quant.recipe import CalibrationSpec, QuantRecipe, load_recipe
from ..quant.state import QuantState

ARTIFACT_KIND = "quant-state"
# methods whose statistics and steps quant/distributed.py reduces (torchrun --nproc-per-node N)
DISTRIBUTED_METHODS = frozenset({"rtn", "smoothquant", "gptq", "awq", "qvlm"})


def calibration_samples(calib: str | Path, spec: CalibrationSpec) -> list[Sample]:
    """The recipe's ``samples`` calibration samples of ``calib`` (a seeded subset when it has more)."""
    from ..data.manifest import load_dataset

    if spec.samples < 1 or spec.batch_size < 1:
        raise QvlmError(f"recipe calibration.samples and batch_size must be at least 1, got {spec.samples} and "
                        f"{spec.batch_size}; fix the recipe")
    samples = load_dataset(calib)
    explicit = str(calib).startswith("builtin:") and str(calib).count(":") == 2
    if len(samples) < spec.samples and not explicit:
        # refused, not clamped: the state's recipe.yaml would claim samples it never saw
        raise QvlmError(f"the recipe asks for calibration.samples {spec.samples} but {str(calib)!r} holds "
                        f"{len(samples)}; set calibration.samples to at most {len(samples)} or pass --calib "
                        "with more samples")
    if len(samples) <= spec.samples:
        return samples  # builtin:calib:N chose N explicitly; the manifest records calibration_samples N
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
    return device != "cpu" and not method.capabilities.whole_model_plan


def _calibrator(vlm, samples, recipe: QuantRecipe, device: str, checkpoint_dir: str | Path | None, blocks: bool):
    from ..quant.calibrate import SequentialCalibrator

    return SequentialCalibrator(vlm, samples, recipe, batch_size=recipe.calibration.batch_size, device=device,
                                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                                block_weights=blocks)


def block_line(done: int, total: int, names: str, extras: dict, seconds: float) -> str:
    """One line per finished block: where the search is, and (Q-VLM) the block's error as it went."""
    units = names.split(",")
    where = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1].rsplit('.', 1)[-1]}"
    stats = (extras.get("qvlm_blocks") or {}).get(units[0])
    error = ""
    if stats:
        error = (f"; block error rtn {stats['rtn_error']:.4g}, start {stats['init_error']:.4g}, "
                 f"searched {stats['searched_error']:.4g}, kept {stats['error']:.4g}")
    return f"block {done}/{total} {where}{error} ({seconds:.1f} s)"


def _run(method, calibrator, progress: bool, log: Callable[[str], None] | None = None) -> QuantState:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    partition = method.plan(calibrator)
    block = method.block
    if "fallback" in calibrator.extras:  # recipe fallback: chosen Linears keep float inputs
        from .fallback import with_fallback

        block = with_fallback(block, set(calibrator.extras["fallback"]["layers"]))
    total = len(partition) if partition else len(calibrator.units)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
               TimeElapsedColumn())
    clock = {"done": 0, "last": time.perf_counter()}

    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task(f"{calibrator.recipe.method} {calibrator.recipe.setting}", total=total)

        def advance(names: str, extras: dict) -> None:
            clock["done"] += 1
            now = time.perf_counter()
            line = block_line(clock["done"], total, names, extras, now - clock["last"])
            clock["last"] = now
            bar.update(task, advance=1, description=line)
            if log is not None:
                log(line)

        return calibrator.run(block, partition, progress=advance)


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
                      checkpoint_dir, samples: list[Sample] | None,
                      log: Callable[[str], None] | None = None) -> tuple[QuantState, list[Sample] | None]:
    """The state and the samples it saw; data-free methods (weight-only RTN) read no data at all."""
    from ..quant.calibrate import quantize_without_data

    if method.capabilities.data_free:
        state = quantize_without_data(vlm, rec, method.weight_rule, device)
        state.extras["calibration"] = {"data": None, "samples": 0, "device": device,
                                       "why": "weight-only round-to-nearest reads no activations"}
        return state, None
    blocks = block_weights(method, device)
    calibrator = _calibrator(vlm, samples, rec, device, checkpoint_dir, blocks)
    if rec.fallback is not None and rec.fallback.max_layers:
        from .fallback import choose_fallback

        calibrator.extras["fallback"] = choose_fallback(
            vlm, calibrator.batches, rec, calibrator.device if calibrator.block_weights else None)
    state = _run(method, calibrator, progress, log)
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
             progress: bool = True, checkpoint_dir: str | Path | None = None, dtype: str = "auto",
             log: Callable[[str], None] | None = None) -> Path:
    """Calibrate ``model`` (default: the embedded model) with ``recipe`` and write a quant state to ``out``.

    ``log`` receives one line per finished block (where the search is, Q-VLM's block errors, seconds):
    what a pipeline log shows when the progress bar is off.

    ``dtype`` (auto | fp32 | fp16 | bf16) is the dtype the model is loaded and calibrated
    in; ``auto`` keeps the checkpoint's own, so a bf16 7B model holds 13.5 GB, not 27.
    """
    import torch

    from ..load.model import load_vlm, resolve_model_path
    from ..memory import QUANTIZE_FACTOR, require_memory, resolve_load_dtype
    from .registry import build_method, check_family

    rec = recipe if isinstance(recipe, QuantRecipe) else load_recipe(recipe)
    rec = rec.with_display(progress=progress and rec.display.progress)  # reaches the methods' per-block bars
    if rec.method == "fp":
        raise QvlmError("method 'fp' is the unquantized model; evaluate it with 'qvlm-export eval' without --quant")
    method = build_method(rec)
    device = resolve_device(device)
    compute, progress, log = _join_ranks(rec, device, progress, log)
    path = resolve_model_path(model)
    load_dtype = resolve_load_dtype(dtype, path)
    require_memory("quantize", path, load_dtype, QUANTIZE_FACTOR)
    data_free = method.capabilities.data_free
    samples = None if data_free else calibration_samples(calib, rec.calibration)  # bad data fails before the load
    # per-block placement (and data-free methods) load on the host and move weights as they go
    on_host = block_weights(method, device) or data_free
    vlm = load_vlm(path, device="cpu" if on_host else compute, dtype=load_dtype)
    check_family(method, vlm.model)
    start = time.perf_counter()
    rotated = _rotate(vlm.model, rec) if rec.rotation is not None else None
    state, samples = _calibrated_state(method, vlm, rec, calib, compute, progress, checkpoint_dir, samples, log)
    state.extras.get("calibration", {})["device"] = device  # "cuda", not this rank's "cuda:1": the state is N's
    if rotated is not None:
        _record_rotation(state, *rotated)
    seconds = time.perf_counter() - start
    state.extras["load_dtype"] = load_dtype
    state = state_to_cpu(state)
    config, inputs = quantize_identity(vlm.path, rec, calib, samples, device, load_dtype)
    del vlm  # the state is all that is written; free the model before serialising it
    gc.collect()  # (safetensors copies every tensor into bytes while saving)
    if not distributed.is_primary():
        distributed.barrier()  # rank 0 writes the one artifact; this rank is done once it has
        return Path(out)
    with atomic_directory(Path(out)) as tmp:
        state.save(tmp)
        write_manifest(tmp, build_manifest(ARTIFACT_KIND, config, inputs, tmp,
                                           extra={"setting": rec.setting, "deployable": rec.deployable,
                                                  "runs_on": rec.runs_on,
                                                  # wall time lives here, not in state.json, so that the
                                                  # state's files are byte-identical across identical runs
                                                  "search_seconds": round(seconds, 3),
                                                  # float reductions, hence searched codes, depend on it
                                                  "torch_threads": torch.get_num_threads(),
                                                  "ranks": distributed.world()}))
    distributed.barrier()
    return Path(out)


def _join_ranks(rec: QuantRecipe, device: str, progress: bool, log):
    """Under torchrun: join the process group; returns the compute device (this rank's GPU) and the
    progress/log settings (rank 0 alone reports)."""
    if not distributed.launched():
        return device, progress, log
    if rec.method not in DISTRIBUTED_METHODS:
        raise QvlmError(f"method {rec.method!r} has no data-parallel calibration yet (torchrun with "
                        f"{distributed.env_world()} ranks); run it as one process, or use one of "
                        f"{sorted(DISTRIBUTED_METHODS)}")
    compute = distributed.setup(device)
    if not distributed.is_primary():
        progress, log = False, None
    return compute, progress, log
