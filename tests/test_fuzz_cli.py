"""Property test of the CLI contract: generated argument lists for every subcommand (missing, unknown,
negative, huge, wrong-type values and odd paths) exit 0, 1 or 2, a failure prints exactly one
``error:`` line and no traceback, and a failed command leaves nothing in its output's parent.

The stage APIs are replaced by stubs that end the command with exit 0 where valid input would start
the real work (a model load, an export, a build), so no example loads a model: what is fuzzed is
the layer that must refuse bad input before that point. In-process via ``main(argv)``: ~60 examples
take a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvlm_export.cli import _register, app, main

STUBS = ["qvlm_export.search.api:quantize", "qvlm_export.export.api:export_bundle",
         "qvlm_export.validate.api:validate", "qvlm_export.evaluate.backends:make_answerer",
         "qvlm_export.runtime.factory:answerer_for_bundle", "qvlm_export.engine.builder:build_engines",
         "qvlm_export.engine.builder:plan_build", "qvlm_export.pipeline:run_pipeline",
         "qvlm_export.data.manifest:write_manifest"]


def _reached(*_, **__):
    import typer

    raise typer.Exit(0)  # valid input got as far as the real work: that is success for this test


@pytest.fixture(scope="module")
def commands():
    import importlib

    import typer.main

    _register()
    with pytest.MonkeyPatch.context() as mp:
        for stub in STUBS:
            module, name = stub.split(":")
            mp.setattr(importlib.import_module(module), name, _reached)
        yield {name: [p.opts[0] for p in cmd.params] for name, cmd in typer.main.get_command(app).commands.items()}


# Values: each kind of bad input the contract names, plus a few good ones so valid paths are reached too.
PATHS = ["{root}/missing", "{root}/file", "{root}/dir", "{root}/file/sub", "{root}/out", "{root}/dir/new/deep"]
VALUES = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(["-1", "-3", "0", "1", "2", "1000000000", "99999999999999999999999", "abc", "", "1.5",
                     "builtin:eval:2", "builtin:calib", "builtin:nope", "edge", "rtn-w8a8", "fp32", "cpu",
                     "faithful", "w8a8", "a=b", "quantize.method=rtn"]),
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.text(alphabet="abc-=:/.", max_size=6),
)


@st.composite
def argv(draw, commands):
    command = draw(st.sampled_from(sorted(commands)))
    flags = commands[command]
    args = [command]
    for _ in range(draw(st.integers(0, 5))):
        flag = draw(st.sampled_from([*flags, "--bogus", "-x"]))
        if flag.startswith("-"):
            args.append(flag)
            if draw(st.booleans()) or flag not in ("--no-verify", "--progress", "--task", "--layer-errors",
                                                   "--skip-check", "--dry-run"):
                if draw(st.integers(0, 9)):  # else: the value is missing
                    args.append(draw(VALUES))
        else:  # a positional (check-trt PATH, verify DIRS)
            args.append(draw(VALUES))
    return args


def run(args: list[str], root: Path) -> tuple[int, str]:
    args = [a.replace("{root}", str(root)) for a in args]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    return code, err.getvalue()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))




@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_argument_lists_keep_the_cli_contract(commands, data):
    args = data.draw(argv(commands))
    root = Path(tempfile.mkdtemp(prefix="qvlm-fuzz-"))
    try:
        (root / "file").write_text("not an artifact\n")
        (root / "dir").mkdir()
        before = tree(root)
        code, err = run(args, root)
        assert code in (0, 1, 2), (args, code, err)
        assert "Traceback" not in err, (args, err)
        if code:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
            assert "internal error" not in lines[0], (args, err)  # a bug, not a refusal
            assert tree(root) == before, (args, err, tree(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
