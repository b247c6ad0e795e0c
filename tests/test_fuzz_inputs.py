"""Bad images and prompts: a correct answer or a one-line QvlmError (CLI: exit 2, one stderr line).

Images are opened with ``data.images.open_image`` (fuzzed with Hypothesis: truncations and byte
flips of a valid PNG) and named odd cases (1x1, a 16000x16000 header that would decode to 0.7 GB,
CMYK, 16-bit, palette, animated GIF). Prompts go through the embedded model's processor, and a
few representative cases through ``qvlm-export generate`` on the session's tiny FP bundle.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qvlm_export.cli import main
from qvlm_export.data.images import open_image
from qvlm_export.errors import QvlmError
from qvlm_export.load.model import build_prompt

FUZZ = settings(deadline=None, max_examples=60, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
RNG_IMAGE = Image.fromarray((np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height`` (no real pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(tmp_path, name: str, make) -> str:
    path = tmp_path / name
    data = make()
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        data(path)
    return str(path)


ODD_IMAGES = {
    "one.png": (lambda: lambda p: Image.new("RGB", (1, 1), (255, 0, 0)).save(p), (255, 0, 0)),
    "cmyk.jpg": (lambda: lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p), (255, 0, 0)),
    "i16.png": (lambda: lambda p: Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(p), (255, 255, 255)),
    "palette.png": (lambda: lambda p: Image.new("RGB", (8, 8), (0, 0, 255)).convert("P").save(p), (0, 0, 255)),
    "anim.gif": (lambda: lambda p: Image.new("RGB", (8, 8), (0, 255, 0)).save(
        p, save_all=True, append_images=[Image.new("RGB", (8, 8), (255, 0, 0))]), (0, 255, 0)),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_but_valid_images_open_as_rgb_with_the_right_pixels(tmp_path, name):
    make, rgb = ODD_IMAGES[name]
    image = open_image(write(tmp_path, name, make))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, np.int16)[0, 0] - np.array(rgb)).max() <= 2  # JPEG rounding of CMYK


def test_16_bit_greyscale_keeps_its_gradient(tmp_path):
    path = tmp_path / "ramp.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(path)
    assert np.asarray(open_image(path))[0, :, 0].tolist() == [0, 100, 255]  # Pillow alone gives [0, 255, 255]


@pytest.mark.parametrize("make, message", [
    (lambda: png_header_only(16000, 16000), "is over the 89 Mpx limit"),  # Pillow's own check fires first
    (lambda: png_header_only(9500, 9500), "is 9500x9500 pixels, over the 89 Mpx limit"),  # ours
    (lambda: png_bytes(RNG_IMAGE)[:60], "is unreadable"),
    (lambda: b"", "is unreadable"),
])
def test_bombs_and_broken_files_are_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(QvlmError, match=message) as err:
        open_image(write(tmp_path, "x.png", make))
    assert "\n" not in str(err.value)


def test_fuzzed_png_bytes_open_or_fail_in_one_line(tmp_path_factory):
    path = tmp_path_factory.mktemp("png") / "f.png"
    valid = png_bytes(RNG_IMAGE)

    @FUZZ
    @given(st.integers(0, len(valid)), st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)),
                                                max_size=3))
    def check(cut, flips):
        data = bytearray(valid[:cut])
        for offset, xor in flips:
            if offset < len(data):
                data[offset] ^= xor
        path.write_bytes(bytes(data))
        try:
            image = open_image(path)
        except QvlmError as exc:
            assert "\n" not in str(exc)
        else:
            assert image.mode == "RGB" and image.size == (32, 24)

    check()


@pytest.fixture(scope="module")
def processor(embedded_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(embedded_model_dir)


def test_fuzzed_questions_build_prompts_or_fail_in_one_line(processor):
    @FUZZ
    @given(st.text(max_size=40) | st.sampled_from(["", "   ", "<image>", "what <image> ?", "\x00", "\u202e🙂"]))
    def check(question):
        try:
            prompt = build_prompt(processor, question)
        except QvlmError as exc:
            assert "\n" not in str(exc) and (not question.strip() or "<image>" in question)
        else:
            batch = processor(images=[RNG_IMAGE], text=[prompt], return_tensors="np")
            assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16

    check()


@pytest.fixture(scope="module")
def fp_bundle(tiny_bundle):
    return tiny_bundle("fp")


@pytest.mark.parametrize("image, question, message", [
    ("ok", "", "the question is empty"),
    ("ok", "what <image> is it ?", "contains the image placeholder '<image>'"),
    ("ok", "word " * 300, "exceeds the model's 256 positions"),
    ("bomb", "what ?", "over the 89 Mpx limit"),
    ("truncated", "what ?", "is unreadable"),
])
def test_generate_refuses_bad_input_in_one_line(fp_bundle, tmp_path, capsys, image, question, message):
    files = {"ok": png_bytes(RNG_IMAGE), "bomb": png_header_only(16000, 16000), "truncated": png_bytes(RNG_IMAGE)[:80]}
    path = tmp_path / f"{image}.png"
    path.write_bytes(files[image])
    assert main(["generate", "--bundle", str(fp_bundle), "--image", str(path), "--question", question]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_generate_answers_odd_images_and_unicode(fp_bundle, tmp_path, capsys):
    answers = []
    for name, question in [("one.png", "what colour ?"), ("anim.gif", "\u202e🙂 中文 ?"), ("i16.png", "x" * 50)]:
        path = write(tmp_path, name, ODD_IMAGES[name][0])
        assert main(["generate", "--bundle", str(fp_bundle), "--image", path, "--question", question,
                     "--max-new-tokens", "3"]) == 0
        answers.append(capsys.readouterr().out)
    assert all(a.endswith("\n") and a.count("\n") == 1 for a in answers)
