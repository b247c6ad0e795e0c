"""Entropy-guided partition of the calibration units into search blocks.

Rule (Q-VLM section 3.2 made precise): walk the units in order; unit ``k+1`` joins the
block that ends at unit ``k`` when

* both are in the same stack (vision layers, projector, decoder layers, lm_head: a block
  never crosses a stack boundary, where tokens are selected or merged so no element
  alignment exists and the calibrator cannot chain the units), and
* their normalised dependency ``d(k, k+1) = D(k, k+1) / b`` exceeds ``p`` (``b`` the
  probe's bit width, so ``d`` lies in [0, 1] whatever the setting), and
* the block holds fewer than ``max_depth`` units.

Otherwise ``k+1`` opens a new block. ``p = 1`` gives layer-wise search (every unit its
own block); ``p = 0`` with ``max_depth = n`` gives one block per stack.
"""

from __future__ import annotations

from collections.abc import Sequence


def partition_units(stacks: Sequence[str], dependency: Sequence[float | None], p: float,
                    max_depth: int) -> list[list[int]]:
    """Blocks of unit indices from each unit's stack and the normalised ``d(k, k+1)``.

    ``dependency[k]`` belongs to the pair ``(k, k+1)`` (``None`` across stacks), so it
    has one entry fewer than ``stacks``.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be at least 1, got {max_depth}")
    if len(dependency) != max(len(stacks) - 1, 0):
        raise ValueError(f"need {len(stacks) - 1} dependencies for {len(stacks)} units, got {len(dependency)}")
    if not stacks:
        return []
    blocks = [[0]]
    for k in range(len(stacks) - 1):
        d = dependency[k]
        joins = (stacks[k] == stacks[k + 1] and d is not None and d > p and len(blocks[-1]) < max_depth)
        if joins:
            blocks[-1].append(k + 1)
        else:
            blocks.append([k + 1])
    return blocks
