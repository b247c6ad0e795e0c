"""The quant-state artifact: what a search produced, in the form the exporter consumes.

Directory layout::

    quant.safetensors   per quantized Linear ``<name>``:
                          <name>.weight_codes        int8 [out, in] integer codes (uint8 when asymmetric)
                          <name>.weight_scale        fp32 [out] (channel) | [out, ceil(in/g)] (group) | [] (tensor)
                          <name>.weight_zero_point   int8 (uint8 when asymmetric), shape of weight_scale (0 when symmetric)
                          <name>.input_scale         fp32 [] (absent when activations stay float)
                        float parameters the method rewrote (smoothing folded into a norm or linear):
                          override.<parameter name>  fp32
    recipe.yaml         the resolved recipe
    state.json          per-layer bit widths/granularity, model path, method extras (e.g. Q-VLM partition)
    manifest.json       versions, config, input and output hashes

Simulated model == FP model with the overrides loaded and every listed Linear computing
``linear(fake_quant(x, input_scale), dequant(codes, scale, zero_point)) + bias``: exactly
the arithmetic a QDQ graph performs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import QvlmError
from ..yaml_files import parse_yaml
from . import functional as F
from .recipe import RECIPE_VERSION, QuantRecipe, recipe_from_dict

STATE_FORMAT = 1


def code_dtype(symmetric: bool) -> torch.dtype:
    """Storage dtype of integer codes and zero points: int8 (symmetric) or uint8 (asymmetric, 0..255)."""
    return torch.int8 if symmetric else torch.uint8


@dataclass
class LayerQuant:
    """Quantization of one Linear: integer weight codes and the static input scale."""

    weight_codes: torch.Tensor  # int8, uint8 when asymmetric (int32 accepted; stored as code_dtype)
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_bits: int
    granularity: str
    group_size: int
    symmetric: bool = True
    input_scale: torch.Tensor | None = None
    act_bits: int | None = None

    def dequantized_weight(self) -> torch.Tensor:
        return F.dequantize(self.weight_codes.to(torch.int32), self.weight_scale, self.weight_zero_point,
                            self.granularity, self.group_size)

    def meta(self) -> dict[str, Any]:
        return {"weight_bits": self.weight_bits, "granularity": self.granularity, "group_size": self.group_size,
                "symmetric": self.symmetric, "act_bits": self.act_bits,
                "shape": list(self.weight_codes.shape)}


@dataclass
class QuantState:
    recipe: QuantRecipe
    layers: dict[str, LayerQuant]
    float_overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    model_path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, lq in sorted(self.layers.items()):
            # Asymmetric 8-bit codes and zero points span 0..255: int8 would wrap them.
            out[f"{name}.weight_codes"] = lq.weight_codes.to(code_dtype(lq.symmetric)).contiguous()
            out[f"{name}.weight_scale"] = lq.weight_scale.float().contiguous()
            out[f"{name}.weight_zero_point"] = lq.weight_zero_point.to(code_dtype(lq.symmetric)).contiguous()
            if lq.input_scale is not None:
                out[f"{name}.input_scale"] = lq.input_scale.float().reshape(()).contiguous()
        for pname, t in sorted(self.float_overrides.items()):
            out[f"override.{pname}"] = t.float().contiguous()
        return out

    def save(self, out_dir: Path) -> None:
        """Write quant.safetensors, recipe.yaml and state.json into ``out_dir`` (manifest by caller)."""
        import yaml
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(out_dir / "quant.safetensors"), metadata={"format": str(STATE_FORMAT)})
        (out_dir / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=True))
        meta = {"format": STATE_FORMAT, "model_path": self.model_path, "method": self.recipe.method,
                "setting": self.recipe.setting, "deployable": self.recipe.deployable,
                "layers": {n: lq.meta() for n, lq in sorted(self.layers.items())},
                "overrides": sorted(self.float_overrides), "extras": self.extras}
        (out_dir / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def check_version(state_dir: Path, what: str, value: Any, supported: int) -> None:
    """A state another qvlm-export wrote (a newer layout or recipe version): one line naming both ways out."""
    if value != supported or isinstance(value, bool):
        raise QvlmError(f"{state_dir}: {what} {value!r} is not supported (this qvlm-export reads {supported}); "
                        "upgrade qvlm-export, or re-run 'qvlm-export quantize' with this one")


def load_state(state_dir: Path, verify: bool | None = None) -> QuantState:
    """Read a quant-state directory written by :meth:`QuantState.save`.

    ``verify`` (None: the process-wide setting, on by default) checks every file against
    the SHA-256 its ``manifest.json`` records first; block checkpoints pass False (no manifest).
    """
    from safetensors.torch import load_file

    from ..manifest import should_verify, verify_artifact

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise QvlmError(f"quant state {str(state_dir)!r} {'is a file' if state_dir.exists() else 'does not exist'}; "
                        "pass the directory 'qvlm-export quantize --out' wrote")
    for required in ("quant.safetensors", "recipe.yaml", "state.json"):
        if not (state_dir / required).is_file():
            raise QvlmError(f"{str(state_dir)!r} is not a quant state: {required} is missing (write one with 'qvlm-export quantize')")
    if should_verify(verify):
        verify_artifact(state_dir, "quant-state")
    try:
        meta = json.loads((state_dir / "state.json").read_text())
    except json.JSONDecodeError as exc:
        raise QvlmError(f"{state_dir / 'state.json'} is not valid JSON ({exc.msg}); re-run 'qvlm-export quantize'") from None
    check_version(state_dir, "quant-state format", meta.get("format"), STATE_FORMAT)
    recipe_file = state_dir / "recipe.yaml"
    raw_recipe = parse_yaml(recipe_file.read_text(), str(recipe_file))
    if isinstance(raw_recipe, dict):  # (what else is wrong with it, recipe_from_dict says)
        check_version(state_dir, "recipe version", raw_recipe.get("version", RECIPE_VERSION), RECIPE_VERSION)
    recipe = recipe_from_dict(raw_recipe, source=str(recipe_file))
    tensors = load_file(str(state_dir / "quant.safetensors"))
    layers = {}
    for name, m in meta["layers"].items():
        layers[name] = LayerQuant(
            weight_codes=tensors[f"{name}.weight_codes"], weight_scale=tensors[f"{name}.weight_scale"],
            weight_zero_point=tensors[f"{name}.weight_zero_point"].to(torch.int32),
            weight_bits=m["weight_bits"], granularity=m["granularity"], group_size=m["group_size"],
            symmetric=m["symmetric"], input_scale=tensors.get(f"{name}.input_scale"), act_bits=m["act_bits"],
        )
    overrides = {k[len("override."):]: v for k, v in tensors.items() if k.startswith("override.")}
    return QuantState(recipe=recipe, layers=layers, float_overrides=overrides,
                      model_path=meta.get("model_path"), extras=meta.get("extras", {}))
