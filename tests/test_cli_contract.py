"""The CLI contract on every subcommand: exit 0 / 1 (a check failed) / 2 (usage, input, OS) / 130 (SIGINT),
one ``error: <what>; <what to do>`` line on stderr, no traceback, nothing left behind, umask-following
artifacts, the ``OUT/.lock`` on every writer. Every case here fails before a model would load."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from qvlm_export.cli import app, main
from qvlm_export.load.model import EMBEDDED_MODEL_DIR
from qvlm_export.manifest import atomic_directory, atomic_write_text, current_umask
from qvlm_export.pipeline_resume import output_lock

COMMANDS = ["build", "check-trt", "data", "eval", "export", "generate", "lmms-task", "quantize", "run", "validate",
            "verify"]


def registered() -> list[str]:
    import typer.main

    from qvlm_export.cli import _register

    _register()
    return sorted(typer.main.get_command(app).commands)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_the_contract_covers_every_registered_command():
    assert registered() == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_is_a_usage_error(command, capsys):
    assert main([command, "--no-such-option", "1"]) == 2
    line = one_error_line(capsys)
    assert "No such option: --no-such-option" in line and f"see 'qvlm-export {command} --help'" in line


# Per command: arguments naming paths that do not exist (the first checked is named in the error).
MISSING = {
    "build": ["--bundle", "{m}", "--profile", "edge", "--out", "{o}"],
    "check-trt": ["{m}"],
    "data": None,  # no input path
    "eval": ["--bundle", "{m}"],
    "export": ["--quant", "{m}", "--out", "{o}"],
    "generate": ["--bundle", "{m}", "--image", "x.png", "--question", "q"],
    "lmms-task": ["--data", "{m}", "--out", "{o}"],
    "quantize": ["--recipe", "rtn-w8a8", "--model", "{m}", "--out", "{o}"],
    "run": ["--model", "{m}", "--out", "{o}", "--engines", "off"],
    "validate": ["--reference", "{m}", "--candidate", "{m}", "--out", "{o}"],
    "verify": ["{m}"],
}


@pytest.mark.parametrize("command", [c for c in COMMANDS if MISSING[c]])
def test_a_missing_input_path_is_named_and_nothing_is_written(command, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    argv = [a.format(m=missing, o=tmp_path / "out") for a in MISSING[command]]
    assert main([command, *argv]) == 2
    line = one_error_line(capsys)
    assert repr(missing) in line and "does not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# Per writing command: everything valid but --out (or --json), which lies under a file.
WRITERS = {
    "build": ["--bundle", "{d}", "--profile", "edge", "--out", "{x}"],
    "check-trt": ["{d}", "--no-verify", "--json", "{x}"],
    "data": ["--out", "{x}"],
    "eval": ["--json", "{x}"],
    "export": ["--model", str(EMBEDDED_MODEL_DIR), "--out", "{x}"],
    "quantize": ["--recipe", "rtn-w8a8", "--out", "{x}"],
    "run": ["--out", "{x}", "--engines", "off"],
    "validate": ["--reference", "{d}", "--candidate", "{d}", "--out", "{x}"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_an_unwritable_output_is_refused_before_any_work(command, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("")
    argv = [a.format(d=tmp_path / "d", x=tmp_path / "file" / "sub") for a in WRITERS[command]]
    assert main([command, *argv]) == 2
    assert f"{str(tmp_path / 'file')!r} is a file, not a directory" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"] and not list((tmp_path / "d").iterdir())


def test_eval_json_naming_a_directory_and_a_limit_past_the_data_fail_before_the_model(tmp_path, capsys,
                                                                                      monkeypatch):
    import qvlm_export.evaluate.backends as backends

    monkeypatch.setattr(backends, "make_answerer", lambda **_: pytest.fail("the model was loaded"))
    assert main(["eval", "--json", str(tmp_path)]) == 2
    assert f"--json {str(tmp_path)!r} is a directory" in one_error_line(capsys)
    assert main(["eval", "--data", "builtin:eval:5", "--limit", "6"]) == 2  # refused, never clamped to 5
    assert "--limit 6 is more than the 5 samples in 'builtin:eval:5'" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["quantize", "export", "validate", "build"])
def test_a_second_writer_of_one_out_is_refused_in_one_line(command, tmp_path, capsys, monkeypatch):
    (tmp_path / "d").mkdir()
    out = tmp_path / "out"
    argv = {"quantize": ["--recipe", "rtn-w8a8"], "export": ["--model", str(EMBEDDED_MODEL_DIR)],
            "validate": ["--reference", str(tmp_path / "d"), "--candidate", str(tmp_path / "d")],
            "build": ["--bundle", str(tmp_path / "d"), "--profile", "edge"]}[command]
    with output_lock(out):
        assert main([command, *argv, "--out", str(out)]) == 2
        assert f"--out {str(out)!r} is in use by another qvlm-export run (pid {os.getpid()}" in one_error_line(capsys)
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert not out.exists()  # the holder made out/ for its lock and removed both


def test_sigint_is_130_an_os_error_2_and_a_bug_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    import qvlm_export.data.manifest as data

    def raise_(exc):
        def stub(*_, **__):
            raise exc
        return stub

    out = str(tmp_path / "out")
    monkeypatch.setattr(data, "write_manifest", raise_(KeyboardInterrupt()))
    assert main(["data", "--out", out]) == 130
    assert one_error_line(capsys) == "error: interrupted; nothing was written to --out, re-run the command"
    monkeypatch.setattr(data, "write_manifest", raise_(PermissionError(13, "Permission denied", "/x/y")))
    assert main(["data", "--out", out]) == 2
    assert one_error_line(capsys).startswith("error: Permission denied: '/x/y'; check that the path exists")
    monkeypatch.setattr(data, "write_manifest", raise_(ZeroDivisionError("boom")))
    assert main(["data", "--out", out]) == 2
    assert one_error_line(capsys) == ("error: internal error ZeroDivisionError: boom; re-run with --debug and "
                                      "report the traceback")
    assert main(["--debug", "data", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")
    assert list(tmp_path.iterdir()) == []  # the temporary, the lock and out/ are all gone


def test_no_arguments_print_the_commands_and_exit_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "quantize" in captured.out and captured.err.strip() == (
        "error: qvlm-export needs a command; pick one from the list above")


def test_artifacts_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        with atomic_directory(tmp_path / "a") as tmp:
            (tmp / "f").write_text("x")
            os.close(os.open(tmp / "saved-via-mkstemp", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors does
            (tmp / "sub").mkdir(mode=0o700)
        atomic_write_text(tmp_path / "j.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o750
    assert [stat.S_IMODE((tmp_path / "a" / n).stat().st_mode) for n in ("f", "saved-via-mkstemp", "sub")] == [
        0o640, 0o640, 0o750]
    assert stat.S_IMODE((tmp_path / "j.json").stat().st_mode) == 0o640
    with atomic_directory(tmp_path / "b"):
        pass
    atomic_write_text(tmp_path / "k.json", "{}")
    expected = 0o777 & ~old
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "k.json").stat().st_mode) == expected & 0o666
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "j.json", "k.json"]  # no temporaries


def _as_nobody() -> list[str] | None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return cmd if subprocess.run([*cmd, "true"], capture_output=True).returncode == 0 else None


def test_a_stage_run_as_root_is_readable_by_another_user(capsys):
    nobody = _as_nobody()
    if nobody is None:
        pytest.skip("needs root and setpriv to switch to uid 65534 (nobody)")
    root = Path(tempfile.mkdtemp(prefix="qvlm-umask-"))  # pytest's tmp_path is 0700: nobody could not enter
    old = os.umask(0o022)
    try:
        os.chmod(root, 0o755)
        assert main(["data", "--out", str(root / "data"), "--split", "eval", "--n", "2"]) == 0
        atomic_write_text(root / "r.json", "{}")  # how --json files and manifest.json are written
        files = ["data/manifest.jsonl", "data/images/00000.png", "data/images/00001.png", "r.json"]
        probe = subprocess.run([*nobody, "sh", "-c", "ls data data/images >/dev/null && cat " + " ".join(files)],
                               cwd=root, capture_output=True)
        assert probe.returncode == 0, probe.stderr
        assert stat.S_IMODE((root / "data").stat().st_mode) == 0o755
        assert stat.S_IMODE((root / "data" / "manifest.jsonl").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        shutil.rmtree(root)
    capsys.readouterr()


def test_option_groups_are_declared_once():
    sources = {p.name: p.read_text() for p in Path(app_file()).parent.glob("*.py")}
    assert sum(s.count('"--no-verify"') for s in sources.values()) == 1 == sources["options.py"].count('"--no-verify"')
    assert sum(s.count('"--json"') for s in sources.values()) == 1
    assert "search_cmd" not in sources["__init__.py"]  # no silently skipped command modules


def app_file() -> str:
    import qvlm_export.cli as cli

    return cli.__file__


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports (``from .x import``, top level or inside functions)."""
    tree = ast.parse(path.read_text())
    return {n.module.split(".")[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}


def test_the_validate_report_modules_import_in_one_direction():
    import qvlm_export.validate as pkg

    root = Path(pkg.__file__).parent
    graph = {p.stem: _imports(p) & {q.stem for q in root.glob("*.py")} for p in root.glob("*.py")}
    seen: dict[str, int] = {}

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"import cycle: {' -> '.join((*stack, node))}"
        if seen.get(node):
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*stack, node))
        seen[node] = 1

    for module in graph:
        visit(module, ())
    assert "html" not in graph["report"] and "summary" not in graph["report"]


def test_the_headline_names_the_runtimes_it_covers():
    from qvlm_export.validate.summary import headline

    def cand(name, comparisons, skipped=()):
        return {"name": name, "graphs": [{"outputs": [{"comparison": c} for c in comparisons]}],
                "task": [{"runner": "faithful"}], "skipped": list(skipped)}

    no_trt = "tensorrt: skipped: no --engines given"
    report = {"passed": True, "candidates": [cand("w8a8", ["fidelity", "faithful", "fast", "drift"], [no_trt])]}
    assert headline(report) == "PASSED on ONNX Runtime (faithful, fast); TensorRT not run: no --engines given"
    report = {"passed": False, "candidates": [cand("w8a8", ["faithful", "tensorrt"]),
                                              cand("w4a16", ["faithful"], ["tensorrt engines: skipped: no GPU"])]}
    assert headline(report) == ("FAILED on ONNX Runtime (faithful) and TensorRT (w8a8); TensorRT not run for "
                                "w4a16: no GPU")
    report = {"passed": True, "candidates": [cand("w8a8", ["faithful", "tensorrt"])]}
    assert headline(report) == "PASSED on ONNX Runtime (faithful) and TensorRT"
