"""The Q-VLM method (registered as ``qvlm``): plan the blocks from entropy, then search each block.

``plan`` (once, before the walk):
  1. with the visual-encoder optimisation on, the Jacobian weights ``w_k`` of the vision
     units (:mod:`.visual`);
  2. probe entropies ``H(X_q^(k))`` and dependencies ``D(k, k+1)`` on the calibration set
     (:mod:`.probes`), vision probes chosen with the entropy penalty ``eta * w_k``;
  3. the partition (:mod:`.partition`): ``d = D / b > p`` joins, at most ``max_depth``
     units a block (with dependency mining off: one unit a block, the layer-wise baseline).
  Everything is stored in ``calibrator.extras["qvlm"]`` and lands in the quant state.

``block`` (per block): :func:`.block_search.search_block`, seeded from the recipe seed
and the block's unit names (so a resumed run draws the same numbers), with the entropy
term for vision blocks; its statistics go to the state's ``qvlm_blocks`` extras.
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import torch

from ...quant import distributed
from ...quant.calibrate import BlockContext, SequentialCalibrator
from ...quant.recipe import QuantRecipe
from ..registry import Capabilities, register_method
from .block_search import SearchHooks, search_block
from .config import QVLMConfig, config_from_args
from .partition import partition_units
from .probes import collect_probe_stats, first_linear, uses_mask
from .visual import EntropyTerm, jacobian_norms, normalised_weights, vision_probes


def block_seed(seed: int, unit_names: list[str]) -> int:
    """A block's RNG seed: independent of which blocks ran before it in this process."""
    return (seed * 1_000_003 + zlib.crc32(",".join(unit_names).encode())) % (2**63)


@register_method("qvlm")
class QVLMMethod:
    """Entropy-guided block partition + block-wise AdaRound/LSQ search + visual-encoder optimisation."""

    config_type = QVLMConfig
    # plan() runs the whole model (Jacobian norms, entropy probes): it must all be on the device
    capabilities = Capabilities(whole_model_plan=True)

    def __init__(self, recipe: QuantRecipe):
        self.recipe = recipe
        self.config: QVLMConfig = dataclasses.replace(
            config_from_args(recipe.method_args, source=f"recipe {recipe.method}-{recipe.setting}"),
            progress=recipe.display.progress)
        self.seed = recipe.calibration.seed if self.config.seed is None else self.config.seed
        self.weights: dict[str, float] = {}
        self.masks: list[torch.Tensor] | None = None
        self.device = "cpu"

    @property
    def visual(self) -> bool:
        return self.config.visual_optimization and self.config.eta > 0

    def plan(self, calibrator: SequentialCalibrator) -> list[list[int]]:
        cfg, model, units = self.config, calibrator.vlm.model, calibrator.units
        self.device = calibrator.device
        self.masks = [b.attention_mask.bool() for b in calibrator.batches]
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if self.visual:
            norms = jacobian_norms(model, self.recipe, calibrator.batches, vision_probes(model, units), calibrator.device)
            self.weights = normalised_weights(norms)
            timings["jacobian_seconds"] = time.perf_counter() - start
        penalty = {u: cfg.eta * w for u, w in self.weights.items()}
        t0 = time.perf_counter()
        stats = collect_probe_stats(model, calibrator.batches, units, self.recipe.activations.bits, cfg.probe_bits,
                                    cfg.clip_grid, penalty, calibrator.device)
        timings["entropy_seconds"] = time.perf_counter() - t0
        if cfg.dependency_mining:
            partition = partition_units([u.kind for u in units], stats.normalised_dependency(), cfg.p, cfg.max_depth)
        else:
            partition = [[i] for i in range(len(units))]
        timings["plan_seconds"] = time.perf_counter() - start
        calibrator.extras["qvlm"] = {
            "config": cfg.to_dict(), "seed": self.seed, "probes": stats.to_json(), "partition": partition,
            "partition_units": [[units[i].name for i in block] for block in partition],
            "jacobian_weights": self.weights, "timings": timings,
        }
        return partition

    def block(self, ctx: BlockContext) -> None:
        names = [u.name for u in ctx.units]
        masks = [m.to(ctx.q_inputs[0].device) if (self.masks is not None and uses_mask(ctx.units[0])) else None
                 for m in (distributed.local_items(ctx.batch_ids, self.masks) if self.masks else [None] * len(ctx.q_inputs))]
        searched = {n for n, _ in ctx.linears()}
        probes = {u.name: first_linear(ctx.root, u) for u in ctx.units if u.kind == "vision"}
        term = None
        if self.visual and probes and all(lin in searched for lin in probes.values()) and self.weights:
            term = EntropyTerm(self.config.eta, self.weights, probes, self.config.probe_bits)
        if not searched:
            return
        hooks = self.search_hooks(ctx)
        try:
            stats = search_block(ctx, self.config, masks, block_seed(self.seed, names), term, probes if term else None,
                                 hooks)
        finally:
            self.after_search(ctx)
        ctx.extras["qvlm_blocks"] = {names[0]: stats}

    # -- hooks for methods built on Q-VLM (search/combined): the plain method adds nothing ----------
    def search_hooks(self, ctx: BlockContext) -> SearchHooks | None:
        """Additions to this block's objective (token weights, extra loss, extra parameters)."""
        return None

    def after_search(self, ctx: BlockContext) -> None:
        """Called once the block's codes are committed (or the search failed)."""
