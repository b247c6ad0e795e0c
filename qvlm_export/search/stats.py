"""Activation statistics of a block's Linears, gathered with forward hooks on the quantized stream.

Every baseline measures the inputs its Linears see while the calibrator's quantized
stream (``ctx.q_inputs``) runs through the block, with earlier decisions already in place:

* per-tensor absmax: the static symmetric activation scale (``absmax / qmax``),
* per-input-channel absmax: SmoothQuant's ``max|X_j|``,
* per-input-channel mean of ``|x|``: AWQ's activation salience,
* ``sum x x^T`` over tokens: GPTQ's Hessian ``H = 2 X X^T / n``,
* a strided subset of input rows: AWQ's clipping search.

Padding tokens of the left-padded decoder batches are excluded (their hidden states are
never attended to by real tokens, yet they would widen ranges and bias the Hessian).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..quant import distributed
from ..quant.calibrate import BlockContext


@dataclass
class InputStats:
    """Running statistics of one Linear's input over the calibration tokens."""

    tokens: int = 0
    absmax: torch.Tensor | None = None  # scalar
    channel_absmax: torch.Tensor | None = None  # [in]
    channel_abssum: torch.Tensor | None = None  # [in]
    xtx: torch.Tensor | None = None  # [in, in], sum over tokens of x x^T (only when asked)
    rows: list[torch.Tensor] | None = None  # strided token subsets (only when asked)

    @property
    def channel_absmean(self) -> torch.Tensor:
        return self.channel_abssum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2/n * sum x x^T``."""
        return 2.0 * self.xtx / max(self.tokens, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.rows, dim=0)

    def update(self, x: torch.Tensor, hessian: bool, keep_every: int) -> None:
        """Add a ``[tokens, in]`` batch of inputs."""
        x = x.detach().float()
        amax = x.abs().amax(dim=0)
        self.tokens += x.shape[0]
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_abssum = amax, x.abs().sum(dim=0)
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, amax)
            self.channel_abssum = self.channel_abssum + x.abs().sum(dim=0)
        self.absmax = self.channel_absmax.max()
        if hessian:
            xtx = x.t() @ x
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        if keep_every:
            self.rows = (self.rows or []) + [x[::keep_every].clone()]

    def add(self, part: InputStats) -> None:
        """Fold in the statistics of one :meth:`update` (another rank's batch) with the very float operations
        ``update`` would have done here, so the merged result is byte-identical to one process's."""
        self.tokens += part.tokens
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_abssum = part.channel_absmax, part.channel_abssum
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, part.channel_absmax)
            self.channel_abssum = self.channel_abssum + part.channel_abssum
        self.absmax = self.channel_absmax.max()
        if part.xtx is not None:
            self.xtx = part.xtx if self.xtx is None else self.xtx + part.xtx
        if part.rows is not None:
            self.rows = (self.rows or []) + part.rows

    def to(self, device) -> InputStats:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return InputStats(self.tokens, move(self.absmax), move(self.channel_absmax), move(self.channel_abssum),
                          move(self.xtx), None if self.rows is None else [r.to(device) for r in self.rows])


