"""The HTML report renders in real headless Chromium: non-blank screenshot, every plot decoded, no console errors.

Needs Debian's chromium at /usr/bin/chromium (``tools/ensure_chromium.sh`` installs it).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _onnx_models import activation_scales, feeds, fp_mlp, mlp_weights, w8a8_mlp  # noqa: E402

from qvlm_export.data.synthetic import make_split  # noqa: E402
from qvlm_export.evaluate.accuracy import score  # noqa: E402
from qvlm_export.validate.parity import compare_graph, run_reference  # noqa: E402
from qvlm_export.validate.report import CandidateResult, ValidationReport  # noqa: E402
from qvlm_export.validate.report_files import write_report_files  # noqa: E402
from qvlm_export.validate.task import task_parity  # noqa: E402
from qvlm_export.validate.thresholds import load_thresholds, thresholds_from_dict  # noqa: E402

CHROMIUM = os.environ.get("QVLM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _runner(model, faithful: bool):
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if faithful:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return OnnxrtRunner(lambda: ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    w1, w2 = mlp_weights()
    data = feeds(2)
    xs, hs = activation_scales(w1, data)
    out = tmp_path_factory.mktemp("report")
    thresholds = thresholds_from_dict({"precisions": {"w8a8": {
        "faithful": {"default": {"cosine": 0.999, "sqnr_db": 30}}, "drift": {"default": {"sqnr_db": 15}},
        "task": {"max_accuracy_drop": 0.05, "min_identical_answers": 0.8}}}})
    reference = run_reference("mlp", _runner(fp_mlp(w1, w2), True), data, out / "polygraphy")
    graph = compare_graph("mlp", reference, {"faithful": _runner(w8a8_mlp(w1, w2, xs, hs, (2, 3, 4.0)), True),
                                             "fast": _runner(w8a8_mlp(w1, w2, xs, hs, (2, 3, 4.0)), False)},
                          data, "w8a8", thresholds)
    samples = make_split("eval")[:40]
    ref = score(samples, [s.answer for s in samples])
    wrong = [s.answer if i % 5 else "no" for i, s in enumerate(samples)]  # every 5th answer wrong
    task = task_parity("faithful", ref, score(samples, wrong), thresholds.task_bounds("w8a8"))
    names = [f"model.language_model.layers.{i // 7}.proj{i % 7}" for i in range(28)]
    layers = {"entropy": {"names": names, "values": [3 + np.sin(i / 3) for i in range(28)],
                          "blocks": [[0, 1, 2], [3, 4], [5], *[[i] for i in range(6, 28)]],
                          "dependency": [0.5 + 0.3 * np.cos(i) for i in range(27)], "p": 0.35},
              "error": {"names": [f"decoder.layers.{i}" for i in range(8)] + ["logits"],
                        "sqnr_db": [40.0 - 2 * i for i in range(8)] + [float("inf")]}}
    candidate = CandidateResult(name="w8a8", bundle="bundles/w8a8", setting="w8a8", deployable=True,
                                runs_on="TensorRT INT8 QDQ; ONNX Runtime QDQ", method="qvlm", graphs=[graph],
                                task=[task], skipped=["tensorrt: skipped: tensorrt is not installed"], layers=layers,
                                bundle_bytes=250_000)
    report = ValidationReport(reference={"path": "bundles/fp", "kind": "bundle", "bundle_bytes": 1_000_000},
                              candidates=[candidate],
                              thresholds=thresholds, config={"calib_samples": 2}, timings_s={"validate": 1.0})
    write_report_files(report, out)
    return out


def test_report_json_is_strict_and_carries_numbers_beside_thresholds(report_dir):
    data = json.loads((report_dir / "report.json").read_text())  # strict: no NaN/Infinity tokens
    assert data["passed"] is False
    assert any(f.startswith("w8a8 [w8a8]: graph 'mlp' output 'y' (faithful vs reference): sqnr_db = ")
               for f in data["failures"]), data["failures"]
    assert any("identical_answers = 0.8" in f for f in data["failures"]) is False  # 0.8 >= 0.8 holds
    task = data["candidates"][0]["task"][0]
    assert task["identical_answers"] == pytest.approx(0.8) and task["delta"]["overall"] == pytest.approx(-0.2)
    html = (report_dir / "report.html").read_text()
    assert "&gt;= 30" in html and "FAILED" in html and "W8A8" in html
    assert "tensorrt: skipped: tensorrt is not installed" in html
    assert html.count("data:image/png;base64,") == 5  # parity, accuracy, entropy, dependency, per-layer error


def test_report_opens_with_one_summary_row_per_candidate(report_dir):
    from qvlm_export.evaluate.intervals import wilson_interval

    html = (report_dir / "report.html").read_text()
    summary, details = html.index('<table class="summary">'), html.index("<details")
    assert summary < details  # the summary first, every detail below it and collapsible
    row = html[summary:html.index("</table>", summary)]
    low, high = wilson_interval(32, 40)  # 40 questions, every 5th wrong
    assert (round(low, 3), round(high, 3)) == (0.652, 0.895)
    assert f"0.800 [{low:.3f}, {high:.3f}] (n=40)" in row and "-0.200" in row
    assert "0.25 MB (0.25x FP)" in row
    assert re.search(r"mlp/y sqnr_db [0-9.]+ \(past &gt;= 30, (faithful|fast)\)", row), row
    sentence = html[html.index('<p class="lead">'):]
    assert sentence.startswith('<p class="lead">w8a8 fails quality (graph &#x27;mlp&#x27; output &#x27;y&#x27;')
    assert html.count("tensorrt: skipped: tensorrt is not installed") == 2  # once on top, once in the details


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: run tools/ensure_chromium.sh")
def test_report_renders_in_headless_chromium(report_dir):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"requestfailed: {r.url}"))
            page.goto((report_dir / "report.html").resolve().as_uri(), wait_until="load")
            decoded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 100)")
            title = page.title()
            summary_bottom = page.evaluate("document.querySelector('table.summary').getBoundingClientRect().bottom")
            sentence_bottom = page.evaluate("document.querySelector('p.lead').getBoundingClientRect().bottom")
            first_screen = page.screenshot()
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    (report_dir / "first_screen.png").write_bytes(first_screen)
    assert problems == []
    assert title == "qvlm-export validation report"
    assert summary_bottom < sentence_bottom < 900  # the summary and what failed are on the first screen
    assert decoded == [True] * 5
    image = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert image.shape[0] > 900 and image.shape[1] == 1280  # full page: taller than the viewport
    assert image.std() > 20  # not a blank page
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # text, tables and plots, not one flat colour


def test_packaged_thresholds_render(tmp_path):
    # The packaged config serialises into the report (it is printed beside every number).
    t = load_thresholds()
    assert t.to_json()["precisions"]["w8a8"]["faithful"]["default"]["sqnr_db"] > 0


def test_summary_of_a_passing_candidate_names_its_least_sqnr_room_against_fp():
    from qvlm_export.validate.summary import worst_check

    def output(graph, comparison, cosine, sqnr, sqnr_bound):
        return {"output": "y", "comparison": comparison, "checks": [
            {"stat": "cosine", "value": cosine, "op": ">=", "bound": 0.998, "passed": True},
            {"stat": "sqnr_db", "value": sqnr, "op": ">=", "bound": sqnr_bound, "passed": True},
            {"stat": "nonfinite", "value": 0, "op": "<=", "bound": 0, "passed": True}]}

    candidate = {"graphs": [{"graph": "vision", "outputs": [output("vision", "faithful", 0.9999, 20.2, 15)]},
                            {"graph": "decoder", "outputs": [output("decoder", "faithful", 0.99999, 31.0, 12),
                                                             output("decoder", "drift", 1.0, 60.0, 15)]}]}
    worst = worst_check(candidate)
    assert (worst.graph, worst.stat, worst.value, worst.bound) == ("vision", "sqnr_db", 20.2, 15)  # 5.2 dB of room
    candidate["graphs"][1]["outputs"][1]["checks"][0].update(value=0.99, passed=False)
    assert (worst_check(candidate).comparison, worst_check(candidate).stat) == ("drift", "cosine")  # a failure first
