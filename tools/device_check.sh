#!/usr/bin/env bash
# Q-VLM at W8A8 or W4A16 on CUDA on a cut LLaVA-1.5-7B-shaped model (2 vision layers, 1 decoder
# layer, fp16 checkpoint, random weights): seconds per block, peak GPU memory, and agreement of
# the CUDA state with a CPU run of the same recipe. Short search budget (20 Adam steps a block,
# 4 calibration samples).
#
# NOT RUN YET: the development machines have no GPU. It runs from a plain copy of the tree, with no
# network and no install (PYTHONPATH is the repository root; torch and the package's dependencies
# must already be importable by $PY). One setting per command, each step under its own timeout, so
# one call fits a 10-minute limit:
#     bash tools/device_check.sh w8a8          # build the model (once), quantize on cuda and cpu, compare
#     bash tools/device_check.sh w4a16
# Work files (model, states) stay in $WORK (default .device-check/ under the repo, git-ignored) so the
# second setting reuses the model; results go to $OUT (default $WORK/out): *.json and verified.txt.
# TensorRT is not used here (docs/tensorrt.md says what stays unverified without it).
set -euo pipefail
SETTING=${1:-}
case "$SETTING" in
  w8a8|w4a16) ;;
  *) echo "usage: bash tools/device_check.sh w8a8|w4a16  (one setting per command)" >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
WORK=${WORK:-$ROOT/.device-check}
OUT=${OUT:-$WORK/out}
STEP_TIMEOUT=${STEP_TIMEOUT:-250}  # model build + 2 x quantize + compare stay under 600 s
mkdir -p "$WORK" "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
VERIFIED="$OUT/verified-$SETTING.txt"
: > "$VERIFIED"
say() { echo "verified: $*" | tee -a "$VERIFIED"; }

gpu=$($PY -c "import torch, sys, qvlm_export
sys.exit('no CUDA device: this check needs a GPU') if not torch.cuda.is_available() else None
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'package at', qvlm_export.__file__)")
say "CUDA device and the package import without install: $gpu"
if [ ! -f "$WORK/model/config.json" ]; then
  timeout 120 $PY tools/device_check.py build "$WORK/model" | tee "$OUT/model.json"
fi
say "cut LLaVA-1.5-7B-shaped model at $WORK/model"

cat > "$WORK/qvlm-$SETTING.yaml" <<YAML
method: qvlm
setting: $SETTING
calibration: {samples: 4, seed: 0, batch_size: 2}
method_args: {iterations: 20, progress: false}
YAML
for device in cuda cpu; do
  rm -rf "$WORK/q-$SETTING-$device"
  timeout "$STEP_TIMEOUT" $PY tools/device_check.py quantize "$WORK/model" "$WORK/qvlm-$SETTING.yaml" "$device" \
    "$WORK/q-$SETTING-$device" | tee "$OUT/quantize-$SETTING-$device.json"
  say "Q-VLM $SETTING quantized on $device: $(cat "$OUT/quantize-$SETTING-$device.json" | head -c 200)"
done
status=0
timeout 120 $PY tools/device_check.py compare "$WORK/q-$SETTING-cuda" "$WORK/q-$SETTING-cpu" \
  | tee "$OUT/compare-$SETTING.json" || status=1
if [ $status -eq 0 ]; then
  say "CUDA and CPU states of $SETTING agree: $(cat "$OUT/compare-$SETTING.json")"
else
  echo "FAILED: CUDA and CPU states of $SETTING disagree: $(cat "$OUT/compare-$SETTING.json")" | tee -a "$VERIFIED"
fi
exit $status
