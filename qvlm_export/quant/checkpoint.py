"""Per-block checkpoints of a calibration walk, so a killed search resumes where it stopped.

After each block the calibrator writes that block's decisions (quantized layers, float
overrides, method extras) in the quant-state format into
``<checkpoint_dir>/<fingerprint>/block-<i>/`` (atomically). A rerun with the same
checkpoint directory replays finished blocks from disk instead of searching them (their
activation streams are recomputed from the replayed layers, which is cheap) and searches
the rest. The fingerprint covers everything a block's result depends on (recipe,
partition, units, calibration inputs, a digest of the model weights), so a stale checkpoint is never
replayed into a different run: it is simply not found.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..manifest import atomic_directory
from . import distributed
from .recipe import QuantRecipe
from .state import LayerQuant, QuantState, load_state


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())


def run_fingerprint(model: nn.Module, recipe: QuantRecipe, unit_names: Sequence[str],
                    partition: Sequence[Sequence[int]], inputs: Sequence[torch.Tensor]) -> str:
    """SHA-256 over the recipe, units, partition, calibration inputs and model parameters."""
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": recipe.to_dict(), "units": list(unit_names),
                         "partition": [list(b) for b in partition]}, sort_keys=True, default=str).encode())
    for t in inputs:
        _tensor_digest(h, t)
    # Weights enter as (shape, sum, sum of squares): cheap on 7B models, and any retraining changes them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(d.sum())!r}{float(d.pow(2).sum())!r}".encode())
    return h.hexdigest()


class BlockCheckpoint:
    """Finished blocks of one calibration run, keyed by block position in the partition."""

    def __init__(self, root: Path, fingerprint: str, recipe: QuantRecipe):
        self.dir = Path(root) / fingerprint[:16]
        self.recipe = recipe

    def _path(self, index: int) -> Path:
        return self.dir / f"block-{index:04d}"

    def has(self, index: int) -> bool:
        return (self._path(index) / "state.json").is_file()

    def save(self, index: int, layers: dict[str, LayerQuant], overrides: dict[str, torch.Tensor],
             extras: dict[str, Any]) -> None:
        state = QuantState(recipe=self.recipe, layers=dict(layers), float_overrides=dict(overrides), extras=dict(extras))
        with atomic_directory(self._path(index)) as tmp:
            state.save(tmp)

    def load(self, index: int) -> QuantState:
        return load_state(self._path(index), verify=False)  # no manifest: the fingerprint names it


def finished_block(ckpt: BlockCheckpoint | None, position: int) -> QuantState | None:
    """Block ``position`` as an earlier run saved it, or None; under torchrun rank 0 reads it and sends it
    to the others, so every rank takes the same decision (and no shared filesystem is needed)."""
    if ckpt is None:
        return None
    if not distributed.active():
        return ckpt.load(position) if ckpt.has(position) else None
    done = ckpt.load(position) if distributed.rank() == 0 and ckpt.has(position) else None
    return distributed.broadcast(done)
