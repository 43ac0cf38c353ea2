#!/usr/bin/env bash
# Issue 9's GPU-box figures in one call, results under $OUT (docs/development.md, "Measuring on
# a GPU box"): the benchmark's end-to-end section (`leukray extract` against the CPU and GPU
# ceilings, N and 10 x N synthetic cells), its head-training section (`train_ratio`), and
# tests/test_gpu.py, with an `nvidia-smi dmon` trace beside them. Each part has its own time
# limit (300 + 100 + 150 s: one call of at most 600 s, with Ray unpacked first), and a part
# that fails or runs out of time does not stop the next.
#
#   OUT=/some/folder tests/measure_gpu_box.sh          (defaults sized for an H200 box)
#   E2E_IMAGES=40 E2E_SCALE=2 TRAIN_MAPS=64 ...          (a dry run on any machine)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
: "${OUT:?set OUT to the folder for the results}"
PY="${PY:-python3}"
E2E_IMAGES="${E2E_IMAGES:-1600}" E2E_SCALE="${E2E_SCALE:-10}" E2E_BATCH="${E2E_BATCH:-0}"
TRAIN_MAPS="${TRAIN_MAPS:-4096}" E2E_LIMIT_S="${E2E_LIMIT_S:-300}" TRAIN_LIMIT_S="${TRAIN_LIMIT_S:-100}"
mkdir -p "$OUT"
cd "$repo"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
  nvidia-smi dmon -s u -o T > "$OUT/dmon.txt" 2>&1 &
  dmon=$!
  trap 'kill "$dmon" 2>/dev/null' EXIT
else
  echo "no nvidia-smi: no GPU trace" > "$OUT/gpu.csv"
fi
part() {  # part NAME LIMIT_S COMMAND...: stdout and stderr to NAME.log, the exit status to status.txt
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - start))" | tee -a "$OUT/status.txt"
}
part e2e "$E2E_LIMIT_S" "$PY" -m leukray.bench --e2e --e2e-images "$E2E_IMAGES" --e2e-scale "$E2E_SCALE" \
  --e2e-batch-size "$E2E_BATCH" --out "$OUT/bench-e2e.json"
part train "$TRAIN_LIMIT_S" "$PY" -m leukray.bench --skip preprocess,extract,sweep,e2e --train-maps "$TRAIN_MAPS" \
  --out "$OUT/bench-train.json"
part test_gpu 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
