"""validate catches broken graphs exactly, on any model: fault injection, fidelity, derived bounds.

Bundles are the embedded model's RTN bundles shared with the export tests (``_export_helpers``),
so this file adds validate runs, not exports (except W4A8 / W3A16, exported once here).
"""

from __future__ import annotations

import json

import _export_helpers as H
import numpy as np
import pytest

from qvlm_export.validate.api import CandidateSpec, validate
from qvlm_export.validate.config import ValidateConfig
from qvlm_export.validate.faults import FAULTS_BY_NAME, inject
from qvlm_export.validate.fidelity import fidelity_bound, valid_positions

# Graph parity only: the faults below are all caught without the task eval (it has its own tests).
GRAPHS_ONLY = ValidateConfig(calib_samples=4, task=False, layer_errors=False, threads=1)


def _candidates(report) -> dict[str, dict]:
    return {c["name"]: c for c in report.to_json()["candidates"]}


def _fidelity(candidate: dict) -> dict[str, float]:
    return {f"{o['graph']}/{o['output']}": o["stats"]["sqnr_db"] for g in candidate["graphs"] for o in g["outputs"]
            if o["comparison"] == "fidelity"}


@pytest.fixture(scope="module")
def w8a8_faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-w8a8")
    good = H.bundle("w8a8")
    specs = [CandidateSpec(bundle=good, name="correct")]
    for name in ("channel-scale-x4", "activation-scale-x2", "present-kv-swapped", "image-token-id", "rope-theta"):
        inject(good, name, root / name)
        specs.append(CandidateSpec(bundle=root / name, name=name))
    return validate(H.bundle("fp"), specs, root / "report", GRAPHS_ONLY, progress=False)


def test_correct_w8a8_bundle_matches_its_simulated_model(w8a8_faults):
    correct = _candidates(w8a8_faults)["correct"]
    assert correct["verdicts"] == {"export": True, "quality": True, "kernels": True}
    checks = correct["export_checks"]
    assert {k: checks[k] for k in ("metadata", "weights", "fidelity", "layers")} == {
        "metadata": [], "weights": [], "fidelity": None, "layers": []}
    # Layer by layer (each graph layer fed its simulated layer's input): float rounding only.
    layers = {(x["graph"], x["layer"]) for x in checks["fidelity_layers"]}
    assert {("vision", "0"), ("decoder", "0"), ("decoder", "3"), ("decoder", "tail")} <= layers
    assert min(float(x["stats"]["sqnr_db"]) for x in checks["fidelity_layers"]) >= 70
    fidelity = _fidelity(correct)
    assert set(fidelity) >= {"vision/image_features", "embed/inputs_embeds", "decoder/logits", "decoder/present.3.value"}
    # Float rounding plus the odd int8 rounding-boundary flip: above the 40 dB cap, whatever the quantization.
    assert min(float(v) for v in fidelity.values()) >= 40


@pytest.mark.parametrize(("fault", "names"), [
    ("channel-scale-x4", "weight scale differs from the quant state (1 of"),  # one channel: exact check only
    ("activation-scale-x2", "activation scale differs"),
    ("present-kv-swapped", "output 'present.0.key' (fidelity vs simulated)"),
    ("image-token-id", "bundle.json model.image_token_id"),
    ("rope-theta", "(fidelity vs simulated)"),
])
def test_each_fault_fails_export_and_names_what_broke(w8a8_faults, fault, names):
    candidate = _candidates(w8a8_faults)[fault]
    assert candidate["passed"] is False and candidate["verdicts"]["export"] is False
    lines = [f for f in w8a8_faults.failures() if f.startswith(f"{fault} [w8a8]")]
    assert any(names in line for line in lines), lines[:4]


def test_activation_scale_fault_is_found_in_its_layer(w8a8_faults):
    checks = _candidates(w8a8_faults)["activation-scale-x2"]["export_checks"]
    failed = [x for x in checks["fidelity_layers"] if not x["passed"]]
    assert failed and all(float(x["stats"]["sqnr_db"]) < 55 for x in failed)
    assert len(checks["layers"]) == len(failed) and "against its simulated layer on the same input" in checks["layers"][0]


def test_single_channel_fault_is_below_what_sqnr_could_see(w8a8_faults):
    """Why the exact weight check exists: one channel x4 stays within quantization-sized error at the output."""
    fidelity = _fidelity(_candidates(w8a8_faults)["channel-scale-x4"])
    assert float(fidelity["vision/image_features"]) < 60  # visible against the simulated model ...
    quality = [o for g in _candidates(w8a8_faults)["channel-scale-x4"]["graphs"] for o in g["outputs"]
               if o["comparison"] == "faithful" and o["graph"] == "vision"]
    assert all(o["passed"] for o in quality)  # ... but inside the FP quality bounds: only 'export' catches it


def test_w4a16_faults_in_codes_and_zero_points(tmp_path):
    good = H.bundle("w4a16")
    specs = [CandidateSpec(bundle=good, name="correct")]
    for name in ("block-codes-negated", "nonzero-zero-point", "embedding-x2"):
        inject(good, name, tmp_path / name)
        specs.append(CandidateSpec(bundle=tmp_path / name, name=name))
    report = validate(H.bundle("fp"), specs, tmp_path / "report", GRAPHS_ONLY, progress=False)
    verdicts = {name: c["verdicts"]["export"] for name, c in _candidates(report).items()}
    assert verdicts == {"correct": True, "block-codes-negated": False, "nonzero-zero-point": False,
                        "embedding-x2": False}
    lines = report.failures()
    assert any(f.startswith("block-codes-negated") and "weight codes differs" in f for f in lines)
    assert any(f.startswith("embedding-x2") and "graph 'embed'" in f for f in lines)


