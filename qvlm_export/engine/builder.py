"""``build``: strongly typed TensorRT engines from an ONNX bundle, with a manifest.

Orchestration only. Planning (which graph files, which optimization-profile shapes) is
pure Python and runs anywhere; compiling one engine goes through Polygraphy's TensorRT
loaders (``NetworkFromOnnxPath(strongly_typed=True)`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork``), imported only when a build actually runs. Strongly typed
networks take every precision from the graph's dtypes and Q/DQ nodes, which is the only
mode TensorRT 11 keeps, so the same code builds on TensorRT 10 and 11.

Engine directory::

    vision.engine  embed.engine  decoder.engine
    bundle/        the bundle's bundle.json, config and processor files (no weights): runners need no bundle path
    manifest.json  TensorRT version, GPU, profile + hash, shapes per optimization profile, input hashes
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QvlmError
from ..manifest import atomic_directory, build_manifest, digest, hash_tree, sha256_file, write_manifest
from .environment import TrtEnvironment, detect_environment
from .profiles import BuildProfile
from .shapes import InputSpec, ShapeRange, optimization_profiles, read_graph_inputs

GRAPHS = ("vision", "embed", "decoder")
ENGINE_KIND = "engines"
WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin", ".engine", ".safetensors")


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build: its graph, ONNX source and optimization profiles (phase, shapes)."""

    graph: str
    source: Path
    inputs: tuple[InputSpec, ...]
    profiles: tuple[tuple[str, dict[str, ShapeRange]], ...]

    @property
    def engine_file(self) -> str:
        return f"{self.graph}.engine"

    def describe(self, bundle: Path) -> dict[str, Any]:
        from onnx import helper

        return {"file": self.engine_file, "source": str(self.source.relative_to(bundle)),
                "inputs": {s.name: helper.tensor_dtype_to_np_dtype(s.elem_type).name for s in self.inputs},
                "optimization_profiles": [
                    {"name": phase, "shapes": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                                               for name, s in shapes.items()}}
                    for phase, shapes in self.profiles]}


@dataclass(frozen=True)
class BuildPlan:
    bundle: Path
    profile: BuildProfile
    engines: tuple[EngineSpec, ...]


# (spec, profile, timing cache path or None) -> serialized engine (bytes or a buffer)
Compiler = Callable[[EngineSpec, BuildProfile, "Path | None"], Any]


def plan_build(bundle: Path, profile: BuildProfile) -> BuildPlan:
    """Which engines to build from which files, with the shapes of every optimization profile.

    A ``size_from_bundle`` profile is sized from the bundle first; any profile that cannot
    hold one image prompt, or needs a tensor over 2^31-1 elements, is refused (:mod:`.fit`).
    """
    from ..families import family_for
    from ..runtime.bundle import read_bundle
    from .fit import check_fits, derive_profile, hf_config

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise QvlmError(f"bundle {str(bundle)!r} is not a directory; pass the output of `qvlm-export export`")
    info = read_bundle(bundle)
    if info.dtype != profile.graph_dtype:
        raise QvlmError(f"bundle {str(bundle)!r} has {info.dtype} graphs but profile {profile.name!r} builds "
                        f"{profile.graph_dtype} engines; export with --dtype {profile.graph_dtype} or set "
                        f"graph_dtype: {info.dtype} in the profile")
    tiles, config = family_for(info.model.family).max_tiles(info.model.image_layout), hf_config(bundle)
    if profile.size_from_bundle:
        profile = derive_profile(info, profile, tiles, config)
    check_fits(info, profile, tiles, config)  # before any graph is read or engine built
    specs = []
    for graph in GRAPHS:
        source = info.graph_path(graph)
        inputs = read_graph_inputs(source)
        phases = optimization_profiles(graph, inputs, profile, where=str(source.relative_to(bundle)), tiles=tiles)
        specs.append(EngineSpec(graph, source, tuple(inputs), tuple(phases)))
    return BuildPlan(bundle, profile, tuple(specs))


def _check_bundle(plan: BuildPlan) -> dict[str, Any]:
    from .check_trt import check_onnx

    violations, nodes = [], 0
    for spec in plan.engines:
        report = check_onnx(spec.source, name=str(spec.source.relative_to(plan.bundle)))
        violations += report.violations
        nodes += report.qdq_nodes
    if violations:
        raise QvlmError(f"the bundle breaks {len(violations)} TensorRT Q/DQ rule(s), first: {violations[0]}; "
                        f"run `qvlm-export check-trt {plan.bundle}` for all of them")
    return {"ok": True, "qdq_nodes": nodes}


