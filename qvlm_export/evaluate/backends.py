"""Choose the answerer for ``eval``: a PyTorch model (FP or simulated-quantized) or a bundle."""

from __future__ import annotations

from pathlib import Path

from ..errors import QvlmError
from .accuracy import Answerer


def make_answerer(model: str | None = None, quant: str | None = None, bundle: str | None = None,
                  engines: str | None = None, mode: str = "faithful",
                  int4_accuracy: int | None = None) -> tuple[Answerer, dict]:
    """An answerer plus a description of what it runs (for reports)."""
    if sum(x is not None for x in (quant, bundle, engines)) > 1:
        raise QvlmError("pass at most one of --quant, --bundle and --engines")
    if engines is not None:
        from ..runtime.factory import answerer_for_engines

        return answerer_for_engines(Path(engines), bundle=None)
    if bundle is not None:
        from ..runtime.factory import answerer_for_bundle

        return answerer_for_bundle(Path(bundle), mode=mode, int4_accuracy=int4_accuracy)
    if quant is not None:
        from ..quant.simulate import load_simulated

        vlm, info = load_simulated(Path(quant), model=model)
        from .torch_answerer import TorchAnswerer

        return TorchAnswerer(vlm), info
    from ..load.model import load_vlm
    from .torch_answerer import TorchAnswerer

    vlm = load_vlm(model)
    return TorchAnswerer(vlm), {"backend": "torch", "model": str(vlm.path), "setting": "fp",
                                "deployable": True}
