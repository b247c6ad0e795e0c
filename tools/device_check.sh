#!/usr/bin/env bash
# Q-VLM at W8A8 and W4A16 on CUDA on a cut LLaVA-1.5-7B-shaped model (2 vision layers, 1 decoder
# layer, fp16 checkpoint, random weights): seconds per block, peak GPU memory, and agreement of
# the CUDA state with a CPU run of the same recipe. Short search budget (20 Adam steps a block,
# 4 calibration samples) so the whole check fits in a few minutes of a GPU machine.
#
# NOT RUN YET: the development machines have no GPU. Expected use, from the repository root
# of a GPU machine with the package installed (pip install -e . without the CPU constraints):
#     OUT=/tmp/device-check bash tools/device_check.sh
# Results: $OUT/*.json (one line per quantize run, then compare-<setting>.json) and the log.
set -euo pipefail
OUT=${OUT:-/tmp/device-check}
PY=${PY:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
$PY tools/device_check.py build "$WORK/model" | tee "$OUT/model.json"

status=0
for setting in w8a8 w4a16; do
  cat > "$WORK/qvlm-$setting.yaml" <<YAML
method: qvlm
setting: $setting
calibration: {samples: 4, seed: 0, batch_size: 2}
method_args: {iterations: 20, progress: false}
YAML
  for device in cuda cpu; do
    timeout 400 $PY tools/device_check.py quantize "$WORK/model" "$WORK/qvlm-$setting.yaml" "$device" \
      "$WORK/q-$setting-$device" | tee "$OUT/quantize-$setting-$device.json"
  done
  $PY tools/device_check.py compare "$WORK/q-$setting-cuda" "$WORK/q-$setting-cpu" \
    | tee "$OUT/compare-$setting.json" || status=1
done
exit $status
