"""Per-layer data for the report: Q-VLM entropies and block partition, and per-layer quantization error.

* Entropy and partition come from the quant state's ``state.json`` ``extras`` when the
  search recorded them (:func:`search_diagnostics`).
* Per-layer error is measured here: the SQNR of every transformer layer's output hidden
  state (vision encoder layers, then decoder layers, then the logits) of the simulated
  quantized model against the FP model on a few calibration samples. Hidden states are
  invariant to the smoothing folds of SmoothQuant/AWQ, so the curve shows quantization
  error and how it accumulates with depth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.synthetic import Sample
from ..quant.functional import sqnr_db


def _floats(values: list[Any]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def search_diagnostics(extras: dict[str, Any]) -> dict[str, Any] | None:
    """Per-unit entropy, normalised dependency and block partition of a Q-VLM search, or None.

    Reads what :mod:`qvlm_export.search.qvlm.method` records: ``extras["qvlm"]["probes"]``
    (``units``, ``entropy``, ``normalised_dependency`` with one entry fewer than units) and
    ``extras["qvlm"]["partition"]`` (lists of unit indices); ``p`` from the search config.
    """
    qvlm = extras.get("qvlm")
    if not isinstance(qvlm, dict) or not isinstance(qvlm.get("probes"), dict):
        return None
    probes = qvlm["probes"]
    names = [str(n) for n in probes.get("units") or []]
    raw = probes.get("entropy")
    # The search stores entropy keyed by unit name (JSON sorts the keys): put it back in unit order.
    entropy = [raw.get(n) for n in names] if isinstance(raw, dict) else list(raw or [])
    if not names or len(names) != len(entropy):
        return None
    dependency = list(probes.get("normalised_dependency") or [])
    return {"names": names, "values": _floats(entropy),
            "dependency": _floats(dependency) if len(dependency) == len(names) - 1 else None,
            "p": (qvlm.get("config") or {}).get("p"),
            "blocks": [[int(i) for i in block] for block in qvlm.get("partition") or []]}


def _hidden_states(vlm, batch) -> list[tuple[str, Any]]:
    import torch

    with torch.inference_mode():
        tiles = vlm.family.tiles_torch(vlm.model, batch)
        vision = vlm.model.get_submodule(vlm.family.vision_tower)(tiles, output_hidden_states=True).hidden_states
        out = vlm.model(**batch, output_hidden_states=True)
    named = [(f"vision.layers.{i}", h) for i, h in enumerate(vision[1:])]
    named += [(f"decoder.layers.{i}", h) for i, h in enumerate(out.hidden_states[1:])]
    return [*named, ("logits", out.logits)]


def hidden_state_errors(fp_vlm, quant_vlm, samples: list[Sample]) -> dict[str, Any]:
    """SQNR (dB) of each layer's output, quantized vs FP, on ``samples`` (same processor batch for both)."""
    from ..evaluate.torch_answerer import TorchAnswerer

    batch = TorchAnswerer(fp_vlm).inputs(samples)
    ref, cand = _hidden_states(fp_vlm, batch), _hidden_states(quant_vlm, batch)
    return {"names": [n for n, _ in ref], "sqnr_db": [sqnr_db(r, c) for (_, r), (_, c) in zip(ref, cand)]}


def layer_summary(state_dir: Path, samples: list[Sample], model: str | Path | None = None) -> dict[str, Any]:
    """The report's ``layers`` entry for one quant state: entropy/partition and per-layer error."""
    from ..load.model import load_vlm
    from ..quant.simulate import load_simulated

    extras = json.loads((Path(state_dir) / "state.json").read_text()).get("extras", {})
    quant_vlm, _ = load_simulated(Path(state_dir), model=None if model is None else str(model))
    fp_vlm = load_vlm(quant_vlm.path)
    return {"entropy": search_diagnostics(extras), "error": hidden_state_errors(fp_vlm, quant_vlm, samples)}
