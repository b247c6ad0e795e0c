"""Sequential, block-by-block calibration of a LLaVA model with an explicit activation cache.

The model is walked as one ordered list of *units*: vision encoder layers, the
projector, decoder layers, and (optionally) ``lm_head``. A quantization method sees
one *block* of consecutive units at a time (a single unit for layer-wise methods, up to
three for Q-VLM) together with:

* ``q_inputs``: the block's inputs computed by the already-quantized preceding blocks,
* ``fp_inputs``: the same inputs computed by the full-precision model,
* the per-batch keyword arguments the units need (attention masks, rotary embeddings),

and calls :meth:`BlockContext.replace_linear` / :meth:`BlockContext.set_override` to
record its decisions. The calibrator then pushes both streams through the block (the
quantized stream through the quantized block) and moves on. Only one boundary's
activations per stream live at a time, offloaded to ``offload`` between blocks: this is
how llm-compressor calibrates models far larger than the accelerator (DESIGN.md s9).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import Sample
from ..families import family_of
from ..load.model import LoadedVLM, build_prompt
from . import distributed
from .checkpoint import BlockCheckpoint, finished_block, run_fingerprint
from .modules import (
    QuantLinear,
    apply_overrides,
    component_of,
    set_submodule,
    unused_layers,
    used_vision_layers,
    vision_feature_layers,
)
from .placement import place_stem, release_block
from .recipe import QuantRecipe
from .state import LayerQuant, QuantState


@dataclass(frozen=True)
class Unit:
    """One calibration unit: a transformer layer, the projector, or lm_head."""

    name: str
    kind: str  # vision | projector | decoder | lm_head
    index: int  # position within its kind


def model_units(model: nn.Module, include_lm_head: bool = False) -> list[Unit]:
    """The calibration walk; vision layers past the last one the projector reads are not units (see
    :func:`.modules.unused_layers`): calibrating them would quantize layers no exported graph contains."""
    family = family_of(model)
    units = [Unit(f"{family.vision_layers}.{i}", "vision", i) for i in range(used_vision_layers(model.config))]
    units.append(Unit(family.projector, "projector", 0))
    decoder = model.get_submodule(family.decoder_layers)
    units += [Unit(f"{family.decoder_layers}.{i}", "decoder", i) for i in range(len(decoder))]
    if include_lm_head:
        units.append(Unit(family.lm_head, "lm_head", 0))
    return units


def unit_linears(units: Sequence[Unit], modules: Sequence[nn.Module], recipe: QuantRecipe,
                 family=None) -> list[tuple[str, nn.Linear]]:
    """The Linears of ``units`` (live ``modules``) the recipe quantizes, with full model names, in order
    (components by ``family``'s module paths; default LLaVA-1.5's)."""
    enabled = {c for c in ("vision_tower", "projector", "language_model", "lm_head") if getattr(recipe.modules, c)}
    out = []
    for unit, mod in zip(units, modules):
        if unit.kind == "lm_head":
            if isinstance(mod, nn.Linear) and "lm_head" in enabled:
                out.append((unit.name, mod))
            continue
        for sub, m in mod.named_modules():
            full = f"{unit.name}.{sub}" if sub else unit.name
            if isinstance(m, nn.Linear) and component_of(full, family) in enabled:
                out.append((full, m))
    return out


def quantize_without_data(vlm: LoadedVLM, recipe: QuantRecipe,
                          rule: Callable[[str, torch.Tensor], LayerQuant], device: str = "cpu") -> QuantState:
    """A state from a data-free weight rule (weight-only RTN): no dataset, no forward pass.

    Covers exactly the Linears the calibrated walk would (same units, same recipe
    components); ``rule(name, weight)`` sees one weight on ``device`` at a time; the model is not modified.
    """
    units = model_units(vlm.model, include_lm_head=recipe.modules.lm_head)
    modules = [vlm.model.get_submodule(u.name) for u in units]
    layers = {}
    for name, linear in unit_linears(units, modules, recipe, family_of(vlm.model)):
        layer = rule(name, linear.weight.detach().to(device))  # one weight on the device at a time
        layers[name] = dataclasses.replace(
            layer, weight_codes=layer.weight_codes.cpu(), weight_scale=layer.weight_scale.cpu(),
            weight_zero_point=layer.weight_zero_point.cpu())
    extras = {"left_out": unused_layers(vlm.model.config)}
    return QuantState(recipe=recipe, layers=layers, model_path=str(vlm.path), extras=extras)


class _Stop(Exception):
    pass


def _capture_call(module: nn.Module, run: Callable[[], Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The hidden-state input and the other (keyword) arguments ``module`` first gets during ``run()``."""
    seen: dict[str, Any] = {}

    def hook(_m, args, kwargs):
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        seen["x"] = bound.pop(next(iter(bound)))
        seen["kwargs"] = {**bound, **extra}
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"], seen["kwargs"]


