"""Which weights live on the compute device during calibration: the stem always, layers one block at a time.

With ``block_weights`` the model is loaded on the host; the *stem* (embeddings, vision
pre/post norms, rotary tables, projector, final norm, lm_head) moves to the compute device
once, and each encoder/decoder layer moves there only while its block is calibrated, then
back (llm-compressor's sequential onloading). The accelerator then holds the stem, one
block, its full-precision copy and one boundary's activations, whatever the depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from torch import nn

from ..families import family_of


def layer_stacks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the two layer lists the family names: vision encoder layers and decoder layers."""
    out = []
    for path in family_of(model).layer_stacks():
        parent, _, attr = path.rpartition(".")
        out.append((model.get_submodule(parent), attr))
    return out


@contextlib.contextmanager
def _without_layers(model: nn.Module) -> Iterator[None]:
    stacks = [(parent, attr, getattr(parent, attr)) for parent, attr in layer_stacks(model)]
    for parent, attr, _ in stacks:
        setattr(parent, attr, nn.ModuleList())
    try:
        yield
    finally:
        for parent, attr, layers in stacks:
            setattr(parent, attr, layers)


def place_stem(model: nn.Module, device: str) -> None:
    """Move every weight outside the layer stacks to ``device``; the layers stay where they are."""
    with _without_layers(model):
        model.to(device)


def release_block(modules: list[nn.Module], layers: dict, root: nn.Module, host: str) -> dict:
    """Move a finished block's modules and its layers' integer codes back to ``host``; returns the moved layers.

    The live QuantLinears keep a reference to their LayerQuant, so it is swapped too:
    otherwise the codes of every finished block would stay on the accelerator.
    """
    moved = {}
    for name, layer in layers.items():
        moved[name] = dataclasses.replace(
            layer, weight_codes=layer.weight_codes.to(host), weight_scale=layer.weight_scale.to(host),
            weight_zero_point=layer.weight_zero_point.to(host),
            input_scale=None if layer.input_scale is None else layer.input_scale.to(host))
        module = root.get_submodule(name)
        if hasattr(module, "layer"):
            module.layer = moved[name]
    for module in modules:
        module.to(host)
    return moved
