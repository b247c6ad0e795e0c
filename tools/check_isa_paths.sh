#!/usr/bin/env bash
# Run tools/check_isa_paths.py --check natively and under qemu-user with a Haswell (AVX2, no AVX512/VNNI) CPU,
# so the CPU-dependent runtime assertions are exercised on both of ONNX Runtime's int8 kernel paths.
#   tools/check_isa_paths.sh [WORKDIR]      (default: $TMPDIR/qvlm-isa-check; bundles are prepared once, natively)
# Needs qemu-x86_64 (Debian: apt-get install qemu-user; QEMU >= 7.2 for AVX2 in TCG). QEMU_CPU overrides the model.
set -u -o pipefail
cd "$(dirname "$0")/.."
WORK="${1:-${TMPDIR:-/tmp}/qvlm-isa-check}"
PY="${PYTHON:-.venv/bin/python}"
CPU="${QEMU_CPU:-Haswell}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$WORK"
if [ ! -f "$WORK/bundles/b-fp/bundle.json" ]; then
  "$PY" tools/check_isa_paths.py --prepare "$WORK/bundles" || exit 2
fi
"$PY" tools/check_isa_paths.py --check "$WORK/bundles" --json "$WORK/native.json" | tee "$WORK/native.txt"
native=$?
if ! command -v qemu-x86_64 >/dev/null; then
  echo "qemu-x86_64 not found: emulated AVX2 path not checked" >&2
  exit 3
fi
# qemu warns once per CPU feature TCG cannot emulate (pcid, hle, ...): not ones MLAS dispatches on
QVLM_UNDER_QEMU=1 qemu-x86_64 -cpu "$CPU" "$PY" tools/check_isa_paths.py --check "$WORK/bundles" \
  --json "$WORK/qemu-$CPU.json" 2> >(grep -v "TCG doesn't support requested feature" >&2) | tee "$WORK/qemu-$CPU.txt"
emulated=$?
[ "$native" -eq 0 ] && [ "$emulated" -eq 0 ]
