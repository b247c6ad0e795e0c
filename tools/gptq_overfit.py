"""Does GPTQ overfit its calibration tokens? Layer output error of GPTQ vs RTN (W4 g128), calibration vs English.

    python tools/gptq_overfit.py --model /tmp/smol/llava-untrained

For a few decoder Linears of a real-weights LLaVA, gathers FP inputs on ``builtin:calib`` (text and
image tokens, padding dropped) and on the English text of :mod:`qvlm_export.evaluate.text` (6 x 512
tokens; the first half can serve as a Hessian, the second half is held out). Prints GPTQ's output
MSE as a fraction of RTN's: on the calibration tokens themselves, and on the held-out English
tokens for a calibration Hessian at several dampings and for an English Hessian (docs/outliers.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = ("3.mlp.down_proj", "15.mlp.down_proj", "25.self_attn.q_proj")
DAMPS = (0.01, 0.1, 0.3, 1.0)


def gather(vlm, names: list[str]):
    import torch

    from qvlm_export.data.manifest import load_dataset
    from qvlm_export.evaluate.text import TextSpec, text_windows
    from qvlm_export.quant.calibrate import encode_batches

    model, calib, text, current = vlm.model, {n: [] for n in names}, {n: [] for n in names}, {}

    def hook(name):
        def run(_m, args):
            x = args[0].detach().float()
            if current.get("mask") is None:
                text[name].append(x.reshape(-1, x.shape[-1]))
            else:
                calib[name].append(x[current["mask"].bool()])
        return run

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in encode_batches(vlm, load_dataset("builtin:calib"), 16):
            current["mask"] = b.attention_mask
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values)
        current["mask"] = None
        model.model.language_model(input_ids=torch.from_numpy(text_windows(vlm.tokenizer, TextSpec(3072, 512))))
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in calib.items()}, {n: torch.cat(v) for n, v in text.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)

    from qvlm_export.load.model import load_vlm
    from qvlm_export.quant import functional as F
    from qvlm_export.search.algorithms import gptq_quantize, pseudo_quantize

    vlm = load_vlm(args.model)
    names = [f"model.language_model.layers.{n}" for n in LAYERS]
    calib, text = gather(vlm, names)

    def mse(wq, w, x) -> float:
        return float(((wq - w) @ x.t()).pow(2).mean())

    for name in names:
        w = vlm.model.get_submodule(name).weight.detach().float()
        half = text[name].shape[0] // 2
        fit, held = text[name][:half], text[name][half:]
        rtn = pseudo_quantize(w, 4, "group", 128)
        row = {}
        for label, x, damps in (("calib", calib[name], DAMPS), ("english", fit, (0.01,))):
            h = 2 * x.t() @ x / x.shape[0]
            for damp in damps:
                codes, scale, zero = gptq_quantize(w, h, 4, "group", 128, damp=damp)
                gptq = F.dequantize(codes, scale, zero, "group", 128)
                if label == "calib" and damp == 0.01:
                    row["on calib tokens"] = round(mse(gptq, w, x) / mse(rtn, w, x), 3)
                row[f"held-out English, H={label} damp={damp}"] = round(mse(gptq, w, held) / mse(rtn, w, held), 3)
        print(f"{name.removeprefix('model.language_model.layers.')} ({calib[name].shape[0]} calib tokens, "
              f"{half} English for H): GPTQ/RTN output MSE {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
