"""Helpers of ``tools/bench_scale.py``: real-width model configs, decode timing, extrapolation, tables.

``python tools/bench_scale_models.py decode BUNDLE PROMPT STEPS THREADS`` times one decoder
graph (run in its own process so its memory and threads are its own) and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# Widths of real checkpoints (their config.json); depth is cut by the benchmark.
ARCHS = {
    "llava-1.5-7b": {"vision": "clip", "v_hidden": 1024, "v_mlp": 4096, "v_heads": 16, "v_layers": 24,
                     "image": 336, "patch": 14, "hidden": 4096, "mlp": 11008, "heads": 32, "kv_heads": 32,
                     "layers": 32, "vocab": 32064, "feature_layer": -2, "text": "llama"},
    "llava-1.5-13b": {"vision": "clip", "v_hidden": 1024, "v_mlp": 4096, "v_heads": 16, "v_layers": 24,
                      "image": 336, "patch": 14, "hidden": 5120, "mlp": 13824, "heads": 40, "kv_heads": 40,
                      "layers": 40, "vocab": 32064, "feature_layer": -2, "text": "llama"},
    "siglip-qwen2-7b": {"vision": "siglip", "v_hidden": 1152, "v_mlp": 4304, "v_heads": 16, "v_layers": 27,
                        "image": 384, "patch": 14, "hidden": 3584, "mlp": 18944, "heads": 28, "kv_heads": 4,
                        "layers": 28, "vocab": 152064, "feature_layer": -1, "text": "qwen2"},
}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
REPEATS = 3  # decode timing: best of


def config(arch: str, vision_layers: int, text_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    from qvlm_export.load.tiny import build_tokenizer

    a, tok = ARCHS[arch], build_tokenizer()
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[a["vision"]]
    vision = vision_cls(hidden_size=a["v_hidden"], intermediate_size=a["v_mlp"], num_attention_heads=a["v_heads"],
                        num_hidden_layers=vision_layers, image_size=a["image"], patch_size=a["patch"],
                        projection_dim=768)
    text_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[a["text"]]
    text = text_cls(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=a["mlp"],
                    num_hidden_layers=text_layers, num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
                    max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    full = a["vision"] == "siglip"
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                       image_seq_length=(a["image"] // a["patch"]) ** 2, vision_feature_layer=a["feature_layer"],
                       vision_feature_select_strategy="full" if full else "default", projector_hidden_act="gelu",
                       pad_token_id=tok.pad_token_id), tok


def build(arch: str, out: Path, vision_layers: int, text_layers: int, dtype: str) -> Path:
    """A random-weight checkpoint (transformers' own init) at ``arch``'s widths, saved in ``dtype``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from qvlm_export.load.tiny import build_processor
    from qvlm_export.memory import torch_dtype

    cfg, tok = config(arch, vision_layers, text_layers)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(torch_dtype(dtype)).eval()
    model.save_pretrained(out)
    a = ARCHS[arch]
    build_processor(tok, image_size=a["image"], patch_size=a["patch"],
                    num_additional_image_tokens=0 if a["vision"] == "siglip" else 1,
                    strategy=cfg.vision_feature_select_strategy).save_pretrained(out)
    del model
    return out


def full_params(arch: str) -> int:
    """Parameters of the uncut model (built on the meta device: no memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    a = ARCHS[arch]
    cfg, _ = config(arch, a["v_layers"], a["layers"])
    with torch.device("meta"):
        return sum(p.numel() for p in LlavaForConditionalGeneration(cfg).parameters())


def describe(model: Path) -> dict:
    from qvlm_export.memory import checkpoint_params

    params, dtype = checkpoint_params(model)
    return {"path": str(model), "params": params, "dtype": dtype, "bytes": params * DTYPE_BYTES[dtype]}


def graph_bytes(bundle: Path) -> dict:
    info = json.loads((bundle / "bundle.json").read_text())
    out = {}
    for name, g in info["graphs"].items():
        files = [bundle / g["file"]] + ([bundle / g["data_file"]] if g.get("data_file") else [])
        out[name] = {"file_bytes": sum(f.stat().st_size for f in files), "external": bool(g.get("data_file")),
                     **g["weight_bytes"]}
    return out


def optimized_ops(session_path: Path, threads: int) -> dict:
    """Op types of ORT's optimized (fast mode) decoder: do the QDQ MatMuls fuse into integer kernels?"""
    import onnx
    import onnxruntime as ort

    from qvlm_export.runtime.ort_runner import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options("fast", threads)
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(session_path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False)
        counts = Counter(n.op_type for n in model.graph.node)
    keep = ("MatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits",
            "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger")
    return {k: counts.get(k, 0) for k in keep}


def decode(bundle: Path, prompt: int, steps: int, threads: int) -> dict:
    """Prefill ``prompt`` random embeddings, then ``steps`` one-token steps feeding the KV cache back."""
    import numpy as np

    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.ort_runner import make_session

    info = read_bundle(bundle)
    t0 = time.perf_counter()
    session = make_session(info.graph_path("decoder"), "fast", threads)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    hidden, dtype = info.model.hidden_size, info.float_dtype
    names = info.past_names()

    def run(embeds, total, start, past):
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(start, total, dtype=np.int64)[None], **dict(zip(names, past))}
        return session.run(None, feeds)

    # Best of REPEATS: the machine is shared, and contention only ever slows a run down.
    prefills, decodes = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        cache = run(rng.standard_normal((1, prompt, hidden)).astype(dtype), prompt, 0, info.empty_past(1))[1:]
        prefills.append(time.perf_counter() - t0)
        out = [None, *cache]
        t0 = time.perf_counter()
        for i in range(steps):
            out = run(rng.standard_normal((1, 1, hidden)).astype(dtype), prompt + i + 1, prompt + i, out[1:])
        decodes.append(time.perf_counter() - t0)
    record = {"load_seconds": round(load, 2), "prefill_seconds": round(min(prefills), 3),
              "decode_tokens_per_s": round(steps / min(decodes), 3), "setting": info.setting,
              "decode_tokens_per_s_all": [round(steps / d, 3) for d in decodes]}
    record["optimized_ops"] = optimized_ops(info.graph_path("decoder"), threads)
    return record


