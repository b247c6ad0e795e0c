"""llama.cpp side of ``tools/bench_llama_cpp.py``; runs in the benchmark-only venv that has llama-cpp-python.

    <llama-venv>/bin/python tools/llama_cpp_worker.py REQUEST.json  -> one JSON line on stdout

REQUEST: {"gguf": source GGUF, "work": dir, "types": ["F32", "Q8_0", "Q4_0"], "prompt": 600, "steps": 64,
"threads": 2, "repeats": 3, "windows": path of an int64 .npy [n, window] (token ids, BOS first)}.
Each type is written once from the source with llama.cpp's own quantizer (``llama_model_quantize``,
requantizing allowed: the source is the Q4_1 file the real-weights model is dequantized from, so
every type holds the same weights our bundles were made from). Speed: prefill ``prompt`` tokens,
then ``steps`` single-token evals, best of ``repeats``; perplexity: logits of every window position.
Imports only llama_cpp and numpy (this venv has no qvlm_export).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def quantize(source: Path, out: Path, ftype: str, threads: int) -> Path:
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed with {rc}")
    tmp.rename(out)
    return out


def speed(path: Path, prompt: int, steps: int, threads: int, repeats: int) -> dict:
    llm = llama_cpp.Llama(str(path), n_ctx=prompt + steps + 8, n_batch=prompt, n_ubatch=prompt, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    prefills, per_step = [], []
    for _ in range(repeats):
        tokens = rng.integers(100, 40000, prompt + steps).tolist()
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens[:prompt])
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        for token in tokens[prompt:]:
            llm.eval([token])
        per_step.append((time.perf_counter() - start) / steps)
    return {"prefill_s": min(prefills), "step_s": per_step, "tokens_per_s": 1 / min(per_step),
            "spread": max(per_step) / min(per_step)}


def nll(path: Path, windows: np.ndarray, threads: int) -> list[list[float]]:
    width = windows.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=width + 8, n_batch=width, n_ubatch=width, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    out = []
    for row in windows:
        llm.reset()
        llm.eval(row.tolist())
        logits = np.asarray(llm.scores[: width - 1], dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        out.append((lse - logits[np.arange(width - 1), row[1:]]).tolist())
    return out


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    work = Path(request["work"])
    work.mkdir(parents=True, exist_ok=True)
    windows = np.load(request["windows"])
    result = {"llama_cpp_python": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
              "types": {}}
    for ftype in request["types"]:
        path = quantize(Path(request["gguf"]), work / f"smollm2-135m-{ftype}.gguf", ftype, request["threads"])
        row = speed(path, request["prompt"], request["steps"], request["threads"], request["repeats"])
        row["file_bytes"] = path.stat().st_size
        row["nll"] = nll(path, windows, request["threads"])
        result["types"][ftype] = row
        print(f"llama.cpp {ftype}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
