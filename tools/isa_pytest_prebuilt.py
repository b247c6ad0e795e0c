"""Run runtime tests against bundles prepared by ``tools/check_isa_paths.py --prepare DIR``, without exporting.

For running the CPU-dependent tests under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI), where a torch
export would take many minutes: ``tests/_export_helpers.bundle`` / ``quant_state`` are pointed at the
prepared bundles (same recipe, calibration and default model as the helpers use), then pytest runs.

    qemu-x86_64 -cpu Haswell .venv/bin/python tools/isa_pytest_prebuilt.py DIR [pytest args...]
    (without test ids: the two fast-vs-faithful tests of tests/test_runtime.py, plus any options given)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["tests/test_runtime.py::test_fast_mode_uses_integer_kernels_faithful_does_not",
           "tests/test_runtime.py::test_int4_accuracy_level_reaches_the_fast_session_and_removes_its_drift"]


def main(argv: list[str]) -> int:
    import pytest

    prepared = Path(argv[0]).resolve()
    sys.path.insert(0, str(ROOT / "tests"))
    import _export_helpers as helpers

    def bundle(setting: str, dtype: str = "fp32", model=None) -> Path:
        if dtype != "fp32" or model is not None:
            raise RuntimeError(f"no prepared bundle for {setting}/{dtype}/{model}")
        return prepared / f"b-{setting}"

    def quant_state(setting: str, model=None) -> Path:
        if model is not None:
            raise RuntimeError(f"no prepared quant state for {setting}/{model}")
        return prepared / f"q-{setting}"

    helpers.bundle, helpers.quant_state = bundle, quant_state
    sys.path.insert(0, str(ROOT / "tools"))
    from check_isa_paths import cpu_features, int8_probe, isa_path

    print(f"ISA path seen by this process: {isa_path(cpu_features(), [int8_probe('int8')])}", flush=True)
    args = argv[1:]
    if not any(not a.startswith("-") for a in args):  # only options: run the default tests with them
        args = [*args, *DEFAULT]
    return pytest.main(["-p", "no:cacheprovider", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
