"""``qvlm-export run`` into one --out: the lock, stale temporaries, skipping up-to-date stages, and
SIGKILL at several points followed by a re-run that ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qvlm_export.cli import main
from qvlm_export.errors import QvlmError
from qvlm_export.export.config import ExportConfig
from qvlm_export.manifest import hash_tree
from qvlm_export.pipeline_resume import bundle_current, quant_state_current, remove_stale_temps, run_lock
from qvlm_export.quant.recipe import recipe_from_dict

TINY_RECIPE = {"method": "rtn", "setting": "w8a8", "weights": {"group_size": 16},
               "calibration": {"samples": 2, "batch_size": 2}}  # what conftest's tiny_bundle quantized with


def test_a_second_run_into_the_same_out_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out):
        assert main(["run", "--out", str(out), "--method", "rtn", "--settings", "w8a8", "--no-progress"]) == 2
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else was touched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {str(out)!r} is in use by another qvlm-export run (pid {os.getpid()}" in err
    assert not out.exists()  # the holder made out/ for its lock; releasing it leaves nothing behind


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qvlm_export.pipeline_resume import "
                               "run_lock\nwith run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(QvlmError, match="is in use by another qvlm-export run"), run_lock(out):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / ".lock").read_text() == f"{holder.pid}\n"  # the file stays; the kernel dropped the lock
    with run_lock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_stale_temporaries_are_removed(tmp_path):
    for d in ("quant/.w8a8.abc.partial", "bundles/.fp.x.partial/processor", ".report.y.partial"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / ".run.json.z.tmp").write_text("{")
    (tmp_path / "bundles" / "fp").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == [
        ".report.y.partial", ".run.json.z.tmp", "bundles/.fp.x.partial", "quant/.w8a8.abc.partial"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["bundles", "bundles/fp", "quant"]


def test_stage_artifacts_are_current_only_for_their_own_inputs_and_intact_files(tiny_bundle, tmp_path):
    made = tiny_bundle("w8a8")
    quant, model = made.parent / "quant-w8a8", str(made.parent / "model")
    bundle = shutil.copytree(made, tmp_path / "B")
    assert bundle_current(model, quant, ExportConfig(), bundle)
    assert not bundle_current(model, quant, ExportConfig(dtype="fp16"), bundle)
    assert not bundle_current(model, None, ExportConfig(), bundle)  # another quant input (none)
    recipe = recipe_from_dict(TINY_RECIPE)
    assert quant_state_current(model, recipe, "builtin:calib", None, quant)
    assert not quant_state_current(model, recipe, "builtin:calib:3", None, quant)
    assert not quant_state_current(model, recipe_from_dict({**TINY_RECIPE, "weights": {"group_size": 32}}),
                                   "builtin:calib", None, quant)
    (bundle / "onnx" / "notes.txt").write_text("added")
    assert not bundle_current(model, quant, ExportConfig(), bundle)


RUN_CONFIG = """model: {model}
quantize: {{method: rtn, settings: [w8a8], recipe: {{calibration: {{samples: 2, batch_size: 2}}}}}}
build: {{engines: "off"}}
validate: {{calib_samples: 2, batch_size: 2, eval_samples: 2, threads: 1, task: false, runners: [faithful],
           layer_errors: false}}
"""


def start_run(config, out, log):
    # One torch thread: the search and export are bit-reproducible only at a fixed thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "qvlm_export", "run", "--config", str(config), "--out", str(out),
                                 "--no-progress"], stdout=f, stderr=subprocess.STDOUT, env=env)


def kill_when(proc, ready) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 20 ms); fail if it exits first."""
    deadline = time.monotonic() + 300  # a hang guard only; nothing here is timed
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill point"


@pytest.mark.slow
def test_runs_killed_in_each_stage_resume_to_byte_identical_artifacts(tmp_path):
    from qvlm_export.load.tiny import save_tiny_random_model

    model = save_tiny_random_model(tmp_path / "model", vision_layers=1, text_layers=1, hidden=32, heads=2)
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(model=model))
    # The uninterrupted reference runs beside the interrupted chain (one core each on CI).
    reference = start_run(config, tmp_path / "ref", tmp_path / "ref.log")
    out, logs = tmp_path / "run", [tmp_path / f"run{i}.log" for i in range(4)]

    kill_when(start_run(config, out, logs[0]), lambda: "quantize rtn w8a8 ..." in logs[0].read_text())
    assert not (out / "quant" / "w8a8" / "manifest.json").exists()
    # mid-export: the FP bundle's temporary directory already holds the vision graph
    kill_when(start_run(config, out, logs[1]), lambda: any(out.glob("bundles/.fp.*.partial/onnx/vision_encoder.onnx")))
    assert (out / "quant" / "w8a8" / "manifest.json").is_file() and not (out / "bundles" / "fp").exists()
    kill_when(start_run(config, out, logs[2]), lambda: any(out.glob("bundles/.w8a8.*.partial")))
    last = start_run(config, out, logs[3])
    assert last.wait(timeout=600) == 0, logs[3].read_text()[-3000:]
    assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    text = [log.read_text() for log in logs]
    assert "quantize rtn w8a8: up to date (skipped)" in text[2] and "removed" in text[2]  # the fp partial
    for stage in ("quantize rtn w8a8", "export fp"):
        assert f"{stage}: up to date (skipped)" in text[3], stage
    assert "export w8a8: done in" in text[3]
    for artifact in ("quant/w8a8", "bundles/fp", "bundles/w8a8"):
        assert hash_tree(out / artifact) == hash_tree(tmp_path / "ref" / artifact), artifact
    assert len(hash_tree(out / "bundles" / "w8a8")) >= 4  # three graphs + bundle.json (+ processor files)
    assert not [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert main(["verify", str(out)]) == 0
