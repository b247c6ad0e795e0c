"""Data-parallel calibration on torch.distributed (``torchrun --nproc-per-node N -m qvlm_export quantize``).

Every rank loads the model, holds the same calibration batches' token ids and pixels, and
walks the same blocks; the activations (the expensive part: boundaries, propagation, every
statistics and error pass) are computed only for the rank's own *whole* calibration batches,
a contiguous slice ``shard(n)`` of the single process's batch list, so batch boundaries are
the single process's. What a method accumulates over batches is reduced so that every rank
gets, bit for bit, what one process computes:

* max / min (activation ranges, channel maxima): order-independent, all-gathered and maxed;
* sums (abs sums, token counts, GPTQ's ``X X^T``, AWQ/SmoothQuant/Q-VLM losses): each rank
  keeps its per-batch *contributions*, they are all-gathered and added in the global batch
  order exactly as the single process's running sum adds them (a float sum in another order
  would not be byte-identical);
* Q-VLM's SGD step on batch ``b`` (one batch per step, drawn from the same seeded generator
  on every rank) is taken by the rank owning ``b``; it broadcasts the gradients and every rank
  applies the same Adam step (an exact copy of the single process's step, not an average).

Rank 0 alone writes checkpoints and the artifact; the others wait at a barrier and exit 0.
A failed or silent peer surfaces as a one-line error (``QVLM_DIST_TIMEOUT`` seconds, default
1800, on every collective), never a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import QvlmError

_state: dict[str, Any] = {"active": False}


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise QvlmError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if env_world() > 1 else 0


def launched() -> bool:
    """Started by torchrun (or any env:// launcher) with more than one process."""
    return env_world() > 1


def is_primary() -> bool:
    """Rank 0, or no launcher: the process that writes artifacts and prints results."""
    return env_rank() == 0


def active() -> bool:
    return bool(_state["active"])


def rank() -> int:
    return _state.get("rank", 0) if active() else 0


def world() -> int:
    return _state.get("world", 1) if active() else 1


def setup(device: str) -> str:
    """Join the process group when launched (gloo on CPU, NCCL on CUDA); returns the device to use.

    Idempotent: ``run`` quantizes several settings in one process group.
    """
    if not launched():
        return device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)  # "cuda" then means this rank's own GPU
        device = f"cuda:{local}"
    if not active():
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if var not in os.environ:
                raise QvlmError(f"WORLD_SIZE is {env_world()} but {var} is not set; launch with "
                                "'torchrun --nproc-per-node N -m qvlm_export ...'")
        seconds = float(os.environ.get("QVLM_DIST_TIMEOUT", "1800"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
        except (RuntimeError, ValueError) as exc:
            raise QvlmError(f"could not join the {backend} process group ({' '.join(str(exc).split())[:200]}); "
                            "check MASTER_ADDR/MASTER_PORT and that every rank was started") from None
        _state.update(active=True, rank=dist.get_rank(), world=dist.get_world_size(), backend=backend)
        atexit.register(_teardown)
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _state["active"] = False


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """A failed peer (it exited, or timed out) becomes a one-line error on this rank, not a traceback."""
    try:
        yield
    except RuntimeError as exc:
        raise QvlmError(f"rank {rank()} of {world()}: {what} failed because another rank stopped or timed out "
                        f"({' '.join(str(exc).split())[:160]}); see the first rank's error above and re-run "
                        "(with --checkpoint-dir the run resumes where it stopped)") from None


# -- the batch split ------------------------------------------------------------------------
def shard(n: int) -> list[int]:
    """This rank's calibration batches: a contiguous slice, so every rank sees whole batches in order."""
    w, r = world(), rank()
    if n < w:
        raise QvlmError(f"the calibration set has {n} batches for {w} ranks; start at most {n} ranks "
                        "(--nproc-per-node) or use more samples / a smaller calibration.batch_size")
    return list(range(r * n // w, (r + 1) * n // w))


def owner(batch: int, n: int) -> int:
    """The rank holding global batch ``batch`` of ``n``."""
    w = world()
    return next(r for r in range(w) if r * n // w <= batch < (r + 1) * n // w)


def local_items(ids: Sequence[int] | None, items: Sequence[Any]) -> list[Any]:
    """The entries of a per-global-batch list that belong to this rank's batches (``ids``)."""
    return list(items) if ids is None else [items[i] for i in ids]


# -- reductions -----------------------------------------------------------------------------
def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (tensors come back on the CPU), in rank order."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world()
    with _collective("all_gather"):
        dist.all_gather_object(out, _to_cpu(obj))
    return out


def in_batch_order(pairs: list[tuple[int, Any]]) -> list[Any]:
    """Per-batch contributions ``(global batch, value)`` of every rank, in the single process's order
    (a batch's several contributions keep their order: the sort is stable)."""
    if not active():
        return [v for _, v in pairs]
    merged = [p for part in all_gather(pairs) for p in part]
    return [v for _, v in sorted(merged, key=lambda p: p[0])]


def chain(local: Any, fold: Callable[[Any, Any], Any], start: Any = None) -> Any:
    """``fold`` over the ranks in rank order (= batch order: the shards are contiguous): rank 0 folds its
    ``local`` into ``start``, passes the result to rank 1, which folds in its own, ...; every rank gets
    the last rank's result. Each rank holds its own contributions and one accumulator, not every
    rank's (what :func:`in_batch_order` gathers), which matters for ``X^T X`` at 7B+ widths."""
    if not active():
        return fold(start, local)
    import torch.distributed as dist

    acc = [start]
    with _collective("ordered reduction"):
        if rank() > 0:
            dist.recv_object_list(acc, src=rank() - 1)
        acc = [_to_cpu(fold(acc[0], local))]
        if rank() < world() - 1:
            dist.send_object_list(acc, dst=rank() + 1)
    return broadcast(acc[0], src=world() - 1)


def float_sum(values: list[float]) -> float:
    """``sum`` in list order, as the single process's ``total += value`` loop."""
    total = 0.0
    for v in values:
        total += v
    return total


def max_float(value: float) -> float:
    return max(all_gather(float(value))) if active() else value


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    box = [obj if rank() == src else None]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_grads(params: Sequence[torch.Tensor], src: int) -> None:
    """Give every rank ``src``'s gradients of ``params`` (None stays None: Adam then skips the parameter)."""
    if not active():
        return
    import torch.distributed as dist

    flags = broadcast([p.grad is not None for p in params] if rank() == src else None, src)
    with_grad = [p for p, f in zip(params, flags) if f]
    if not with_grad:
        return
    device = with_grad[0].device if _state.get("backend") == "nccl" else torch.device("cpu")
    if rank() == src:
        flat = torch.cat([p.grad.detach().reshape(-1).to(device, torch.float64) for p in with_grad])
    else:
        flat = torch.empty(sum(p.numel() for p in with_grad), dtype=torch.float64, device=device)
    with _collective("gradient broadcast"):
        dist.broadcast(flat, src=src)
    if rank() == src:
        return  # the owner keeps its own gradients (float64 round trip is exact, but skip it)
    offset = 0
    for p in with_grad:
        p.grad = flat[offset:offset + p.numel()].reshape(p.shape).to(p.device, p.dtype)
        offset += p.numel()


def barrier() -> None:
    if not active():
        return
    import torch.distributed as dist

    with _collective("barrier"):
        dist.barrier()
