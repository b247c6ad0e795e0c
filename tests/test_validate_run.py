"""``qvlm-export run`` end to end on a tiny random model: every stage's artifact, the summary table, the report.

Marked slow (two ONNX exports: ~1 min on 2 cores). The README job itself (embedded model,
Q-VLM W8A8 + W4A16) is timed by hand; see the validate engineer's note.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvlm_export.cli import main
from qvlm_export.manifest import sha256_file


@pytest.mark.slow
def test_run_writes_every_stage_and_ends_with_table_and_report_path(tmp_path, capsys, tiny_w8a8_thresholds):
    from qvlm_export.load.tiny import save_tiny_random_model

    model = save_tiny_random_model(tmp_path / "model", vision_layers=1, text_layers=1, hidden=32, heads=2)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model}\nquantize: {{method: rtn, recipe: {{calibration: {{samples: 4, batch_size: 4}}}}}}\n"
                      "validate: {calib_samples: 4, eval_samples: 8, threads: 1}\n")
    out = tmp_path / "run"
    code = main(["run", "--config", str(config), "--settings", "w8a8", "--out", str(out), "--no-progress",
                 "--set", f"validate.thresholds={tiny_w8a8_thresholds}"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    for artifact in ("quant/w8a8", "bundles/fp", "bundles/w8a8", "report"):
        assert (out / artifact / "manifest.json").is_file(), artifact
    assert json.loads((out / "check-trt" / "w8a8.json").read_text())["ok"] is True
    run = json.loads((out / "run.json").read_text())
    assert run["passed"] is True and run["check_trt"] == {"w8a8": True}
    assert {"quantize rtn w8a8", "export fp", "export w8a8", "check-trt w8a8", "validate", "total"} <= set(run["seconds"])
    assert run["skipped"] and run["skipped"][0].startswith("tensorrt engines: skipped: ")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["quantize"]["settings"] == ["w8a8"]
    assert manifest["outputs"]["report/manifest.json"] == sha256_file(out / "report" / "manifest.json")
    report = json.loads((out / "report" / "report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["w8a8"] and report["passed"] is True
    assert report["candidates"][0]["skipped"][0].startswith("tensorrt engines: skipped: ")
    # The terminal ends with the summary table and the report path.
    assert "qvlm-export validation" in stdout and "skipped" in stdout
    reason = run["skipped"][0].split("skipped: ", 1)[1]
    # in the stage table and in the headline, which names what the verdict covers; not again per candidate
    assert stdout.count(reason[:40]) == 2 and f"PASSED on ONNX Runtime (faithful, fast); TensorRT not run: {reason}" \
        in " ".join(stdout.split())
    assert report["headline"] == f"PASSED on ONNX Runtime (faithful, fast); TensorRT not run: {reason}"
    assert "Linears quantized" in stdout and "x FP)" in stdout and "acc " in stdout  # what each stage produced
    assert stdout.rstrip().splitlines()[-1].startswith(f"report: {Path(out) / 'report' / 'report.html'}")
