"""Load a quant state onto its model: the simulated (fake-quant) quantized VLM."""

from __future__ import annotations

from pathlib import Path

from ..load.model import LoadedVLM, load_vlm
from .layernorm_irm import install_from_extras
from .modules import apply_quant_state
from .state import load_state


def load_simulated(state_dir: Path, model: str | None = None) -> tuple[LoadedVLM, dict]:
    """The model the state records (or ``model``) with the state applied, plus a description."""
    state = load_state(state_dir)
    vlm = load_vlm(model if model is not None else state.model_path)
    from ..export.api import check_state_fits  # (lazy: the exporter pulls in onnx)

    check_state_fits(vlm.model, state, vlm.path, Path(state_dir))  # a state of another model: one line
    apply_quant_state(vlm.model, state)
    install_from_extras(vlm.model, state.extras)  # graph additions of simulated-only options (Q-ViT's LayerNorm IRM)
    info = {"backend": "torch-simulated", "model": str(vlm.path), "method": state.recipe.method,
            "setting": state.recipe.setting, "deployable": state.recipe.deployable,
            "runs_on": state.recipe.runs_on}
    return vlm, info