def _slope(a: float, b: float, d: tuple[int, int]) -> float:
    return (b - a) / (d[1] - d[0])


def summarise(args, runs: list[dict]) -> dict:
    """Per-layer costs from the two depths and their extrapolation to the uncut model."""
    a, depths = ARCHS[args.arch], (runs[0]["depth"], runs[1]["depth"])
    full = full_params(args.arch)
    full_bytes = full * DTYPE_BYTES[args.dtype]
    stages = {}
    for name in runs[0]["stages"]:
        s1, s2 = runs[0]["stages"][name], runs[1]["stages"][name]
        row = {"depths": list(depths)}
        for key in ("seconds", "peak_rss"):
            per_layer = _slope(s1[key], s2[key], depths)
            row[key] = [round(s1[key], 2), round(s2[key], 2)]
            row[f"{key}_per_layer"] = round(per_layer, 2)
            row[f"{key}_full"] = round(s1[key] + (a["layers"] - depths[0]) * per_layer, 1)
        row["peak_over_model"] = [round(r["stages"][name]["peak_rss"] / r["model"]["bytes"], 2) for r in runs]
        row["peak_over_model_full"] = round(row["peak_rss_full"] / full_bytes, 2)
        stages[name] = row
    decode = {}
    for setting in runs[0]["decode"]:
        t1, t2 = (1 / r["decode"][setting]["decode_tokens_per_s"] for r in runs)
        t_full = t1 + (a["layers"] - depths[0]) * _slope(t1, t2, depths)
        decode[setting] = {"tokens_per_s": [r["decode"][setting]["decode_tokens_per_s"] for r in runs],
                           "prefill_seconds": [r["decode"][setting]["prefill_seconds"] for r in runs],
                           "tokens_per_s_full": round(1 / t_full, 3),
                           "optimized_ops": runs[0]["decode"][setting]["optimized_ops"]}
    for row in decode.values():
        row["speedup_full_vs_fp32"] = round(row["tokens_per_s_full"] / decode["fp"]["tokens_per_s_full"], 2)
    weights = {s: {k: runs[-1]["graphs"][s]["decoder"][k] for k in ("linear", "linear_fp16", "file_bytes")}
               for s in runs[-1]["graphs"]}
    return {"arch": args.arch, "widths": a, "checkpoint_dtype": args.dtype, "full_params": full,
            "full_model_bytes": full_bytes, "vision_layers": args.vision_layers, "depths": list(depths),
            "models": [r["model"] for r in runs], "stages": stages, "decode": decode, "decoder_weights": weights,
            "graphs": {r["depth"]: r["graphs"] for r in runs},
            "targets": {"w4a16_vs_fp32": 3.0, "w8a8_vs_fp32": 2.0, "quantize_peak_over_model": 1.3,
                        "export_peak_over_model": 2.0},
            "settings": {"prompt": args.prompt, "steps": args.steps, "threads": args.threads,
                         "calib_samples": args.calib_samples}}


