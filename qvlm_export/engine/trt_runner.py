"""Run the engines of an engine directory: one Polygraphy ``TrtRunner`` per engine and phase.

The decoder engine has two optimization profiles (prefill, decode); each gets its own
execution context, so switching phase between calls costs nothing. Before TensorRT sees
an engine the manifest is checked against the running TensorRT version and GPU, and
every call's shapes against the profile ranges recorded in the manifest, so a prompt
that is too long fails with the profile's limit rather than a TensorRT binding error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QvlmError
from .builder import read_engine_manifest
from .environment import TrtEnvironment, check_engine_compatibility, detect_environment

PAST_INPUT = "past_key_values.0.key"


def choose_phase(graph: str, feeds: dict[str, np.ndarray]) -> int:
    """Optimization-profile index for one call: decoder prefill (no past) is 0, decode is 1."""
    if graph != "decoder":
        return 0
    past = feeds.get(PAST_INPUT)
    return 0 if past is None or past.shape[2] == 0 else 1


def check_feed_shapes(manifest: dict[str, Any], graph: str, phase: int, feeds: dict[str, np.ndarray],
                      where: str = "engines") -> None:
    """Raise a QvlmError naming the input, axis and profile limit when a feed falls outside the profile."""
    entry = manifest["engines"][graph]["optimization_profiles"][phase]
    shapes = entry["shapes"]
    missing = sorted(set(shapes) - set(feeds))
    if missing:
        raise QvlmError(f"{where}: the {graph} engine needs input {missing[0]!r}, which was not given")
    for name, array in feeds.items():
        if name not in shapes:
            raise QvlmError(f"{where}: the {graph} engine has no input {name!r}; it takes {sorted(shapes)}")
        low, high = shapes[name]["min"], shapes[name]["max"]
        if len(array.shape) != len(low):
            raise QvlmError(f"{where}: {graph} input {name!r} has rank {len(array.shape)}, the engine expects {len(low)}")
        for axis, (size, lo, hi) in enumerate(zip(array.shape, low, high, strict=True)):
            if not lo <= size <= hi:
                raise QvlmError(f"{where}: {graph} input {name!r} axis {axis} is {size}, outside the "
                                f"{entry['name']} profile's {lo}..{hi}; rebuild with a profile that allows it "
                                f"(max_batch / max_prompt / max_context)")


class TrtEngineSet:
    """The vision, embed and decoder engines of one ``qvlm-export build`` directory.

    Use as a context manager; ``run(graph, feeds)`` takes and returns numpy arrays keyed by
    the ONNX graph's input and output names, exactly like an ONNX Runtime session would.
    """

    def __init__(self, engine_dir: Path, environment: TrtEnvironment | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_engine_manifest(self.engine_dir)
        self.environment = environment
        self._runners: dict[tuple[str, int], Any] = {}

    @property
    def bundle_dir(self) -> Path:
        """The bundle's metadata (bundle.json, processor) copied beside the engines."""
        return self.engine_dir / "bundle"

    def activate(self) -> TrtEngineSet:
        """Check TensorRT version and GPU against the manifest, then deserialize every engine."""
        if self._runners:
            return self
        environment = self.environment or detect_environment()
        check_engine_compatibility(self.manifest, environment, where=str(self.engine_dir))
        self._runners = self._load_runners()
        return self

    def _load_runners(self) -> dict[tuple[str, int], Any]:
        from polygraphy.backend.trt import EngineFromPath, TrtRunner
        from polygraphy.exception import PolygraphyException

        from .environment import require_tensorrt

        require_tensorrt()
        runners = {}
        try:
            for graph, entry in self.manifest["engines"].items():
                path = self.engine_dir / entry["file"]
                if not path.is_file():
                    raise QvlmError(f"{self.engine_dir}: engine file {entry['file']!r} is missing; rebuild the engines")
                phases = len(entry["optimization_profiles"])
                try:
                    # Polygraphy raises (never returns None) when deserialization fails
                    engine = EngineFromPath(str(path))()
                    for phase in range(phases):
                        # one context per profile: "profile" sizes its device memory to that profile's
                        # max shapes, where the default "static" reserves the largest of every profile
                        runner = TrtRunner(engine, name=f"{graph}-{phase}", optimization_profile=phase,
                                           allocation_strategy="profile" if phases > 1 else None)
                        runner.activate()
                        runners[(graph, phase)] = runner
                except PolygraphyException as exc:
                    raise QvlmError(f"{path}: TensorRT could not load the {graph} engine ({last_line(exc)}); "
                                    f"rebuild it on this machine with `qvlm-export build`") from None
        except BaseException:
            for runner in runners.values():
                runner.deactivate()
            raise
        return runners

    def deactivate(self) -> None:
        for runner in self._runners.values():
            runner.deactivate()
        self._runners.clear()

    def __enter__(self) -> TrtEngineSet:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of one graph; batches above the profile's max_batch run in chunks (every I/O is batch-major)."""
        if not self._runners:
            raise QvlmError("the TensorRT engines are not active; use `with TrtEngineSet(dir) as engines:`")
        if graph not in self.manifest["engines"]:
            raise QvlmError(f"{self.engine_dir} has no {graph!r} engine; it has {sorted(self.manifest['engines'])}")
        phase = choose_phase(graph, feeds)
        shapes = self.manifest["engines"][graph]["optimization_profiles"][phase]["shapes"]
        max_batch = min(s["max"][0] for s in shapes.values())
        batch = next(iter(feeds.values())).shape[0] if feeds else 0
        if batch <= max_batch:
            return self._run_chunk(graph, phase, feeds)
        parts = [self._run_chunk(graph, phase, {k: v[i:i + max_batch] for k, v in feeds.items()})
                 for i in range(0, batch, max_batch)]
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    def _run_chunk(self, graph: str, phase: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed_shapes(self.manifest, graph, phase, feeds, where=str(self.engine_dir))
        from polygraphy.exception import PolygraphyException

        contiguous = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
        try:
            outputs = self._runners[(graph, phase)].infer(contiguous)
        except PolygraphyException as exc:  # e.g. "failed to set shape", execute_async_v3 failed
            shapes = {name: list(array.shape) for name, array in feeds.items()}
            raise QvlmError(f"{self.engine_dir}: TensorRT could not run the {graph} engine on shapes {shapes} "
                            f"({last_line(exc)}); check the shapes against the manifest's profiles") from None
        # copy: Polygraphy runners may reuse their output buffers on the next call
        return {name: np.array(value) for name, value in outputs.items()}


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The last non-empty line of an exception message (Polygraphy's carry the TensorRT log before it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:limit]

def input_metadata(manifest: dict[str, Any], graph: str):
    """Polygraphy ``TensorMetadata`` of one engine from its manifest: dtypes, and None on dynamic axes."""
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    entry = manifest["engines"][graph]
    profiles = [p["shapes"] for p in entry["optimization_profiles"]]
    meta = TensorMetadata()
    for name, dtype in entry["inputs"].items():
        ranges = [(p[name]["min"], p[name]["max"]) for p in profiles]
        shape = [ranges[0][0][axis] if all(lo[axis] == hi[axis] == ranges[0][0][axis] for lo, hi in ranges) else None
                 for axis in range(len(ranges[0][0]))]
        meta.add(name, dtype=DataType.from_dtype(np.dtype(dtype)), shape=shape)
    return meta


def graph_runner(engines: Path | TrtEngineSet, graph: str, name: str | None = None):
    """A Polygraphy runner for one graph of an engine set (validate's TensorRT candidate).

    Pass an engine directory (the runner owns and activates its own engine set) or an
    active ``TrtEngineSet`` shared by the runners of several graphs. The decoder runner
    picks the prefill or decode profile per call, so Polygraphy's ``Comparator`` can feed
    it any step.
    """
    from ..runtime.graph_runner import GraphRunner

    owned = isinstance(engines, str | Path)
    graphs = TrtEngineSet(Path(engines)) if owned else engines
    return GraphRunner(graphs, graph, lambda engine_set: input_metadata(engine_set.manifest, graph), owned=owned,
                       name=name or f"tensorrt-{graph}", prefix="tensorrt")


def tensorrt_runner(engine_dir: Path, environment: TrtEnvironment | None = None):
    """The runtime's ``VLMRunner`` over an engine directory (generate, eval and validate use this).

    Nothing is loaded until ``activate()``; the bundle description comes from the copy
    beside the engines, so the ONNX bundle need not be present.
    """
    from ..runtime.bundle import read_bundle
    from ..runtime.runner import GraphSetRunner

    engines = TrtEngineSet(Path(engine_dir), environment)
    return GraphSetRunner(engines, read_bundle(engines.bundle_dir), name=f"tensorrt:{Path(engine_dir).name}")