def token_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``[batch, seq]`` bool mask of real tokens, or None when every token is real.

    The decoder's 4D mask ``[batch, 1, q, k]`` lets the last query (always a real token
    with left padding) see exactly the real keys; boolean masks mark allowed positions
    with True, additive float masks with 0.
    """
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    last = mask[:, 0, -1, :]
    return last if last.dtype == torch.bool else last == 0


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten ``[..., in]`` to ``[tokens, in]`` keeping real tokens only."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def unit_of(ctx: BlockContext, name: str) -> int:
    """Index of the block unit that owns the module ``name``."""
    for i, unit in enumerate(ctx.units):
        if name == unit.name or name.startswith(unit.name + "."):
            return i
    raise KeyError(name)


def batch_mask(ctx: BlockContext, unit: int, batch: int) -> torch.Tensor | None:
    return token_mask(ctx.kwargs[unit][batch])


def run_block(ctx: BlockContext, fp: bool = False) -> list[torch.Tensor]:
    """Outputs of the block for every calibration batch (quantized stream unless ``fp``)."""
    with torch.no_grad():
        return [ctx.forward(x, b, fp=fp) for b, x in enumerate(ctx.q_inputs)]


def collect_input_stats(ctx: BlockContext, names: Iterable[str], hessian: bool = False,
                        keep_tokens: int = 0) -> dict[str, InputStats]:
    """Statistics of the inputs of the Linears ``names`` over the block's quantized stream.

    ``keep_tokens`` > 0 also keeps about that many input rows per Linear (an even stride
    over the calibration tokens) for searches that need the inputs themselves.
    """
    names = list(names)
    stats = {n: InputStats() for n in names}
    n_tokens = sum(x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0] for x in ctx.q_inputs)
    if distributed.active():
        n_tokens = sum(distributed.all_gather(n_tokens))  # the stride is the single process's
    keep_every = max(n_tokens // keep_tokens, 1) if keep_tokens else 0
    current: dict[str, int] = {"batch": 0}
    handles = []
    parts: dict[str, list] = {n: [] for n in names}  # distributed: (global batch, one update's statistics)
    ids = ctx.batch_ids

    def make_hook(name: str, unit: int):
        def hook(_module, args):
            x = _rows(args[0], batch_mask(ctx, unit, current["batch"]))
            if ids is None:
                stats[name].update(x, hessian, keep_every)
            else:
                parts[name].append((ids[current["batch"]], part := InputStats()))
                part.update(x, hessian, keep_every)
        return hook

    for name in names:
        handles.append(ctx.root.get_submodule(name).register_forward_pre_hook(make_hook(name, unit_of(ctx, name))))
    try:
        with torch.no_grad():
            for b, x in enumerate(ctx.q_inputs):
                current["batch"] = b
                ctx.forward(x, b)
    finally:
        for h in handles:
            h.remove()
    return stats if ids is None else _merged(parts, ctx.q_inputs[0].device)


def _merged(parts: dict[str, list], device) -> dict[str, InputStats]:
    """Every rank's per-batch statistics added up in the single process's batch order (passed from rank to
    rank: the shards are contiguous, and each rank's parts are in its batch order)."""
    def fold(acc: dict[str, InputStats] | None, local: dict[str, list]) -> dict[str, InputStats]:
        acc = {n: InputStats() for n in local} if acc is None else {n: s.to(device) for n, s in acc.items()}
        for name, pairs in local.items():
            for _, part in pairs:
                acc[name].add(part)
        return acc

    return {n: s.to(device) for n, s in distributed.chain(parts, fold).items()}


def input_groups(ctx: BlockContext) -> list[list[str]]:
    """The block's quantizable Linears grouped by shared input, in forward order.

    Linears fed the very same tensor (q/k/v after a norm, gate/up) form one group: a
    sequential method quantizes a group, then measures the next group's inputs with the
    earlier groups already quantized (GPTQ's "true sequential" order).
    """
    linears = [name for name, _ in ctx.linears()]
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []

    def make_hook(name: str):
        def hook(_module, args):
            calls.append((name, args[0]))
        return hook

    for name in linears:
        handles.append(ctx.root.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            ctx.forward(ctx.q_inputs[0], 0)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    inputs: list[torch.Tensor] = []  # holding references keeps tensor identities unique
    for name, x in calls:
        if any(name in g for g in groups):
            continue
        for g, seen in zip(groups, inputs):
            if x is seen:
                g.append(name)
                break
        else:
            groups.append([name])
            inputs.append(x)
    called = {n for g in groups for n in g}
    return groups + [[n] for n in linears if n not in called]


def masked_mse(ctx: BlockContext, outputs: list[torch.Tensor], targets: list[torch.Tensor],
               unit: int | None = None) -> float:
    """Mean squared error over real tokens of per-batch outputs of ``unit`` (default: the block's last)."""
    total, count = 0.0, 0
    unit = len(ctx.units) - 1 if unit is None else unit
    terms = []
    for b, (out, ref) in enumerate(zip(outputs, targets)):
        diff = _rows(out - ref, batch_mask(ctx, unit, b))
        terms.append((float(diff.double().pow(2).sum()), diff.numel()))
    if ctx.batch_ids is not None:  # every rank's batches, summed in the single process's order
        terms = distributed.in_batch_order(list(zip(ctx.batch_ids, terms)))
    for term, n in terms:
        total += term
        count += n
    return total / max(count, 1)


def capture_calls(ctx: BlockContext, name: str) -> list[tuple[tuple, dict[str, Any]]]:
    """The (args, kwargs) module ``name`` receives for each calibration batch of the quantized stream."""
    calls: list[tuple[tuple, dict[str, Any]]] = []
    handle = ctx.root.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        run_block(ctx)
    finally:
        handle.remove()
    return calls