def print_tables(r: dict) -> None:
    gb = 1e9
    d1, d2 = r["depths"]
    layers = r["widths"]["layers"]
    print(f"\n{r['arch']} widths, {r['vision_layers']} vision layers, decoder cut to {d1} and {d2} layers; "
          f"{r['checkpoint_dtype']} checkpoints of {r['models'][0]['bytes'] / gb:.2f} / {r['models'][1]['bytes'] / gb:.2f} GB; "
          f"full model {r['full_params'] / 1e9:.2f}B params ({r['full_model_bytes'] / gb:.1f} GB)")
    print(f"{'stage':<16}{'s@' + str(d1):>9}{'s@' + str(d2):>9}{'s/layer':>9}{'s@' + str(layers):>9}"
          f"{'GB@' + str(d1):>9}{'GB@' + str(d2):>9}{'GB/layer':>9}{'GB@' + str(layers):>9}"
          f"{'xmodel':>12}{'x@' + str(layers):>8}")
    for name, s in r["stages"].items():
        print(f"{name:<16}{s['seconds'][0]:>9.1f}{s['seconds'][1]:>9.1f}{s['seconds_per_layer']:>9.1f}"
              f"{s['seconds_full']:>9.0f}{s['peak_rss'][0] / gb:>9.2f}{s['peak_rss'][1] / gb:>9.2f}"
              f"{s['peak_rss_per_layer'] / gb:>9.2f}{s['peak_rss_full'] / gb:>9.1f}"
              f"{'/'.join(f'{x:.2f}' for x in s['peak_over_model']):>12}{s['peak_over_model_full']:>8.2f}")
    print(f"\ndecode on ONNX Runtime CPU (fast), prompt {r['settings']['prompt']} + {r['settings']['steps']} steps, "
          f"{r['settings']['threads']} threads")
    print(f"{'graph':<8}{'tok/s@' + str(d1):>10}{'tok/s@' + str(d2):>10}{'tok/s@' + str(layers):>10}"
          f"{'x fp32':>8}{'prefill s@' + str(d2):>13}  fused ops in the optimized graph (depth {d1})")
    for setting, row in r["decode"].items():
        ops = ", ".join(f"{k} {v}" for k, v in row["optimized_ops"].items() if v)
        print(f"{setting:<8}{row['tokens_per_s'][0]:>10.2f}{row['tokens_per_s'][1]:>10.2f}"
              f"{row['tokens_per_s_full']:>10.3f}{row['speedup_full_vs_fp32']:>8.2f}{row['prefill_seconds'][1]:>13.1f}  {ops}")
    print(f"\ndecoder Linear weights at depth {d2} (bytes as stored vs the same weights in fp16)")
    for setting, w in r["decoder_weights"].items():
        print(f"{setting:<8}{w['linear'] / gb:>8.3f} GB vs fp16 {w['linear_fp16'] / gb:.3f} GB "
              f"({w['linear'] / w['linear_fp16']:.2f}x), decoder files {w['file_bytes'] / gb:.2f} GB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["decode"]:
        bundle, prompt, steps, threads = Path(sys.argv[2]), *map(int, sys.argv[3:6])
        print(json.dumps(decode(bundle, prompt, steps, threads)))
    else:
        raise SystemExit(__doc__)