@pytest.mark.parametrize("setting", ["w4a8", "w3a16"])
def test_ort_only_settings_export_and_validate_as_real_bundles(setting, tmp_path):
    """W4A8 and W3A16: whole bundles of the embedded model, judged on fidelity and the packaged bounds."""
    report = validate(H.bundle("fp"), [CandidateSpec(bundle=H.bundle(setting))], tmp_path / "r",
                      GRAPHS_ONLY, progress=False)
    candidate = report.to_json()["candidates"][0]
    assert candidate["setting"] == setting and candidate["export_checks"]["weights"] == []
    assert report.passed, report.failures()
    assert min(float(v) for v in _fidelity(candidate).values()) >= 40


def test_fidelity_bound_follows_the_arithmetic():
    assert fidelity_bound("fp32", False, 12.0) == 60  # weight-only: nothing can flip, whatever the quantization
    assert fidelity_bound("fp16", False, 12.0) == 25
    assert fidelity_bound("fp32", True, 50.0) == 40  # fine quantization: capped
    assert fidelity_bound("fp32", True, 27.5) == 33.5  # 6 dB under the output's quantization error
    assert fidelity_bound("fp16", True, 27.5) == 25


def test_valid_positions_drop_left_padding():
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    logits = np.arange(2 * 3 * 2).reshape(2, 3, 2)
    assert valid_positions("decoder", "logits", {"attention_mask": mask}, logits).tolist() == [2, 3, 4, 5, *range(6, 12)]
    present = np.arange(2 * 1 * 3 * 1).reshape(2, 1, 3, 1)
    assert valid_positions("decoder", "present.0.key", {"attention_mask": mask}, present).tolist() == [1, 2, 3, 4, 5]


def test_fault_injection_rehashes_so_only_validation_can_tell(tmp_path):
    from qvlm_export.manifest import hash_tree
    from qvlm_export.runtime.bundle import read_bundle

    broken = inject(H.bundle("w8a8"), FAULTS_BY_NAME["weight-scale-x4"], tmp_path / "b")
    assert broken.startswith("decoder: model.language_model.layers.")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["outputs"] == hash_tree(tmp_path / "b")
    info = read_bundle(tmp_path / "b")
    from qvlm_export.manifest import sha256_file

    assert info.graphs["decoder"].sha256 == sha256_file(H.graph_file(tmp_path / "b", "decoder"))
    assert info.graphs["decoder"].sha256 != read_bundle(H.bundle("w8a8")).graphs["decoder"].sha256


def test_validate_engines_with_ort_standing_in_for_tensorrt(tiny_bundle, tiny_w8a8_thresholds, tmp_path, monkeypatch):
    """validate --engines end to end without a GPU: the engine set's TensorRT deserialisation is replaced
    by ONNX Runtime sessions of the fp16 bundle the engines were built from; everything else is real
    (engine manifest, phase choice, the fp16 -> fp32 cast adapter, task parity over the engine runner)."""
    from test_build_engines import H100, ort_backed_engine_set

    from qvlm_export.engine import trt_runner
    from qvlm_export.engine.builder import build_engines
    from qvlm_export.engine.profiles import BuildProfile

    fp16 = tiny_bundle("w8a8", "fp16")
    engines = build_engines(fp16, BuildProfile(name="t", max_batch=4, max_prompt=128, max_context=160),
                            tmp_path / "engines", compiler=lambda spec, profile, cache: b"", environment=H100)
    standin = type(ort_backed_engine_set(engines, fp16))  # made before the patch: it subclasses the real class
    monkeypatch.setattr(trt_runner, "TrtEngineSet", lambda engine_dir, environment=None:
                        standin(engine_dir, environment=H100))
    config = ValidateConfig(calib_samples=4, eval_samples=8, layer_errors=False, threads=1,
                            thresholds=str(tiny_w8a8_thresholds))
    report = validate(tiny_bundle("fp"), [CandidateSpec(bundle=tiny_bundle("w8a8"), engines=engines)],
                      tmp_path / "report", config, progress=False)
    candidate = report.to_json()["candidates"][0]
    trt = {(o["graph"], o["output"]): o for g in candidate["graphs"] for o in g["outputs"]
           if o["comparison"] == "tensorrt"}
    faithful = {(o["graph"], o["output"]): o for g in candidate["graphs"] for o in g["outputs"]
                if o["comparison"] == "faithful"}
    assert set(trt) == set(faithful) and ("decoder", "logits") in trt
    # fp16 engines of the same QDQ graph: the quantization error plus fp16 rounding, never better than
    # exact fp32 QDQ by more than rounding noise and within the thresholds' bounds.
    for key, o in trt.items():
        assert o["passed"], (key, o["stats"])
    assert trt[("decoder", "logits")]["stats"]["sqnr_db"] < faithful[("decoder", "logits")]["stats"]["sqnr_db"] + 3
    task = {t["runner"]: t for t in candidate["task"]}
    assert set(task) == {"faithful", "fast", "tensorrt"} and task["tensorrt"]["n"] == 8
