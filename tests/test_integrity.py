"""Every load of a quant state, bundle or engine directory checks its files against manifest.json.

Artifacts come from the session-cached ``tiny_bundle`` fixture (its RTN quant state sits beside
the bundle as ``quant-<setting>``) and are copied before any byte is changed.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from qvlm_export.cli import main
from qvlm_export.errors import ArtifactModified, QvlmError
from qvlm_export.manifest import (
    hash_tree,
    read_manifest,
    refresh_manifest_outputs,
    sha256_file,
    verification,
    verification_enabled,
)
from qvlm_export.quant.state import load_state
from qvlm_export.runtime.bundle import read_bundle, refresh_bundle


@pytest.fixture()
def artifacts(tiny_bundle, tmp_path):
    """Fresh copies of the tiny W8A8 bundle and its quant state."""
    bundle = tiny_bundle("w8a8")
    quant = bundle.parent / "quant-w8a8"
    return shutil.copytree(bundle, tmp_path / "B"), shutil.copytree(quant, tmp_path / "Q")


def flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bundle_load_names_the_modified_graph_and_no_verify_loads(artifacts):
    bundle, _ = artifacts
    assert read_bundle(bundle).graphs["decoder"].file == "onnx/decoder_model_merged_int8.onnx"
    flip_byte(bundle / "onnx/decoder_model_merged_int8.onnx")
    with pytest.raises(ArtifactModified) as err:
        read_bundle(bundle)
    assert str(err.value) == (f"bundle {str(bundle)!r}: onnx/decoder_model_merged_int8.onnx was modified after export (sha256 differs "
                              "from manifest.json); re-export it or pass --no-verify")
    assert read_bundle(bundle, verify=False).dtype == "fp32"
    with verification(False):
        assert read_bundle(bundle).dtype == "fp32"
    assert verification_enabled()


def test_added_and_missing_files_are_named(artifacts):
    bundle, quant = artifacts
    (bundle / "onnx" / "extra.txt").write_text("x")
    with pytest.raises(ArtifactModified, match=r"onnx/extra.txt was added after export \(not in manifest.json\)"):
        read_bundle(bundle)
    (quant / "recipe.yaml").rename(quant / "recipe.yml")
    with pytest.raises(QvlmError, match="recipe.yaml is missing"):
        load_state(quant)


@pytest.mark.parametrize("name", ["state.json", "quant.safetensors"])
def test_quant_state_load_names_the_modified_file(artifacts, name):
    _, quant = artifacts
    before = load_state(quant)
    flip_byte(quant / name, offset=-2 if name == "state.json" else -1)
    with pytest.raises(ArtifactModified, match=f"quant state .*: {name} was modified after quantize"):
        load_state(quant)
    if name == "quant.safetensors":  # the last byte is tensor data: it loads, with one code changed
        after = load_state(quant, verify=False)
        assert sum(int((a.weight_codes != b.weight_codes).sum()) + int((a.weight_scale != b.weight_scale).sum())
                   for a, b in zip(before.layers.values(), after.layers.values())) <= 1


def test_refresh_after_a_deliberate_edit_verifies_again(artifacts):
    bundle, quant = artifacts
    old = read_manifest(bundle)
    flip_byte(bundle / "onnx/decoder_model_merged_int8.onnx")
    refresh_bundle(bundle)
    info = read_bundle(bundle)  # verifies
    assert info.graphs["decoder"].sha256 == sha256_file(bundle / "onnx/decoder_model_merged_int8.onnx") != old["outputs"]["onnx/decoder_model_merged_int8.onnx"]
    new = read_manifest(bundle)
    assert new["inputs"] == old["inputs"] and new["config"] == old["config"]
    assert new["outputs"] == hash_tree(bundle)
    (quant / "notes.txt").write_text("kept on purpose")
    refresh_manifest_outputs(quant)
    assert "notes.txt" in read_manifest(quant)["outputs"]
    load_state(quant)


def test_hashes_are_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    from qvlm_export import manifest

    calls = []
    real = manifest._sha256_uncached
    monkeypatch.setattr(manifest, "_sha256_uncached", lambda p: calls.append(p) or real(p))
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"a" * 100)
    new.write_bytes(b"b" * 100)
    os.utime(old, (1e9, 1e9))  # long ago: cacheable
    first = sha256_file(old)
    assert sha256_file(old) == first == real(old) and len(calls) == 1
    sha256_file(new), sha256_file(new)  # written just now: may change within the mtime tick, never cached
    assert len(calls) == 3
    old.write_bytes(b"c" * 100)
    os.utime(old, (1e9 + 1, 1e9 + 1))
    assert sha256_file(old) != first and len(calls) == 4


def test_cli_loads_fail_in_one_line_and_no_verify_runs(artifacts, tmp_path, capsys):
    bundle, quant = artifacts
    flip_byte(quant / "state.json", offset=-2)
    assert main(["export", "--quant", str(quant), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: quant state") and "state.json was modified after quantize" in err
    assert "\n" not in err and not (tmp_path / "out").exists()
    flip_byte(bundle / "onnx/vision_encoder_int8.onnx")
    assert main(["check-trt", str(bundle)]) == 1  # check-trt's own check failed: 1, like a rule violation
    assert "onnx/vision_encoder_int8.onnx was modified after export" in capsys.readouterr().err
    assert main(["check-trt", str(bundle), "--no-verify"]) == 0
    assert main(["eval", "--bundle", str(bundle), "--data", "builtin:eval:2"]) == 2
    assert main(["eval", "--bundle", str(bundle), "--data", "builtin:eval:2", "--no-verify"]) == 0
    assert verification_enabled()  # --no-verify ends with its command


def test_verify_command_exit_codes(artifacts, tiny_bundle, tmp_path, capsys):
    bundle, quant = artifacts
    n_bundle, n_quant = len(hash_tree(bundle)), len(hash_tree(quant))
    assert main(["verify", str(bundle), str(quant)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{bundle}: ok onnx-bundle {n_bundle} files",
                                                    f"{quant}: ok quant-state {n_quant} files"]
    flip_byte(bundle / "onnx/embed_tokens.onnx")
    assert main(["verify", str(quant), str(bundle)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"ok quant-state {n_quant} files") and "onnx/embed_tokens.onnx was modified after export" in lines[1]
    (tmp_path / "plain").mkdir()
    assert main(["verify", str(tmp_path / "plain")]) == 1  # a deleted manifest fails verification
    assert f"{tmp_path / 'plain' / 'manifest.json'}' is missing" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "absent")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert main(["verify", str(tmp_path / "bad")]) == 2
    assert json.loads((quant / "manifest.json").read_text())["kind"] == "quant-state"


def test_validate_api_skips_verification_when_asked(artifacts, tiny_bundle, tmp_path):
    from qvlm_export.validate.api import CandidateSpec, validate
    from qvlm_export.validate.config import validate_config_from_dict

    bundle, _ = artifacts
    (bundle / "notes.txt").write_text("fault injected")  # graphs untouched: validation can run
    spec = CandidateSpec(bundle=bundle, name="w8a8", skipped=("tensorrt: skipped: test",))
    config = validate_config_from_dict({"calib_samples": 1, "batch_size": 1, "task": False, "runners": "faithful",
                                        "layer_errors": False, "threads": 1})
    with pytest.raises(ArtifactModified, match="notes.txt was added after export"):
        validate(tiny_bundle("fp"), [spec], tmp_path / "r1", config)
    assert not (tmp_path / "r1").exists()
    report = validate(tiny_bundle("fp"), [spec], tmp_path / "r2", config, verify=False)
    assert [c.name for c in report.candidates] == ["w8a8"] and (tmp_path / "r2" / "report.json").is_file()
    assert verification_enabled()
