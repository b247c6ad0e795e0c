"""Per-block choice between Q-VLM's searched block and the combination's (``choose_per_block``).

The additions (QIG's token weights, Q-ViT's DGD) change the objective the block search minimises,
so a block searched with them can end with a larger *plain* block error than Q-VLM's own search.
With ``choose_per_block`` each block is searched twice from the same start: once exactly as
``qvlm`` (no hooks), once with the additions; the one with the smaller unweighted block error
(:func:`..qvlm.block_search.block_error`, Q-VLM's objective without token weights or DGD) on the
held-out calibration batches (Q-VLM's ``holdout`` split; all batches when there is none) is
committed, ties to Q-VLM. So on every block the combination is never above Q-VLM's search on
Q-VLM's own held-out objective, given the same block input. Costs a second search per block.
``choose_on: both`` asks more: the combined search must also have the smaller unweighted error on
the whole calibration set (one held-out batch of 16 samples is a noisy judge, and the minimum of
two noisy estimates favours the lucky one).
"""

from __future__ import annotations

import torch

from ...quant.calibrate import BlockContext
from ..qvlm.block_search import block_error, split_batches
from ..qvlm.config import QVLMConfig
from ..qvlm.start import swap_module


class HeldOutJudge:
    """The block's unweighted error on the held-out batches, for whatever is committed in it now."""

    def __init__(self, ctx: BlockContext, cfg: QVLMConfig, masks: list[torch.Tensor | None]):
        self.ctx, self.cfg, self.masks = ctx, cfg, masks
        with torch.no_grad():
            self.targets = [ctx.forward(x, b, fp=True) for b, x in enumerate(ctx.fp_inputs)]
        held = split_batches(len(ctx.q_inputs), cfg.holdout)[1]
        self.batches = held or None  # None: every batch

    def __call__(self) -> tuple[float, float]:
        """(held-out error, error on every calibration batch)."""
        held = block_error(self.ctx, self.targets, self.masks, self.cfg.token_normalised, self.batches)
        every = held if self.batches is None else block_error(self.ctx, self.targets, self.masks,
                                                              self.cfg.token_normalised)
        return held, every


def restore_linears(ctx: BlockContext, originals: dict[str, torch.nn.Module]) -> None:
    """Put the block's float Linears back (undo a committed search) so it can be searched again."""
    for name, lin in originals.items():
        swap_module(ctx, name, lin)
        ctx.layers.pop(name, None)
