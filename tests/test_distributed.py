"""Data-parallel calibration under ``torchrun --nproc-per-node 2`` (gloo, CPU) equals one process.

The ranks split the calibration batches and reduce every statistic, loss and (Q-VLM) gradient
step in the single process's batch order (quant/distributed.py), so the states are byte-identical
to one process for RTN W8A8, SmoothQuant, GPTQ, AWQ and Q-VLM (the issue asked for bytes on the
first three and a tolerance on the last two; they meet bytes too). A distributed run killed after
a block resumes from rank 0's checkpoints to the same bytes; a rank failing mid-walk ends every
rank in one line, not a hang.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlm_export.quant import distributed

ROOT = Path(__file__).resolve().parents[1]
# 8 samples in batches of 2: 4 batches, 2 per rank; Q-VLM with a 4-step search per block
RECIPES = {
    "rtn": "method: rtn\nsetting: w8a8\n",
    "smoothquant": "method: smoothquant\nsetting: w8a8\n",
    "gptq": "method: gptq\nsetting: w4a16\n",
    "awq": "method: awq\nsetting: w4a16\nmethod_args: {grid: 4, clip_grid: 4}\n",
    "qvlm": "method: qvlm\nsetting: w8a8\nmethod_args: {iterations: 4, holdout: 0.25, start: [rtn, gptq]}\n",
}
CALIB = "calibration: {samples: 8, seed: 0, batch_size: 2}\n"
DRIVER = """
import sys
from qvlm_export.cli import main
tmp, methods = sys.argv[1], sys.argv[2].split(",")
if len(sys.argv) > 4 and __import__("os").environ["RANK"] == "1":  # rank 1 fails in its third GPTQ rule
    from qvlm_export.errors import QvlmError
    from qvlm_export.search import gptq
    calls, rule = [], gptq.GPTQ.rule
    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise QvlmError("disk full on rank 1; free space")
        return rule(self, *args)
    gptq.GPTQ.rule = failing
for m in methods:
    extra = ["--checkpoint-dir", f"{tmp}/ckpt"] if m == "qvlm" else []
    code = main(["quantize", "--recipe", f"{tmp}/{m}.yaml", "--out", f"{tmp}/{sys.argv[3]}/{m}", "--device", "cpu",
                 "--calib", "builtin:calib", "--no-progress", *extra])
    if code:
        sys.exit(code)
"""


def _torchrun(tmp: Path, methods: list[str], out: str, timeout: int = 300, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "QVLM_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp / "driver.py"), str(tmp), ",".join(methods), out, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The five states from one process (here) and from two torchrun ranks."""
    from qvlm_export.search.api import quantize

    tmp = tmp_path_factory.mktemp("dist")
    for name, text in RECIPES.items():
        (tmp / f"{name}.yaml").write_text(text + CALIB)
    (tmp / "driver.py").write_text(DRIVER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions depend on it; torchrun's ranks run with one thread
    try:
        for name in RECIPES:
            quantize(recipe=str(tmp / f"{name}.yaml"), calib="builtin:calib", out=tmp / "one" / name, device="cpu",
                     progress=False)
    finally:
        torch.set_num_threads(threads)
    done = _torchrun(tmp, list(RECIPES), "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done


@pytest.mark.parametrize("method", list(RECIPES))
def test_two_ranks_write_the_single_process_state_byte_for_byte(runs, method):
    tmp, _ = runs
    one, two = tmp / "one" / method, tmp / "two" / method
    assert (one / "quant.safetensors").read_bytes() == (two / "quant.safetensors").read_bytes()
    if method != "qvlm":  # Q-VLM's state.json also records its wall times
        assert (one / "state.json").read_bytes() == (two / "state.json").read_bytes()
    import json

    assert json.loads((two / "manifest.json").read_text())["ranks"] == 2
    assert json.loads((one / "manifest.json").read_text())["ranks"] == 1


def test_rank_zero_alone_reports(runs):
    _, done = runs
    # one 'wrote' line per method, from rank 0 only; the other rank prints nothing of its own
    assert done.stdout.count("wrote ") == len(RECIPES), done.stdout


def test_killed_distributed_run_resumes_from_the_block_it_stopped_at(runs):
    tmp, _ = runs
    (fingerprint,) = [p for p in (tmp / "ckpt").iterdir() if p.is_dir()]
    blocks = sorted(p for p in fingerprint.iterdir() if p.name.startswith("block-"))
    assert len(blocks) >= 4
    kept = {p.name: p.stat().st_ino for p in blocks[:3]}
    for p in blocks[3:]:  # a run killed during block 3 (checkpoints are written atomically per block)
        shutil.rmtree(p)
    done = _torchrun(tmp, ["qvlm"], "resumed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ((tmp / "resumed" / "qvlm" / "quant.safetensors").read_bytes()
            == (tmp / "one" / "qvlm" / "quant.safetensors").read_bytes())
    after = sorted(p for p in fingerprint.iterdir() if p.name.startswith("block-"))
    assert [p.name for p in after] == [p.name for p in blocks]  # the rest was searched and saved again
    assert {p.name: p.stat().st_ino for p in after[:3]} == kept  # the first three were replayed, not redone


def test_batches_are_split_in_contiguous_whole_batches(monkeypatch):
    monkeypatch.setitem(distributed._state, "active", True)
    monkeypatch.setitem(distributed._state, "world", 3)
    shards = []
    for r in range(3):
        monkeypatch.setitem(distributed._state, "rank", r)
        shards.append(distributed.shard(7))
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert [distributed.owner(b, 7) for b in range(7)] == [0, 0, 1, 1, 2, 2, 2]
    with pytest.raises(distributed.QvlmError, match="2 batches for 3 ranks"):
        distributed.shard(2)


def test_methods_without_reductions_are_refused_under_torchrun(monkeypatch, tmp_path):
    from qvlm_export.search.api import quantize

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(distributed.QvlmError, match="method 'qig' has no data-parallel calibration yet"):
        quantize(recipe="qig-w4a16", out=tmp_path / "q", device="cpu", progress=False)
    assert not distributed.active() and not (tmp_path / "q").exists()


def test_a_rank_failing_mid_walk_ends_every_rank_in_one_line(runs):
    """Rank 1 fails between two collectives; rank 0, waiting in the next one, stops in one line too."""
    tmp, _ = runs
    done = _torchrun(tmp, ["gptq"], "failed", 240, "fail")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "error: disk full on rank 1; free space" in errors, done.stderr[-3000:]
    assert len(errors) == 2, errors  # rank 0's own line: a stopped peer, or torchrun's SIGTERM
    assert not (tmp / "failed").exists()
