"""Per-layer fallback: the few Linears whose input int8 static per-tensor cannot represent keep float inputs.

A static per-tensor int8 step is ``absmax / 127``. On a pretrained LM a handful of Linears see
massive activations (SmolLM2-135M: layer 11's ``down_proj`` input has max 3323 against an rms
of 4), so one step rounds every ordinary value of that tensor to zero. TensorRT and ONNX Runtime
run mixed graphs: such a Linear can keep its int8 (or int4) weights and take its input in
floating point (weight-only: DequantizeLinear on the weight, no Q/DQ pair on the input),
while every other Linear stays int8 x int8.

Which Linears (recipe ``fallback: {max_layers: N, criterion: ...}``) is decided before the
calibration walk, on the FP model over the calibration set (real tokens only), by ranking every
quantized Linear:

* ``sqnr`` (default): SQNR of its output when only its input is rounded to the static
  per-tensor int8 grid, per token ``||x_t W^T||^2 / ||(Q(x_t) - x_t) W^T||^2`` in dB, averaged
  over tokens; the N lowest fall back. Per token, because a massive activation lives on one
  token (the first): pooled over tokens, that token's energy hides that every other token's
  input rounds to zero (SmolLM2 layer 11's ``down_proj``: pooled 40 dB, per token far lower);
* ``range``: ``absmax / rms`` of its input; the N highest fall back.

During the walk, each chosen Linear is quantized by the method as usual and then has its input
scale removed (:func:`with_fallback`), so later blocks calibrate on the stream the deployed
model computes. The state's ``extras.fallback`` lists the layers, their scores and their cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..quant import functional as F
from ..quant.modules import quantizable_linears
from ..quant.primitives import absmax_scale
from ..quant.recipe import QuantRecipe

RANKED = 20  # how many of the ranking the state keeps, for the report


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _run_hooks(vlm, batches, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> None:
    model = vlm.model
    device = next(model.parameters()).device
    current: dict[str, Any] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: fn(n, _real_rows(args[0].detach().float(), current["mask"]))) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                current["mask"] = b.attention_mask.to(device)
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                      **b.images(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def layer_scores(vlm, batches, recipe: QuantRecipe) -> dict[str, dict[str, float]]:
    """Per quantized Linear: input absmax, rms, and the output SQNR (dB; per token, and pooled) of int8 input rounding."""
    linears = dict(quantizable_linears(vlm.model, recipe))
    names = list(linears)
    acc = {n: {"absmax": 0.0, "sumsq": 0.0, "count": 0, "signal": 0.0, "noise": 0.0, "db": 0.0, "rows": 0}
           for n in names}

    def ranges(n: str, x: torch.Tensor) -> None:
        a = acc[n]
        a["absmax"] = max(a["absmax"], float(x.abs().max()))
        a["sumsq"] += float(x.double().pow(2).sum())
        a["count"] += x.numel()

    _run_hooks(vlm, batches, names, ranges)
    bits = recipe.activations.bits

    def sqnr(n: str, x: torch.Tensor) -> None:
        w = linears[n].weight.detach().float()
        scale = absmax_scale(acc[n]["absmax"], bits).to(x.device)
        q = F.fake_quantize(x, scale, torch.zeros((), dtype=torch.int32), bits, True, "tensor")
        signal, noise = (x @ w.t()).double().pow(2).sum(-1), ((q - x) @ w.t()).double().pow(2).sum(-1)
        acc[n]["signal"] += float(signal.sum())
        acc[n]["noise"] += float(noise.sum())
        acc[n]["db"] += float((10 * torch.log10(signal.clamp_min(1e-30) / noise.clamp_min(1e-30))).sum())
        acc[n]["rows"] += signal.numel()

    _run_hooks(vlm, batches, names, sqnr)
    out = {}
    for n, a in acc.items():
        rms = math.sqrt(a["sumsq"] / max(a["count"], 1))
        pooled = 10 * math.log10(max(a["signal"], 1e-30) / max(a["noise"], 1e-30))
        out[n] = {"absmax": round(a["absmax"], 4), "rms": round(rms, 6),
                  "range": round(a["absmax"] / max(rms, 1e-12), 2),
                  "sqnr_db": round(a["db"] / max(a["rows"], 1), 2), "pooled_sqnr_db": round(pooled, 2)}
    return out


def choose_fallback(vlm, batches, recipe: QuantRecipe, split_device: str | None = None) -> dict[str, Any]:
    """The ``extras.fallback`` record: chosen layers (worst first), their cost, and the top of the ranking.

    ``split_device``: the calibrator placed only the stem there (per-block placement); the FP
    pass then runs on the host and the stem goes back afterwards.
    """
    spec = recipe.fallback
    if split_device is not None:
        vlm.model.to("cpu")
    scores = layer_scores(vlm, batches, recipe)
    if split_device is not None:
        from ..quant.placement import place_stem

        place_stem(vlm.model, split_device)
    key = (lambda n: scores[n]["sqnr_db"]) if spec.criterion == "sqnr" else (lambda n: -scores[n]["range"])
    ranked = sorted(scores, key=key)
    chosen = ranked[:spec.max_layers]
    shapes = {n: tuple(lin.weight.shape) for n, lin in quantizable_linears(vlm.model, recipe)}
    macs = {n: shapes[n][0] * shapes[n][1] for n in shapes}
    total = sum(macs.values())
    layers = {n: {**scores[n], "shape": list(shapes[n]), "float_macs_per_token": macs[n]} for n in chosen}
    return {"criterion": spec.criterion, "max_layers": spec.max_layers, "layers": layers,
            # weights keep their integer codes: the cost is float activations (no int8 GEMM) on these MACs
            "float_mac_share": round(sum(macs[n] for n in chosen) / max(total, 1), 6),
            "input_bytes_per_token": sum(4 * shapes[n][1] for n in chosen),
            "ranking": [[n, scores[n]["sqnr_db"], scores[n]["range"]] for n in ranked[:RANKED]]}


def with_fallback(block: Callable, chosen: set[str]) -> Callable:
    """``block`` followed by removing the input scale of every chosen Linear it quantized."""
    def run(ctx) -> None:
        block(ctx)
        for name in sorted(chosen & set(ctx.layers)):
            ctx.replace_linear(name, dataclasses.replace(ctx.layers[name], input_scale=None, act_bits=None))

    return run
