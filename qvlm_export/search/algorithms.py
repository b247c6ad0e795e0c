"""The arithmetic of AWQ and GPTQ as plain tensor functions (no modules, no calibration context).

Weights are ``[out, in]``; groups run along ``in`` (the last one may be shorter), as in
:mod:`qvlm_export.quant.functional`. Quantization here is symmetric unless stated, the
deployable form.
"""

from __future__ import annotations

import math

import torch

from ..errors import QvlmError
from ..quant import functional as F
from ..quant.primitives import grouped, round_clamp


# -- AWQ (Lin et al., MLSys 2024) ----------------------------------------------------------------
def awq_scales(act_absmean: torch.Tensor, ratio: float) -> torch.Tensor:
    """``s = mean|x|^ratio``, normalised so ``max(s) * min(s) = 1`` (llm-awq's auto_scale)."""
    s = act_absmean.float().pow(ratio).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def pseudo_quantize(w: torch.Tensor, bits: int, granularity: str, group_size: int,
                    clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Symmetric quantize-dequantize of a weight (absmax grid, optionally clipped)."""
    scale, zp = F.choose_qparams(w, bits, True, granularity, group_size, clip_ratio)
    return F.dequantize(F.quantize(w, scale, zp, bits, True, granularity, group_size), scale, zp, granularity, group_size)


def awq_clip_ratio(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, grid: int = 20,
                   max_shrink: float = 0.5, chunk: int = 1024) -> torch.Tensor:
    """Per (output row, group) clipping ratio minimising the group's partial-output error.

    llm-awq's auto_clip: for ratios ``1, 1 - 1/grid, ..., 1 - max_shrink`` (exclusive),
    clip each group of ``w`` to ``ratio * absmax``, quantize, and keep the ratio with the
    smallest mean over tokens of ``(q_g . x_g - w_g . x_g)^2``. ``x`` is ``[tokens, in]``.
    Returns ``[out, ceil(in / group_size)]``.
    """
    qmin, qmax = F.qrange(bits, True)
    out_f = w.shape[0]
    # zero padding of a ragged last group adds nothing to a partial output; contiguous as the padded copy was
    wg = grouped(w.float().contiguous(), group_size).transpose(0, 1)
    xg = grouped(x.float().contiguous(), group_size).permute(1, 2, 0)
    n_groups = wg.shape[0]
    best_ratio = torch.ones(n_groups, out_f, device=w.device)
    for start in range(0, out_f, chunk):
        wc = wg[:, start:start + chunk]  # [groups, rows, group_size]
        reference = torch.bmm(wc, xg)  # [groups, rows, tokens]
        absmax = wc.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
        best_err = torch.full(wc.shape[:2], float("inf"), device=w.device)
        for i in range(int(max_shrink * grid)):
            ratio = 1 - i / grid
            scale = absmax * ratio / qmax
            q = round_clamp(wc / scale, qmin, qmax) * scale
            err = (torch.bmm(q, xg) - reference).pow(2).mean(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[:, start:start + chunk][better] = ratio
    return best_ratio.t().contiguous()


# -- GPTQ (Frantar et al., ICLR 2023) ------------------------------------------------------------
def gptq_inverse_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (the reference's ``Hinv``)."""
    h = h.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError:
        raise QvlmError(f"gptq: the damped Hessian is not positive definite; raise method_args.damp (now {damp})") from None


def _qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``w`` ``[out, k]`` (one group)."""
    return F.choose_qparams(w, bits, symmetric, "channel")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128,
                  symmetric: bool = True, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, fixed_scale: torch.Tensor | None = None,
                  seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ: quantize the columns of ``w`` one by one, spreading each rounding error over the rest.

    Follows the reference ``GPTQ.fasterquant``: dead inputs (``H_jj = 0``) are zeroed,
    optional act-order (columns by descending ``H_jj``), relative damping, lazy batch
    updates of ``block_size`` columns. Group scales are computed when the walk reaches a
    group (from the error-updated weights, the paper's default) or, with
    ``static_groups`` (forced by ``act_order``), from the original weights up front, so the
    groups stay contiguous along ``in``: the deployable blocked format.

    ``fixed_scale`` (symmetric only) walks a given grid instead, e.g. an MSE-clipped one.
    ``seen``, an ``[out, in]`` float tensor, receives each column as the walk rounded it
    (the weight after the error feedback of the earlier columns): rounding it to nearest
    gives the codes, which lets a rounding search start exactly at GPTQ's solution.

    Returns ``(codes int32 [out, in], scale, zero_point)`` in the layout of ``granularity``.
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    out_f, in_f = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static_groups = static_groups or act_order or fixed_scale is not None
    if fixed_scale is not None:
        if not symmetric:
            raise QvlmError("gptq: a fixed weight grid is only supported for symmetric quantization")
        scale, zero = fixed_scale.detach().float().clone(), torch.zeros_like(fixed_scale, dtype=torch.int32)
    elif granularity == "group":
        n_groups = math.ceil(in_f / group_size)
        scale = torch.zeros(out_f, n_groups, device=w.device)
        zero = torch.zeros(out_f, n_groups, dtype=torch.int32, device=w.device)
        if static_groups:
            for g in range(n_groups):
                scale[:, g], zero[:, g] = _qparams(w[:, g * group_size:(g + 1) * group_size], bits, symmetric)
    else:
        scale, zero = F.choose_qparams(w, bits, symmetric, granularity)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f, device=w.device)
    if act_order:  # without it the permutation is the identity: indexing would only copy w and h (twice)
        w, h = w[:, perm], h[perm][:, perm]
    hinv = gptq_inverse_hessian(h, damp)
    del h  # [in, in]: 485 MB at in = 11008 (a 7B down_proj); the walk needs only hinv
    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device=w.device)
    qmin, qmax = F.qrange(bits, symmetric)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if granularity == "group":
                g = col // group_size
                if not static_groups and col % group_size == 0:
                    # As the reference: the group's columns as of the last lazy batch update.
                    scale[:, g], zero[:, g] = _qparams(w[:, col:col + group_size], bits, symmetric)
                s, z = scale[:, g], zero[:, g]
            else:
                s, z = (scale, zero) if granularity == "channel" else (scale.expand(out_f), zero.expand(out_f))
            q = round_clamp(w1[:, i] / s, qmin, qmax, z)
            codes[:, col] = q.to(torch.int32)
            if seen is not None:
                seen[:, col] = w1[:, i]
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scale, zero
