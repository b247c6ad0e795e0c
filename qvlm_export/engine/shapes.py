"""Optimization-profile shapes: min/opt/max per engine input, from the graph and the build profile.

Each dynamic axis of a bundle input has a role known from the graph contract
(DESIGN section 5): ``batch``, ``seq`` (new tokens), ``past`` (KV-cache length) or
``total`` (past + new, the attention mask). A TensorRT optimization profile gives each
role a (min, opt, max) range; static axes keep their size. The decoder gets two
profiles, prefill (past 0, seq up to max_prompt) and decode (seq 1, past up to
max_context - 1), so each phase is tuned for its own shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QvlmError
from .profiles import BuildProfile

Range = tuple[int, int, int]
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

PAST_PREFIX = "past_key_values."
# input name -> {axis: role}; past_key_values.{i}.key/value share one entry
AXIS_ROLES: dict[str, dict[int, str]] = {
    "pixel_values": {0: "batch"},
    "input_ids": {0: "batch", 1: "seq"},
    "inputs_embeds": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "total"},
    "position_ids": {0: "batch", 1: "seq"},
    PAST_PREFIX: {0: "batch", 2: "past"},
}


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, ONNX element type and dims (int when static, a name or None when dynamic)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...]


def read_graph_inputs(onnx_path: Path) -> list[InputSpec]:
    """The real inputs of an ONNX file (initializers excluded), without loading its weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, tensor.elem_type, dims))
    return specs


def phase_ranges(graph: str, profile: BuildProfile, tiles: int = 1) -> list[tuple[str, dict[str, Range]]]:
    """(phase name, role -> (min, opt, max)) for each optimization profile of ``graph``.

    ``tiles``: the most vision-graph rows one image takes (any-resolution families run every
    tile of every image of a batch as one vision batch; 1 for LLaVA-1.5).
    """
    batch, prompt, past = profile.batch_range, profile.prompt_range, profile.past_range
    if graph == "vision":
        return [("batch", {"batch": (batch[0], batch[1] * tiles, batch[2] * tiles)})]
    if graph == "embed":
        # one profile: the runtime embeds whole prompts and single generated tokens
        return [("tokens", {"batch": batch, "seq": prompt})]
    if graph == "decoder":
        prefill = {"batch": batch, "seq": prompt, "past": (0, 0, 0), "total": prompt}
        decode = {"batch": batch, "seq": (1, 1, 1), "past": past, "total": tuple(p + 1 for p in past)}
        return [("prefill", prefill), ("decode", decode)]
    raise QvlmError(f"unknown graph {graph!r}; a bundle has vision, embed and decoder graphs")


def _roles_for(name: str) -> dict[int, str]:
    if name.startswith(PAST_PREFIX):
        return AXIS_ROLES[PAST_PREFIX]
    return AXIS_ROLES.get(name, {})


def input_shape_range(spec: InputSpec, ranges: dict[str, Range], where: str) -> ShapeRange:
    """(min, opt, max) shapes of one input under one phase's role ranges."""
    roles = _roles_for(spec.name)
    lows, opts, highs = [], [], []
    for axis, dim in enumerate(spec.dims):
        role = roles.get(axis)
        if isinstance(dim, int) and dim > 0:
            if role in ranges and ranges[role] != (dim, dim, dim):
                raise QvlmError(f"{where}: input {spec.name!r} has static {role} size {dim} on axis {axis}, "
                                f"but the profile needs {ranges[role][0]}..{ranges[role][2]}; re-export with a "
                                f"dynamic {role} axis or change the profile")
            lows.append(dim), opts.append(dim), highs.append(dim)
            continue
        if role is None or role not in ranges:
            raise QvlmError(f"{where}: input {spec.name!r} axis {axis} is dynamic ({dim!r}) but has no known role; "
                            f"only {sorted(AXIS_ROLES)} inputs are supported; export it with a static size")
        low, opt, high = ranges[role]
        lows.append(low), opts.append(opt), highs.append(high)
    return tuple(lows), tuple(opts), tuple(highs)


def optimization_profiles(graph: str, inputs: list[InputSpec], profile: BuildProfile,
                          where: str = "", tiles: int = 1) -> list[tuple[str, dict[str, ShapeRange]]]:
    """(phase, {input: (min, opt, max)}) for every optimization profile of one engine."""
    where = where or graph
    return [(phase, {spec.name: input_shape_range(spec, ranges, f"{where} ({phase} profile)") for spec in inputs})
            for phase, ranges in phase_ranges(graph, profile, tiles)]
