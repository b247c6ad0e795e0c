"""Q-VLM on CUDA vs CPU on a cut LLaVA-1.5-7B-shaped model: seconds per block, peak GPU memory, agreement.

Run by ``tools/device_check.sh`` on a GPU machine (it has not been run: the development
machines have no GPU). One call quantizes one recipe on one device and prints a JSON line;
``compare`` then reports, per recipe, how many integer codes the CUDA and CPU states share
and the largest relative difference of their activation scales. Identical codes are not
expected (float reductions differ between devices and the search amplifies them through
Adam): the report gives the numbers, the script judges only gross disagreement.

    python tools/device_check.py build MODEL_DIR
    python tools/device_check.py quantize MODEL_DIR RECIPE_YAML DEVICE OUT
    python tools/device_check.py compare CUDA_STATE CPU_STATE
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(model: Path) -> None:
    import bench_scale_models as M

    if not (model / "config.json").is_file():
        M.build("llava-1.5-7b", model, vision_layers=2, text_layers=1, dtype="fp16")
    print(json.dumps(M.describe(model)))


def quantize_on(model: Path, recipe: Path, device: str, out: Path) -> None:
    import torch

    from qvlm_export.search.api import quantize

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # fp32 on both devices: the comparison is about the device, not about fp16 rounding
    quantize(model=model, recipe=recipe, calib="builtin:calib:4", out=out, device=device, progress=False,
             dtype="fp32")
    seconds = time.perf_counter() - start
    state = json.loads((out / "state.json").read_text())
    blocks = state["extras"].get("qvlm_blocks", {})
    print(json.dumps({
        "device": device, "recipe": recipe.stem, "seconds": round(seconds, 1),
        "plan_seconds": state["extras"].get("qvlm", {}).get("timings", {}),
        "seconds_per_block": {k: round(v["seconds"], 2) for k, v in blocks.items()},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "layers": len(state["layers"])}))


def compare(cuda_state: Path, cpu_state: Path) -> int:
    import torch

    from qvlm_export.quant.state import load_state

    a, b = load_state(cuda_state), load_state(cpu_state)
    if sorted(a.layers) != sorted(b.layers):
        print(json.dumps({"ok": False, "why": "different layer sets"}))
        return 1
    same = total = 0
    worst_scale = 0.0
    for name, la in a.layers.items():
        lb = b.layers[name]
        same += int((la.weight_codes == lb.weight_codes).sum())
        total += la.weight_codes.numel()
        if la.input_scale is not None:
            worst_scale = max(worst_scale, float((la.input_scale - lb.input_scale).abs() / lb.input_scale.abs()))
        worst_scale = max(worst_scale, float(((la.weight_scale - lb.weight_scale).abs()
                                              / lb.weight_scale.abs().clamp_min(1e-12)).max()))
    share = same / total
    ok = share > 0.95 and worst_scale < 0.05
    print(json.dumps({"ok": ok, "identical_codes": round(share, 5), "max_rel_scale_diff": worst_scale,
                      "torch": torch.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "build":
        build(Path(sys.argv[2]))
    elif command == "quantize":
        quantize_on(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    elif command == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
