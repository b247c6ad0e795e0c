"""Decode tokens/s of the reference and each candidate on ONNX Runtime ``fast`` (the summary's speed column).

A short, honest figure: batch 1, a 64-token prompt, ``speed_steps`` one-token steps, best of
3 repeats with the spread beside it. On a model whose decoder weights fit in the CPU caches
(the embedded one), fewer weight bytes cannot make decode faster and the ratio sits near 1;
the summary says so and points at the 7B-width table (``tools/bench_decode.py``, docs/scale.md).
"""

from __future__ import annotations

from typing import Any

from ..runtime.bundle import BundleInfo

SPEED_PROMPT = 64
CACHE_RESIDENT_BYTES = 64 * 2**20  # decoder weights below this fit in a server CPU's caches


def decode_speed(info: BundleInfo, steps: int, threads: int | None, int4_accuracy: int | None) -> dict[str, Any] | None:
    """Tokens/s of the bundle's decoder on ORT ``fast`` (IO binding), or None when ``steps`` is 0."""
    from ..runtime.decode_speed import runner_step, time_decode
    from ..runtime.ort_runner import ort_runner

    if steps == 0:
        return None
    prompt = max(1, min(SPEED_PROMPT, info.model.max_positions - steps - 1))
    with ort_runner(info, "fast", threads, int4_accuracy) as runner:
        timing = time_decode(runner_step(runner), info, prompt, steps, repeats=3)
    weights = info.graphs["decoder"].weight_bytes.get("total") if info.graphs["decoder"].weight_bytes else None
    return {**timing.to_json(), "decoder_weight_bytes": weights}


def with_ratio(speed: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any] | None:
    if speed is None or reference is None:
        return speed
    return {**speed, "x_fp": speed["tokens_per_s"] / reference["tokens_per_s"]}


def speed_note(reference: dict[str, Any] | None) -> str | None:
    """Why the ratio says little on a small model, or None."""
    weights = (reference or {}).get("decoder_weight_bytes")
    if not weights or weights >= CACHE_RESIDENT_BYTES:
        return None
    return (f"decode speed: the FP decoder's weights ({weights / 2**20:.1f} MiB) fit in the CPU caches, so fewer "
            "weight bytes cannot make this model decode faster; tools/bench_decode.py measures a 7B-width model "
            "(docs/scale.md, section Decode)")