def select_image_features(config, layer_outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """The projector input from vision hidden states, as LlavaModel.get_image_features selects it.

    ``layer_outputs[k]`` is ``hidden_states[k]`` of the vision tower (k=0: embeddings).
    """
    picked = [layer_outputs[k] for k in vision_feature_layers(config)]
    if config.vision_feature_select_strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


@dataclass
class CalibBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor | None = None  # any-resolution families: (h, w) per image

    def images(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The image keyword arguments of the HF model's forward (``pixel_values``, ``image_sizes``)."""
        out = {"pixel_values": self.pixel_values if device is None else self.pixel_values.to(device)}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        return out


def encode_batches(vlm: LoadedVLM, samples: Sequence[Sample], batch_size: int) -> list[CalibBatch]:
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        enc = vlm.processor(images=[s.image for s in chunk], text=[build_prompt(vlm.processor, s.question) for s in chunk],
                            return_tensors="pt", padding=True)
        # pixels in the model's dtype: a bf16/fp16 model (loaded in its own dtype) rejects fp32 inputs
        batches.append(CalibBatch(enc["input_ids"], enc["attention_mask"], enc["pixel_values"].to(vlm.model.dtype),
                                  enc.get("image_sizes")))
    return batches


@dataclass
class BlockContext:
    """What a method sees of one block, and where it records its decisions."""

    units: list[Unit]
    modules: list[nn.Module]  # the block's live modules (quantized stream; edit these)
    fp_modules: list[nn.Module]  # frozen full-precision copies
    q_inputs: list[torch.Tensor]  # per batch, on the compute device
    fp_inputs: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]  # per unit, per batch
    recipe: QuantRecipe
    root: nn.Module  # the whole model, for unit-level replacements (lm_head)
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    # data-parallel calibration (quant/distributed.py): the global indices of the batches above
    # (None: all of them, in order) and the global batch count
    batch_ids: list[int] | None = None
    total_batches: int | None = None

    @property
    def n_batches(self) -> int:
        """Calibration batches over every rank (``len(q_inputs)`` in one process)."""
        return len(self.q_inputs) if self.total_batches is None else self.total_batches

    def forward(self, x: torch.Tensor, batch: int, fp: bool = False, upto: int | None = None) -> torch.Tensor:
        """Run ``x`` (batch ``batch``) through the block's units (``upto`` exclusive) of one stream."""
        mods = self.fp_modules if fp else self.modules
        for i, m in enumerate(mods[:upto]):
            x = m(x, **self.kwargs[i][batch])
        return x

    def linears(self) -> list[tuple[str, nn.Linear]]:
        """Quantizable Linears of the block with full model names, in module order."""
        return unit_linears(self.units, self.modules, self.recipe, family_of(self.root))

    def replace_linear(self, name: str, layer: LayerQuant) -> None:
        """Swap the live Linear ``name`` for its simulated quantized version."""
        old = self.root.get_submodule(name)
        new = QuantLinear(layer, old.bias, old.weight.dtype)
        set_submodule(self.root, name, new)
        self.modules = [new if u.name == name else m for u, m in zip(self.units, self.modules)]
        self.layers[name] = layer

    def set_override(self, param_name: str, value: torch.Tensor) -> None:
        """Record a float parameter the method rewrote (already written into the live module)."""
        self.overrides[param_name] = value.detach().cpu().clone()


BlockFn = Callable[[BlockContext], None]


class SequentialCalibrator:
    """Walks the model block by block, keeping one boundary's activations per stream."""

    def __init__(self, vlm: LoadedVLM, samples: Sequence[Sample], recipe: QuantRecipe,
                 batch_size: int = 16, device: str | None = None, offload: str = "cpu",
                 checkpoint_dir: Path | None = None, block_weights: bool = False):
        self.vlm, self.recipe = vlm, recipe
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.offload = offload
        # block_weights: the model was loaded on the host; only the stem and the current block
        # live on the device (quant/placement.py). Off when a method's plan needs the whole model there.
        self.block_weights = block_weights
        if block_weights:
            place_stem(vlm.model, self.device)
        self.batches = encode_batches(vlm, samples, batch_size)  # every rank's, for fingerprints and plans
        # this rank's batches (all of them in one process): only their activations are computed here
        self.local = distributed.shard(len(self.batches))
        self.units = model_units(vlm.model, include_lm_head=recipe.modules.lm_head)
        self.extras: dict[str, Any] = {}  # a method's plan() results, copied into the state's extras
        self.checkpoint_dir = checkpoint_dir  # see run(); None: no checkpoints

    # -- boundaries -------------------------------------------------------------------
    def _vision_inputs(self) -> tuple[list[torch.Tensor], list[dict]]:
        model, family = self.vlm.model, family_of(self.vlm.model)
        tower, first = model.get_submodule(family.vision_tower), model.get_submodule(f"{family.vision_layers}.0")
        xs, kws = [], []
        for b in distributed.local_items(self.local, self.batches):
            tiles = family.tiles_torch(self.vlm.model, b.images(self.device))
            x, kwargs = _capture_call(first, lambda t=tiles: tower(t))
            xs.append(x)
            kws.append(kwargs)
        return xs, kws

    def _decoder_inputs(self, image_features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
        model, family = self.vlm.model, family_of(self.vlm.model)
        language_model, embed_tokens = model.get_submodule(family.language_model), model.get_submodule(family.embed_tokens)
        first = model.get_submodule(f"{family.decoder_layers}.0")
        xs, kws = [], []
        for b, feats in zip(distributed.local_items(self.local, self.batches), image_features):
            ids = b.input_ids.to(self.device)
            embeds = embed_tokens(ids)
            mask = (ids == self.vlm.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            packed = family.pack_torch(self.vlm.model, feats.to(self.device), b.images())
            embeds = embeds.masked_scatter(mask, packed.to(embeds.dtype))
            position_ids = (b.attention_mask.long().cumsum(-1) - 1).clamp_min(0).to(self.device)
            run = lambda e=embeds, m=b.attention_mask, p=position_ids: language_model(  # noqa: E731
                inputs_embeds=e, attention_mask=m.to(self.device), position_ids=p, use_cache=False)
            x, kwargs = _capture_call(first, run)
            xs.append(x)
            kws.append(kwargs)
        return xs, kws

    # -- the walk ---------------------------------------------------------------------
    def run(self, block_fn: BlockFn, partition: list[list[int]] | None = None,
            progress: Callable[[str], None] | None = None, checkpoint_dir: Path | None = None) -> QuantState:
        """Quantize with ``block_fn`` over ``partition`` (lists of unit indices; default one unit a block).

        With ``checkpoint_dir`` (default: the constructor's) every finished block is saved there, and blocks already
        saved by an earlier (killed) run with the same inputs are replayed instead of
        searched, giving the same final state as an uninterrupted run (see quant/checkpoint.py).
        """
        partition = partition or [[i] for i in range(len(self.units))]
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else self.checkpoint_dir
        state = QuantState(recipe=self.recipe, layers={}, model_path=str(self.vlm.path),
                           extras=copy.deepcopy(self.extras))
        state.extras["left_out"] = unused_layers(self.vlm.model.config)
        ckpt = None
        if checkpoint_dir is not None:
            inputs = [t for b in self.batches for t in (b.input_ids, b.attention_mask, *b.images().values())]
            fingerprint = run_fingerprint(self.vlm.model, self.recipe, [u.name for u in self.units], partition, inputs)
            ckpt = BlockCheckpoint(Path(checkpoint_dir), fingerprint, self.recipe)
        with torch.no_grad():
            q_x, kw = self._vision_inputs()
        fp_x = [x.clone() for x in q_x]
        vision_hidden: dict[str, dict[int, list[torch.Tensor]]] = {"q": {0: q_x}, "fp": {0: fp_x}}
        for position, block in enumerate(partition):
            units = [self.units[i] for i in block]
            kind = units[0].kind
            if kind == "projector":
                q_x = self._select(vision_hidden["q"])
                fp_x = self._select(vision_hidden["fp"])
                kw = [{} for _ in self.local]
            elif kind == "decoder" and units[0].index == 0:
                with torch.no_grad():
                    q_x, kw = self._decoder_inputs(q_x)
                    fp_x, _ = self._decoder_inputs(fp_x)
            elif kind == "lm_head":
                norm = self.vlm.model.get_submodule(family_of(self.vlm.model).final_norm)
                with torch.no_grad():
                    q_x, fp_x = [norm(x) for x in q_x], [norm(x) for x in fp_x]
                kw = [{} for _ in self.local]
            ctx = self._context(units, q_x, fp_x, kw)
            done = finished_block(ckpt, position)
            if done is not None:
                self._replay(ctx, done)
            else:
                block_fn(ctx)
                if ckpt is not None and distributed.is_primary():  # one writer; every rank replays its copy
                    ckpt.save(position, ctx.layers, ctx.overrides, ctx.extras)
            if progress:
                progress(",".join(u.name for u in units), ctx.extras)
            state.layers.update(ctx.layers)
            state.float_overrides.update(ctx.overrides)
            for key, value in ctx.extras.items():
                if isinstance(value, dict):
                    state.extras.setdefault(key, {}).update(value)
                else:
                    state.extras[key] = value
            q_x, fp_x = self._propagate(ctx, units, vision_hidden)
            if self.block_weights:
                state.layers.update(release_block(ctx.modules, ctx.layers, self.vlm.model, self.offload))
        return state

    def _replay(self, ctx: BlockContext, done: QuantState) -> None:
        """Apply a checkpointed block's decisions to the live model instead of searching it."""
        apply_overrides(self.vlm.model, done.float_overrides)
        ctx.overrides.update(done.float_overrides)
        for name, layer in done.layers.items():
            device = ctx.root.get_submodule(name).weight.device
            ctx.replace_linear(name, dataclasses.replace(
                layer, weight_codes=layer.weight_codes.to(device), weight_scale=layer.weight_scale.to(device),
                weight_zero_point=layer.weight_zero_point.to(device),
                input_scale=None if layer.input_scale is None else layer.input_scale.to(device)))
        ctx.extras.update(done.extras)

    def _context(self, units, q_x, fp_x, kw) -> BlockContext:
        modules = [self.vlm.model.get_submodule(u.name) for u in units]
        if self.block_weights:
            modules = [m.to(self.device) for m in modules]  # in place; release_block moves them back
        fp_modules = [copy.deepcopy(m).eval() for m in modules]
        for m in fp_modules:
            m.requires_grad_(False)
        # Every unit of a block shares the batch kwargs of its stack (masks, rotary embeddings).
        return BlockContext(units=units, modules=modules, fp_modules=fp_modules,
                            q_inputs=[x.to(self.device) for x in q_x], fp_inputs=[x.to(self.device) for x in fp_x],
                            kwargs=[kw for _ in units], recipe=self.recipe, root=self.vlm.model,
                            batch_ids=self.local if distributed.active() else None, total_batches=len(self.batches))

    def _propagate(self, ctx: BlockContext, units: list[Unit], vision_hidden) -> tuple[list, list]:
        q_out, fp_out = [], []
        with torch.no_grad():
            for b in range(len(ctx.q_inputs)):
                q, f = ctx.q_inputs[b], ctx.fp_inputs[b]
                for i, u in enumerate(units):
                    q = ctx.modules[i](q, **ctx.kwargs[i][b])
                    f = ctx.fp_modules[i](f, **ctx.kwargs[i][b])
                    if u.kind == "vision":
                        vision_hidden["q"].setdefault(u.index + 1, []).append(q.to(self.offload))
                        vision_hidden["fp"].setdefault(u.index + 1, []).append(f.to(self.offload))
                q_out.append(q.to(self.offload))
                fp_out.append(f.to(self.offload))
        self._drop_unused_vision(vision_hidden)
        return q_out, fp_out

    def _wanted_vision_layers(self) -> set[int]:
        return set(vision_feature_layers(self.vlm.model.config))

    def _drop_unused_vision(self, vision_hidden) -> None:
        keep = self._wanted_vision_layers()
        for stream in vision_hidden.values():
            done = max(stream)
            for k in [k for k in stream if k not in keep and k != done]:
                del stream[k]

    def _select(self, hidden: dict[int, list[torch.Tensor]]) -> list[torch.Tensor]:
        cfg = self.vlm.model.config
        return [select_image_features(cfg, {k: v[b] for k, v in hidden.items()}) for b in range(len(self.local))]
