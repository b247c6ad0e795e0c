"""Check that the CPU-dependent runtime assertions of the tests hold on the int8 kernel path this process gets.

ONNX Runtime's MLAS picks its int8 GEMM kernels by CPUID: with AVX512-VNNI / AVX-VNNI / AMX the
u8s8 dot products are exact, on AVX2-only CPUs ``vpmaddubsw`` saturates pairs of products to int16,
so fast-mode (fused MatMulIntegerToFloat / MatMulNBits) logits drift from the faithful QDQ maths.
Run ``--check`` natively and under ``qemu-x86_64 -cpu Haswell`` (see ``tools/check_isa_paths.sh``) to
cover both paths on one VNNI machine.

Modes
    ``--prepare DIR``  quantize (RTN W8A8 and W4A16, 8 calibration samples) and export the W8A8, W4A16
                       and FP bundles into DIR (uses torch; run natively, once).
    ``--check DIR``    onnxruntime + numpy + the project runtime only (no torch export): probes the
                       int8 path this process gets, then checks, per quantized bundle, the invariants of
                       tests/test_runtime.py and tests/test_validate_bundles.py. Prints a table; ``--json``
                       writes the numbers. Exit 0 when every check holds, 1 otherwise.

Checks (the assertions the tests make):
  fused_ops        0 < fast[fused op] <= quantized decoder layers and faithful[fused op] == 0
                   (test_fast_mode_uses_integer_kernels_faithful_does_not; op = MatMulIntegerToFloat
                   for W8A8, MatMulNBits for W4A16)
  drift_default    max|fast - faithful| < 0.25 * ptp(faithful) on first-token logits (same test; and
                   test_int4_accuracy_level_... for W4A16)
  drift_int4_fp32  W4A16 with int4_accuracy=1: max|fast - faithful| < 1e-3 * ptp(faithful)
  triangle         max|fast - FP| <= max|faithful - FP| + max|fast - faithful| (+1e-5 * max(1, .)), the FP
                   bundle's logits as reference (test_fast_kernels_reported_separately_from_faithful's form)
Informational (no test asserts these on this model): SQNR / cosine of fast vs faithful, fast vs FP.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

SETTINGS = {"w8a8": "MatMulIntegerToFloat", "w4a16": "MatMulNBits"}
DATASET = "builtin:eval:4"


# ----------------------------------------------------------------------------------------- CPUID
def _exec_code(code: bytes, restype, argtypes):
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(restype, *argtypes)(addr)
    fn._buf = buf  # keep the mapping alive
    return fn


def cpu_features() -> dict:
    """The CPUID bits MLAS dispatches on, as *this process* sees them (under qemu-user: the emulated model's;
    /proc/cpuinfo would show the host's)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {"error": f"not x86-64 ({platform.machine()})"}
    try:
        # push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid; mov [r8..r8+12], eax/ebx/ecx/edx; pop rbx; ret
        cpuid = _exec_code(bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3"),
                           None, [ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)])
        # xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret
        xgetbv = _exec_code(bytes.fromhex("31c9 0f01d0 48c1e220 4809d0 c3"), ctypes.c_uint64, [])
    except Exception as exc:  # noqa: BLE001 - W^X policies etc.
        return {"error": f"cannot run CPUID: {exc}"}

    def leaf(a, c=0):
        out = (ctypes.c_uint32 * 4)()
        cpuid(a, c, out)
        return list(out)

    vendor_regs = leaf(0)
    max_leaf = vendor_regs[0]
    vendor = b"".join(r.to_bytes(4, "little") for r in (vendor_regs[1], vendor_regs[3], vendor_regs[2])).decode()
    l1 = leaf(1)
    l7 = leaf(7, 0) if max_leaf >= 7 else [0] * 4
    l71 = leaf(7, 1) if max_leaf >= 7 else [0] * 4
    osxsave = bool(l1[2] >> 27 & 1)
    xcr0 = int(xgetbv()) if osxsave else 0
    bit = lambda reg, b: bool(reg >> b & 1)  # noqa: E731
    f = {
        "vendor": vendor,
        "avx": bit(l1[2], 28), "fma": bit(l1[2], 12), "f16c": bit(l1[2], 29), "sse4_1": bit(l1[2], 19),
        "avx2": bit(l7[1], 5), "avx512f": bit(l7[1], 16), "avx512bw": bit(l7[1], 30), "avx512vl": bit(l7[1], 31),
        "avx512_vnni": bit(l7[2], 11), "amx_bf16": bit(l7[3], 22), "amx_tile": bit(l7[3], 24),
        "amx_int8": bit(l7[3], 25), "avx_vnni": bit(l71[0], 4), "avx512_bf16": bit(l71[0], 5),
        "xcr0_ymm": bool(xcr0 & 0x6 == 0x6), "xcr0_zmm": bool(xcr0 & 0xE6 == 0xE6),
    }
    f["flags"] = " ".join(k for k, v in f.items() if v is True and k not in ("xcr0_ymm", "xcr0_zmm"))
    return f


