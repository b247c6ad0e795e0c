"""Progress that says where the search is: one line per block, with Q-VLM's block errors."""

from __future__ import annotations

from qvlm_export.quant.recipe import recipe_from_dict
from qvlm_export.search.api import block_line, quantize


def test_block_line_names_the_block_and_its_errors():
    stats = {"rtn_error": 0.0123, "init_error": 0.0101, "searched_error": 0.0087, "error": 0.0087}
    line = block_line(3, 12, "model.language_model.layers.4,model.language_model.layers.5",
                      {"qvlm_blocks": {"model.language_model.layers.4": stats}}, 12.34)
    assert line == ("block 3/12 model.language_model.layers.4 .. 5; block error rtn 0.0123, start 0.0101, "
                    "searched 0.0087, kept 0.0087 (12.3 s)")
    assert block_line(1, 2, "model.multi_modal_projector", {}, 0.05) == "block 1/2 model.multi_modal_projector (0.1 s)"


def test_without_a_progress_bar_every_block_prints_a_line(tmp_path):
    lines: list[str] = []
    recipe = recipe_from_dict({"method": "qvlm", "setting": "w8a8", "calibration": {"samples": 4, "batch_size": 2},
                               "method_args": {"iterations": 2}})
    quantize(recipe=recipe, calib="builtin:calib:4", out=tmp_path / "q", progress=False, log=lines.append)
    blocks = [line for line in lines if line.startswith("block ")]
    total = int(blocks[0].split()[1].split("/")[1])
    assert len(blocks) == total and blocks[-1].startswith(f"block {total}/{total} ")
    assert sum("block error rtn" in line for line in blocks) >= total // 2  # the searched blocks report errors
