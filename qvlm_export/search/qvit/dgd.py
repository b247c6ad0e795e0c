"""Q-ViT's distribution-guided distillation (DGD) on per-head patch-similarity matrices.

For tokens ``x`` ``[B, N, C]`` split into ``H`` heads ``x_h`` ``[B, N, C/H]``:
``G_h = x_h x_h^T / ||x_h x_h^T||_F`` (``N x N`` per image; the paper writes ``||.||_2``, the
Frobenius norm here). ``DGD = mean_B sum_h ||G_h(student) - G_h(teacher)||_F``, for q and for k
(summed), the teacher being the full-precision block. It is 0 when student equals teacher.
"""

from __future__ import annotations

import torch


def patch_similarity(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, C] -> [B, H, N, N]`` per-head similarity matrices, each of unit Frobenius norm."""
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"channels {c} do not split into {heads} heads")
    xh = x.float().reshape(b, n, heads, c // heads).transpose(1, 2)
    g = xh @ xh.transpose(-1, -2)
    return g / g.flatten(2).norm(dim=-1).clamp_min(1e-12)[..., None, None]


def dgd_distance(student: torch.Tensor, teacher: torch.Tensor, heads: int) -> torch.Tensor:
    """``mean_B sum_h ||G_h(student) - G_h(teacher)||_F``."""
    diff = patch_similarity(student, heads) - patch_similarity(teacher, heads)
    return diff.flatten(2).norm(dim=-1).sum(dim=1).mean()


def dgd_loss(q: torch.Tensor, k: torch.Tensor, q_teacher: torch.Tensor, k_teacher: torch.Tensor,
             heads: int) -> torch.Tensor:
    """DGD for one attention layer: the q and k distances summed."""
    return dgd_distance(q, q_teacher, heads) + dgd_distance(k, k_teacher, heads)
