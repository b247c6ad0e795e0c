"""Plain functions from one quant-state layer to the arrays of its QDQ nodes (no graph editing).

Layouts follow DESIGN sections 5-6 (the rules ``check-trt`` enforces), for ``MatMul(x, W[K, N])``:

* ``bits > 4``: int8 codes ``[K, N]``; per-channel scale ``[N]`` on ``axis=1`` (output
  channel), or a scalar scale (per-tensor, no axis);
* ``bits <= 4``: int4 codes ``[K, N]`` (3-bit codes fit int4 exactly); group scales
  ``[ceil(K/G), N]`` with ``axis=0, block_size=G``. ONNX allows a ragged last block
  (K % G != 0, K > G) but TensorRT's parser does not (it infers the block as K / rows):
  :func:`ragged_blocks` finds such layers and ``ExportConfig.ragged_int4`` says what they
  become (float weights, exact; int8 per-channel weights, re-quantized; or int4 for ONNX Runtime);
* symmetric only: no weight zero point (DequantizeLinear's default 0), as TensorRT requires;
* activation scale: a scalar in the graph's float type (fp16 graph -> fp16 scale); the
  pass adds the int8 zero point 0.

Errors are ``ValueError``; :func:`qvlm_export.export.passes.run_passes` names the pass and graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quant.primitives import qrange
from ..quant.state import LayerQuant


@dataclass(frozen=True)
class WeightQDQ:
    """Arrays and DequantizeLinear attributes for one quantized weight."""

    codes: np.ndarray  # [K, N] int8, or ml_dtypes.int4 for bits <= 4
    scale: np.ndarray  # [] | [N] | [ceil(K/G), N], in the graph's float type
    zero_point: np.ndarray | None
    axis: int | None
    block_size: int | None

    def stored_bytes(self) -> int:
        """Bytes the weight takes in the file: packed codes (int4 = half a byte) + scales."""
        bits = 4 if self.codes.dtype.name == "int4" else 8
        return (self.codes.size * bits + 7) // 8 + self.scale.nbytes


def weight_qdq(layer: LayerQuant, float_dtype: np.dtype) -> WeightQDQ:
    """Transpose a layer's ``[N, K]`` codes and scales to the ``[K, N]`` ONNX layout."""
    if not layer.symmetric or bool((layer.weight_zero_point != 0).any()):
        raise ValueError("asymmetric weights (non-zero zero points) are not deployable: TensorRT needs zero point 0; "
                         "re-quantize with weights.symmetric: true")
    qmin, qmax = qrange(layer.weight_bits, True)
    codes = layer.weight_codes.numpy().astype(np.int32)
    if codes.size and (codes.min() < qmin or codes.max() > qmax):
        raise ValueError(f"weight codes span {codes.min()}..{codes.max()}, outside the {layer.weight_bits}-bit "
                         f"range {qmin}..{qmax}")
    codes_kn = np.ascontiguousarray(codes.T)
    if layer.weight_bits <= 4:
        import ml_dtypes

        stored = codes_kn.astype(ml_dtypes.int4)
    else:
        stored = codes_kn.astype(np.int8)
    scale = layer.weight_scale.float().numpy()
    if layer.granularity == "tensor":
        return WeightQDQ(stored, scale.reshape(()).astype(float_dtype), None, None, None)
    if layer.granularity == "channel":
        return WeightQDQ(stored, scale.reshape(-1).astype(float_dtype), None, 1, None)
    return WeightQDQ(stored, np.ascontiguousarray(scale.T).astype(float_dtype), None, 0, int(layer.group_size))


def activation_scale(layer: LayerQuant, float_dtype: np.dtype) -> np.ndarray | None:
    """The layer's stored activation scale (``input_scale``, computed at search time by
    :func:`qvlm_export.quant.primitives.absmax_scale` or searched) in the graph's float type;
    None when activations stay float."""
    if layer.act_bits is None or layer.input_scale is None:
        return None
    if layer.act_bits != 8:
        raise ValueError(f"{layer.act_bits}-bit activations: ONNX QDQ runs int8 activations only "
                         "(this setting is simulated-only)")
    scale = float(layer.input_scale.float().reshape(()))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"input scale {scale}; activation scales must be finite and > 0")
    return np.array(scale, dtype=float_dtype)


def ragged_blocks(layer: LayerQuant) -> bool:
    """An int4 group-quantized layer whose K is not a whole number of groups (TensorRT cannot parse it).

    K <= G is one block covering all of K, which TensorRT infers correctly.
    """
    k = int(layer.weight_codes.shape[1])
    return (layer.weight_bits <= 4 and layer.granularity == "group"
            and k > layer.group_size and k % layer.group_size != 0)


def int8_channel_qdq(weight: np.ndarray, float_dtype: np.dtype) -> tuple[WeightQDQ, float]:
    """Symmetric int8 per-output-channel codes of a float ``[N, K]`` weight, and the largest rounding error.

    Used for ragged int4 layers under ``ragged_int4: int8``: the input is the state's
    dequantized int4 weight, so the graph differs from the state by at most half an int8 step per row.
    """
    w = weight.astype(np.float32)
    scale = np.maximum(np.abs(w).max(axis=1), np.float32(1e-8)) / np.float32(127)
    scale = scale.astype(float_dtype).astype(np.float32)  # the scale the graph stores
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    error = float(np.abs(codes.astype(np.float32) * scale[:, None] - w).max()) if w.size else 0.0
    return WeightQDQ(np.ascontiguousarray(codes.T), scale.astype(float_dtype), None, 1, None), error