def _copy_bundle_metadata(bundle: Path, dest: Path) -> None:
    """Copy the small non-weight files (bundle.json, tokenizer, processor config) so engines stand alone."""
    for path in sorted(bundle.rglob("*")):
        if path.is_file() and path.name != "manifest.json" and not path.name.endswith(WEIGHT_SUFFIXES):
            target = dest / path.relative_to(bundle)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def engine_manifest(plan: BuildPlan, env: TrtEnvironment, out_dir: Path, timing_cache: Path | None,
                    check: dict[str, Any] | None) -> dict[str, Any]:
    """The engine directory's manifest; ``out_dir`` already holds the engines."""
    sources = {f"bundle/{k}": v for k, v in hash_tree(plan.bundle).items()}
    config = {"profile": plan.profile.to_dict(), "timing_cache": str(timing_cache) if timing_cache else None,
              "strongly_typed": True}
    bundle_manifest = plan.bundle / "manifest.json"
    extra = {
        "tensorrt": {"version": env.tensorrt_version},
        "gpu": {"name": env.gpu_name, "compute_capability": env.compute_capability},
        "profile_hash": plan.profile.digest(),
        "decoder_logits": plan.profile.decoder_logits,  # last: [batch, 1, vocab] (.last_token)
        "bundle": {"path": str(plan.bundle.resolve()), "inputs_digest": digest(sources),
                   "manifest_sha256": sha256_file(bundle_manifest) if bundle_manifest.is_file() else None},
        "engines": {spec.graph: spec.describe(plan.bundle) for spec in plan.engines},
        "check_trt": check,
    }
    return build_manifest(ENGINE_KIND, config, sources, out_dir, extra)


def build_engines(bundle: Path, profile: BuildProfile, out: Path, *, timing_cache: Path | None = None,
                  skip_check: bool = False, compiler: Compiler | None = None,
                  environment: TrtEnvironment | None = None) -> Path:
    """Build vision, embed and decoder engines from ``bundle`` into ``out`` (atomically).

    ``timing_cache`` overrides the profile's; ``compiler`` and ``environment`` default to
    the TensorRT ones (tests substitute them to exercise planning and manifests on CPU).
    """
    plan = plan_build(bundle, profile)
    check = None if skip_check else _check_bundle(plan)
    env = environment or detect_environment()  # raises the install hint when tensorrt is missing
    compile_one = compiler or compile_engine
    cache = Path(timing_cache).expanduser() if timing_cache else profile.timing_cache_path()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(Path(out)) as tmp:
        for spec in plan.engines:
            engine = compile_one(_engine_source(spec, plan.profile, tmp / ".graphs"), plan.profile, cache)
            with open(tmp / spec.engine_file, "wb") as f:
                f.write(engine)  # bytes or TensorRT's IHostMemory (a buffer)
        shutil.rmtree(tmp / ".graphs", ignore_errors=True)
        _copy_bundle_metadata(plan.bundle, tmp / "bundle")
        write_manifest(tmp, engine_manifest(plan, env, tmp, cache, check))
    return Path(out)


def _engine_source(spec: EngineSpec, profile: BuildProfile, scratch: Path) -> EngineSpec:
    """The spec TensorRT compiles: the decoder with last-token logits (``decoder_logits: last``), else as planned.

    The bundle's own files are never edited (.last_token writes a copy under ``scratch``).
    """
    if spec.graph != "decoder" or profile.decoder_logits != "last":
        return spec
    import dataclasses

    from .last_token import write_last_token_decoder

    return dataclasses.replace(spec, source=write_last_token_decoder(spec.source, scratch / spec.graph))


def compile_engine(spec: EngineSpec, profile: BuildProfile, timing_cache: Path | None) -> Any:
    """Serialize one strongly typed engine through Polygraphy's TensorRT loaders (needs TensorRT + GPU)."""
    from .environment import require_tensorrt
    from .trt_runner import last_line

    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    profiles = []
    for _, shapes in spec.profiles:
        p = Profile()
        for name, (low, opt, high) in shapes.items():
            p.add(name, min=low, opt=opt, max=high)
        profiles.append(p)
    hardware = None
    if profile.hardware_compatibility != "none":
        hardware = getattr(trt.HardwareCompatibilityLevel, profile.hardware_compatibility.upper(), None)
        if hardware is None:
            raise QvlmError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                            f"{profile.hardware_compatibility!r}; choose another in the profile")
    cache = str(timing_cache) if timing_cache else None
    config = CreateConfig(
        profiles=profiles, load_timing_cache=cache,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: profile.workspace_mib << 20},
        builder_optimization_level=profile.builder_optimization_level,
        hardware_compatibility_level=hardware, version_compatible=profile.version_compatible)
    network = NetworkFromOnnxPath(str(spec.source), strongly_typed=True)
    try:
        return EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
    except (PolygraphyException, ValueError) as exc:
        # ValueError: TensorRT's IOptimizationProfile.set_shape on shapes it refuses (Polygraphy's
        # Profile.to_trt calls it while CreateConfig runs, inside this call)
        raise QvlmError(f"TensorRT could not build the {spec.graph} engine from {spec.source.name}: "
                        f"{last_line(exc)}; run `qvlm-export check-trt` on the bundle "
                        f"and see the TensorRT log above") from None


def read_engine_manifest(engine_dir: Path, verify: bool | None = None) -> dict[str, Any]:
    """The engine directory's manifest, its files checked against it (``verify`` None: process-wide setting)."""
    from ..manifest import verify_artifact

    return verify_artifact(Path(engine_dir), kind=ENGINE_KIND, verify=verify)


def dump_plan(plan: BuildPlan) -> str:
    """The plan as JSON (for ``build --dry-run``)."""
    return json.dumps({"profile": plan.profile.to_dict(),
                       "engines": {s.graph: s.describe(plan.bundle) for s in plan.engines}}, indent=2)