# ------------------------------------------------------------------------------- behavioural probe
def int8_probe(act_type: str) -> dict:
    """max |fast - faithful| of one QDQ MatMul (unit scales, full-range codes): 0 when MLAS's int8 GEMM is
    exact (VNNI/AMX), large when it saturates int16 (AVX2 vpmaddubsw). Also reports the fused op."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, m = 256, 64, 8
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    if act_type == "uint8":
        x = rng.integers(0, 256, (m, k)).astype(np.float32)
        zp = np.array(0, np.uint8)
    else:
        x = rng.integers(-128, 128, (m, k)).astype(np.float32)
        zp = np.array(0, np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(zp, "xz"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "ws")]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    exact = x.astype(np.float64) @ w.astype(np.float64)
    out, ops = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fast", "faithful"):
            o = ort.SessionOptions()
            o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 1, 1, 3
            if mode == "faithful":
                o.add_session_config_entry("session.disable_quant_qdq", "1")
            o.optimized_model_filepath = str(Path(tmp) / f"{mode}.onnx")
            s = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
            out[mode] = s.run(None, {"x": x})[0]
            ops[mode] = sorted(Counter(nd.op_type for nd in onnx.load(o.optimized_model_filepath).graph.node).items())
    return {"act_type": act_type, "fast_minus_faithful": float(np.abs(out["fast"] - out["faithful"]).max()),
            "faithful_minus_exact": float(np.abs(out["faithful"] - exact).max()),
            "fast_ops": ops["fast"], "faithful_ops": ops["faithful"]}


def isa_path(features: dict, probes: list[dict]) -> str:
    exact = all(p["fast_minus_faithful"] == 0 for p in probes)
    f = features
    if "error" in f:
        cpu = "cpuid unavailable"
    elif f.get("amx_int8") and f.get("amx_tile"):
        cpu = "AMX"
    elif f.get("avx512_vnni") and f.get("xcr0_zmm"):
        cpu = "AVX512-VNNI"
    elif f.get("avx_vnni"):
        cpu = "AVX-VNNI"
    elif f.get("avx512f") and f.get("avx512bw") and f.get("xcr0_zmm"):
        cpu = "AVX512 (no VNNI)"
    elif f.get("avx2") and f.get("fma"):
        cpu = "AVX2+FMA (no VNNI)"
    else:
        cpu = "pre-AVX2 (SSE)"
    return f"{cpu}; int8 GEMM {'exact' if exact else 'saturating (drifts)'}"


# ------------------------------------------------------------------------------------------ prepare
def prepare(root: Path, model: str | None) -> None:
    from qvlm_export.export.api import export_bundle
    from qvlm_export.search.api import quantize

    root.mkdir(parents=True, exist_ok=True)
    for setting in SETTINGS:
        t = time.time()
        q = quantize(model=model, recipe=f"rtn-{setting}", calib="builtin:calib:8", out=root / f"q-{setting}",
                     progress=False, device="cpu")
        export_bundle(model=model, quant=q, out=root / f"b-{setting}")
        print(f"prepared {setting} in {time.time() - t:.0f}s", flush=True)
    export_bundle(model=model, out=root / "b-fp")
    print(f"bundles in {root}", flush=True)


# -------------------------------------------------------------------------------------------- check
def fused_ops(bundle: Path, mode: str, tmp: Path) -> Counter:
    import onnx
    import onnxruntime as ort

    from qvlm_export.runtime.bundle import read_bundle
    from qvlm_export.runtime.ort_runner import session_options

    options = session_options(mode, threads=1)
    options.optimized_model_filepath = str(tmp / f"{bundle.name}-{mode}.onnx")
    decoder = read_bundle(bundle, verify=False).graph_path("decoder")
    ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def first_logits(bundle: Path, mode: str, samples, int4_accuracy=None) -> np.ndarray:
    from qvlm_export.runtime.factory import answerer_for_bundle

    answerer, _ = answerer_for_bundle(bundle, mode=mode, threads=1, int4_accuracy=int4_accuracy)
    with answerer:
        return np.asarray(answerer.generate([s.image for s in samples], [s.question for s in samples]).first_logits,
                          np.float32)


def _stats(ref: np.ndarray, cand: np.ndarray) -> dict:
    from qvlm_export.validate.stats import cosine_similarity, sqnr_db

    return {"max_abs": float(np.abs(cand - ref).max()), "sqnr_db": sqnr_db(ref, cand),
            "cosine": cosine_similarity(ref, cand)}


def check(root: Path, log) -> dict:
    from qvlm_export.data.manifest import load_dataset

    t0 = time.time()
    features = cpu_features()
    probes = [int8_probe("uint8"), int8_probe("int8")]
    import onnxruntime as ort
    result = {"python": sys.version.split()[0], "onnxruntime": ort.__version__, "numpy": np.__version__,
              "cpuid": features, "probes": probes, "isa_path": isa_path(features, probes),
              "under_qemu": bool(os.environ.get("QVLM_UNDER_QEMU")), "checks": [], "settings": {}}
    log(f"ISA path: {result['isa_path']}  (cpuid flags: {features.get('flags', features.get('error'))})")
    for p in probes:
        log(f"  probe {p['act_type']:5s} activations: max|fast-faithful| = {p['fast_minus_faithful']:g} "
            f"(faithful-exact {p['faithful_minus_exact']:g}); fast ops {p['fast_ops']}")
    samples = load_dataset(DATASET)
    fp_logits = first_logits(root / "b-fp", "faithful", samples)
    log(f"  FP reference logits {fp_logits.shape}, {time.time() - t0:.0f}s")

    def add(setting, name, ok, value, bound, detail=""):
        result["checks"].append({"setting": setting, "check": name, "ok": bool(ok), "value": value, "bound": bound,
                                 "detail": detail})

    with tempfile.TemporaryDirectory() as tmpdir:
        for setting, op in SETTINGS.items():
            bundle = root / f"b-{setting}"
            state = json.loads((root / f"q-{setting}" / "state.json").read_text())
            layers = sum(1 for name in state["layers"] if name.startswith("model.language_model."))
            fast_ops, faithful_ops = fused_ops(bundle, "fast", Path(tmpdir)), fused_ops(bundle, "faithful", Path(tmpdir))
            add(setting, f"fused_ops ({op})", 0 < fast_ops[op] <= layers and faithful_ops[op] == 0,
                f"fast={fast_ops[op]} faithful={faithful_ops[op]}", f"0 < fast <= {layers}, faithful == 0",
                detail=" ".join(f"{k}:{v}" for k, v in sorted(fast_ops.items()) if k.startswith(("MatMul", "Dynamic",
                                                                                                  "QLinear"))))
            logits = {"faithful": first_logits(bundle, "faithful", samples), "fast": first_logits(bundle, "fast", samples)}
            if setting == "w4a16":
                logits["fast-fp32"] = first_logits(bundle, "fast", samples, int4_accuracy=1)
            ptp = float(np.ptp(logits["faithful"]))
            drift = float(np.abs(logits["fast"] - logits["faithful"]).max())
            add(setting, "drift_default", drift < 0.25 * ptp, drift, 0.25 * ptp,
                detail=f"{drift / ptp:.4g} of ptp {ptp:.4g}")
            if "fast-fp32" in logits:
                d1 = float(np.abs(logits["fast-fp32"] - logits["faithful"]).max())
                add(setting, "drift_int4_fp32", d1 < 1e-3 * ptp, d1, 1e-3 * ptp, detail=f"{d1 / ptp:.3g} of ptp")
            f_ref = float(np.abs(logits["fast"] - fp_logits).max())
            q_ref = float(np.abs(logits["faithful"] - fp_logits).max())
            bound = q_ref + drift + 1e-5 * max(1.0, q_ref)
            add(setting, "triangle", f_ref <= bound, f_ref, bound,
                detail=f"|fast-FP| {f_ref:.4g} <= |faithful-FP| {q_ref:.4g} + |fast-faithful| {drift:.4g}")
            agree = {k: float((v.argmax(-1) == logits["faithful"].argmax(-1)).mean()) for k, v in logits.items()}
            result["settings"][setting] = {
                "layers": layers, "fast_ops": dict(fast_ops), "faithful_ops": dict(faithful_ops), "ptp": ptp,
                "fast_vs_faithful": _stats(logits["faithful"], logits["fast"]),
                "fast_vs_fp": _stats(fp_logits, logits["fast"]), "faithful_vs_fp": _stats(fp_logits, logits["faithful"]),
                "fast_fp32_vs_faithful": (_stats(logits["faithful"], logits["fast-fp32"]) if "fast-fp32" in logits
                                          else None),
                "argmax_agreement_with_faithful": agree}
            log(f"  {setting} done, {time.time() - t0:.0f}s")
    result["all_ok"] = all(c["ok"] for c in result["checks"])
    result["seconds"] = round(time.time() - t0, 1)
    return result


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(result: dict) -> str:
    lines = [f"ISA path seen by this process: {result['isa_path']}"
             + ("  [under qemu-user]" if result["under_qemu"] else ""),
             f"cpuid: {result['cpuid'].get('flags', result['cpuid'].get('error'))}",
             f"onnxruntime {result['onnxruntime']}, python {result['python']}, {result['seconds']}s"]
    for p in result["probes"]:
        lines.append(f"probe int8 QDQ MatMul ({p['act_type']} acts, unit scale): max|fast-faithful| = "
                     f"{_fmt(p['fast_minus_faithful'])}")
    rows = [("setting", "check", "ok", "value", "bound", "detail")]
    rows += [(c["setting"], c["check"], "PASS" if c["ok"] else "FAIL", _fmt(c["value"]), _fmt(c["bound"]), c["detail"])
             for c in result["checks"]]
    for setting, s in result["settings"].items():
        for key in ("fast_vs_faithful", "fast_fp32_vs_faithful", "fast_vs_fp", "faithful_vs_fp"):
            if s.get(key):
                st = s[key]
                rows.append((setting, f"info {key}", "", _fmt(st["max_abs"]), "",
                             f"sqnr {st['sqnr_db']:.2f} dB, cos {st['cosine']:.5f}"))
        rows.append((setting, "info argmax==faithful", "", "", "",
                     " ".join(f"{k}:{v:.2f}" for k, v in s["argmax_agreement_with_faithful"].items())))
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    lines.append("ALL CHECKS HOLD" if result["all_ok"] else "SOME CHECKS FAIL")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", type=Path, metavar="DIR", help="quantize + export the bundles into DIR (torch)")
    mode.add_argument("--check", type=Path, metavar="DIR", help="check the bundles in DIR (onnxruntime only)")
    mode.add_argument("--probe", action="store_true", help="only report the int8 path this process gets")
    ap.add_argument("--model", default=None, help="model for --prepare (default: the embedded model)")
    ap.add_argument("--json", type=Path, help="write the --check / --probe result here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.prepare:
        prepare(args.prepare, args.model)
        return 0
    if args.probe:
        features = cpu_features()
        probes = [int8_probe("uint8"), int8_probe("int8")]
        result = {"cpuid": features, "probes": probes, "isa_path": isa_path(features, probes)}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    result = check(args.check, log)
    print(table(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and
                                        not math.isfinite(o) else str(o)))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
