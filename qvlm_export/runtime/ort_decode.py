"""Decoder steps on ONNX Runtime that leave the KV cache in ORT's memory between steps.

``session.run`` with numpy feeds converts every past tensor in and every present tensor out
on each step: at 7B widths and a 600-token prompt that is 2 x 22 MB per layer and token,
as many bytes as an int4 layer's weights. With IO binding the present OrtValues of one step
are bound as the next step's past without leaving ORT (what onnxruntime-genai does); only
the logits are copied out. The graph is unchanged, so results are bit-identical to
``session.run``.

:class:`OrtKV` wraps such a tensor for callers that want an array: ``np.asarray(kv)`` copies
it out, so generic code (parity checks, TensorRT-shaped runners) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import QvlmError
from .bundle import BundleInfo


class OrtKV:
    """A past/present tensor held by ONNX Runtime; ``np.asarray`` copies it out."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value  # onnxruntime.OrtValue

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.value.numpy()
        return array if dtype is None else array.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())


def bind_past(binding: Any, names: Sequence[str], past: Sequence[Any], dtype: np.dtype) -> list[np.ndarray]:
    """Bind past tensors: OrtKV without a copy, arrays as CPU inputs (returned: keep them alive until run)."""
    keep = []
    for name, tensor in zip(names, past):
        if isinstance(tensor, OrtKV):
            binding.bind_ortvalue_input(name, tensor.value)
        else:
            array = np.ascontiguousarray(tensor, dtype=dtype)
            keep.append(array)
            binding.bind_cpu_input(name, array)
    return keep


def bound_decode(session: Any, info: BundleInfo, inputs_embeds: np.ndarray, attention_mask: np.ndarray,
                 position_ids: np.ndarray, past: Sequence[Any]) -> tuple[np.ndarray, list[OrtKV]]:
    """One decoder step with IO binding: ``(logits, present)``, present left in ORT as :class:`OrtKV`."""
    names = info.past_names()
    if len(past) != len(names):
        raise QvlmError(f"decoder takes {len(names)} past tensors (key and value per layer), got {len(past)}")
    binding = session.io_binding()
    feeds = {"inputs_embeds": np.ascontiguousarray(inputs_embeds, dtype=info.float_dtype),
             "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
             "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    keep = bind_past(binding, names, past, info.float_dtype)
    outputs = ["logits", *info.present_names()]
    for name in outputs:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    del keep
    values = binding.get_outputs()
    return values[0].numpy(), [OrtKV(v) for v in values[1:]]
