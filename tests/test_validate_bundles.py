"""``qvlm-export validate`` on real exported bundles of a tiny random model (shared ``tiny_bundle`` fixture).

Exit 0 for a correct W8A8 bundle, exit 1 naming the graph for a bundle with one weight
scale multiplied by 4, exit 2 for bad input; fast ORT kernels reported apart from faithful QDQ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from _export_helpers import graph_file  # noqa: E402
from onnx import numpy_helper

from qvlm_export.cli import main
from qvlm_export.runtime.bundle import refresh_bundle

BROKEN_SCALE = "model.language_model.layers.0.mlp.down_proj.weight_scale"
ARGS = ["--calib-samples", "4", "--eval-samples", "16", "--threads", "1"]


def _validate(reference: Path, candidate: Path, out: Path, thresholds: Path, *extra: str) -> int:
    return main(["validate", "--reference", str(reference), "--candidate", str(candidate), "--out", str(out),
                 "--thresholds", str(thresholds), *ARGS, *extra])


@pytest.fixture(scope="module")
def bundles(tiny_bundle, tmp_path_factory, tiny_w8a8_thresholds):
    root = tmp_path_factory.mktemp("validate")
    fp, w8a8 = Path(tiny_bundle("fp")), Path(tiny_bundle("w8a8"))
    broken = root / "broken"
    shutil.copytree(w8a8, broken)
    decoder = onnx.load(str(graph_file(broken, "decoder")))
    hits = [t for t in decoder.graph.initializer if t.name == BROKEN_SCALE]
    assert len(hits) == 1
    hits[0].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(hits[0]) * 4, BROKEN_SCALE))
    onnx.save(decoder, str(graph_file(broken, "decoder")))
    refresh_bundle(broken)  # a deliberate edit: re-hash it, as if the exporter itself had written the bad scale
    return {"fp": fp, "w8a8": w8a8, "quant": w8a8.parent / "quant-w8a8", "broken": broken,
            "thresholds": tiny_w8a8_thresholds, "root": root}


@pytest.fixture(scope="module")
def good_report(bundles):
    out = bundles["root"] / "good"
    code = _validate(bundles["fp"], bundles["w8a8"], out, bundles["thresholds"], "--quant", str(bundles["quant"]))
    return code, out, json.loads((out / "report.json").read_text())


def test_correct_candidate_exits_0_with_a_complete_artifact(good_report):
    code, out, report = good_report
    assert code == 0, report["failures"]
    assert report["passed"] is True and report["failures"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "validation-report" and manifest["passed"] is True
    assert {"report.json", "report.html", "polygraphy/decoder.reference.json",
            "polygraphy/decoder.inputs.json"} <= set(manifest["outputs"])
    assert set(manifest["inputs"]) == {"reference", "candidate:bundle-w8a8-fp32"}
    graphs = {g["graph"]: g for g in report["candidates"][0]["graphs"]}
    assert graphs["decoder"]["iterations"] == 2  # one prefill + one decode step feed for one batch of 4
    logits = next(o for o in graphs["decoder"]["outputs"] if o["output"] == "logits" and o["comparison"] == "faithful")
    # Quantization error of a correct W8A8 bundle: above the 25 dB bound it is judged on (30.1 dB measured on
    # the 1+1-layer random model; faithful QDQ runs without integer kernels, so no CPU moves this).
    assert logits["stats"]["sqnr_db"] > 25 and logits["stats"]["cosine"] > 0.999
    assert {c["stat"]: c["bound"] for c in logits["checks"]} == {"cosine": 0.999, "sqnr_db": 25, "nonfinite": 0}
    embed = next(o for o in graphs["embed"]["outputs"] if o["comparison"] == "faithful")
    assert embed["stats"]["max_abs"] == 0.0  # the embedding table is not quantized: bit-identical
    layers = report["candidates"][0]["layers"]["error"]
    assert layers["names"] == ["vision.layers.0", "decoder.layers.0", "logits"]
    assert all(25 < v < 60 for v in layers["sqnr_db"])


def test_fast_kernels_reported_separately_from_faithful(good_report):
    _, _, report = good_report
    candidate = report["candidates"][0]
    decoder = next(g for g in candidate["graphs"] if g["graph"] == "decoder")
    logits = {o["comparison"]: o for o in decoder["outputs"] if o["output"] == "logits"}
    assert set(logits) == {"fidelity", "faithful", "fast", "drift"}
    assert logits["drift"]["against"] == "faithful" and logits["fidelity"]["against"] == "simulated"
    # How far the fused kernels drift depends on the CPU (exact with AVX512-VNNI/AMX, up to int16 saturation
    # without); what holds everywhere is the triangle inequality between the three numbers the report keeps
    # apart: |fast - ref| <= |faithful - ref| + |fast - faithful| (per iteration, the worst is kept).
    fast, faithful, drift = (logits[k]["per_iteration"] for k in ("fast", "faithful", "drift"))
    for f, q, d in zip(fast, faithful, drift, strict=True):
        assert f["max_abs"] <= q["max_abs"] + d["max_abs"] + 1e-5 * max(1.0, q["max_abs"])
    assert set(decoder["runtime_ms"]) == {"reference", "faithful", "fast"}
    task = {t["runner"]: t for t in candidate["task"]}
    assert set(task) == {"faithful", "fast"} and task["faithful"]["n"] == 16
    assert task["faithful"]["identical_answers"] >= task["fast"]["identical_answers"]


def test_broken_weight_scale_exits_1_naming_the_graph(bundles, good_report, capsys):
    out = bundles["root"] / "broken-report"
    code = _validate(bundles["fp"], bundles["broken"], out, bundles["thresholds"],
                     "--reuse-reference", str(good_report[1] / "polygraphy"))
    err = capsys.readouterr().err
    assert code == 1
    # The export fault is named first (the weight that differs from the quant state), then what it costs.
    assert "parity failed: broken [w8a8]: export: layer 'model.language_model.layers." in err
    assert "weight scale differs from the quant state" in err
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert report["candidates"][0]["verdicts"] == {"export": False, "quality": False, "kernels": True}
    failing = [f for f in report["failures"] if "vs reference" in f]
    assert failing and all("graph 'decoder'" in f for f in failing)  # vision and embed are untouched
    logits = next(o for g in report["candidates"][0]["graphs"] for o in g["outputs"]
                  if o["graph"] == "decoder" and o["output"] == "logits" and o["comparison"] == "faithful")
    assert logits["stats"]["sqnr_db"] < 15
    # The reused reference run is copied into this report, byte for byte.
    for name in ("decoder.reference.json", "vision.inputs.json"):
        assert (out / "polygraphy" / name).read_bytes() == (good_report[1] / "polygraphy" / name).read_bytes()


def test_bad_input_exits_2_with_one_line(bundles, good_report, capsys):
    root, t = bundles["root"], bundles["thresholds"]
    cases = [
        ((bundles["w8a8"], bundles["w8a8"], root / "r1", t), "is a quantized (w8a8) bundle"),
        ((bundles["fp"], root / "missing", root / "r2", t), "does not exist; pass --candidate"),
        ((bundles["fp"], bundles["w8a8"], root / "r3", t, "--runners", "faithful,turbo"), "runners must be"),
        ((bundles["fp"], bundles["w8a8"], root / "r4", t, "--quant", str(bundles["fp"])), "hash differs"),
        ((bundles["fp"], bundles["w8a8"], root / "r5", t, "--calib-samples", "8",
          "--reuse-reference", str(good_report[1] / "polygraphy")), "different feed 'calib_samples'"),
    ]
    for args, message in cases:  # each message checked against its own case's stderr
        capsys.readouterr()
        code = _validate(*args)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (message, err)
    assert all(not (root / f"r{i}").exists() for i in range(1, 6))  # no half-written report
