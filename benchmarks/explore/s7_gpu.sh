#!/usr/bin/env bash
# Session 7's GPU calls: the GPU tests of what changed, then the default-path decode sweep beside
# HF's compiled static cache (benchmarks/decode_final.py -> decode-h200-<TAG>.json), then, with
# COMPILE=1, the compiled-generate rows (decode-h200-<TAG>-compile.json).
#   OUT=dir BUDGET=290 TAG=g bash benchmarks/explore/s7_gpu.sh          (call 2: tag g)
#   OUT=dir BUDGET=270 TAG=h COMPILE=1 bash benchmarks/explore/s7_gpu.sh (call 5: tag h)
set -u
OUT=${OUT:?set OUT}; BUDGET=${BUDGET:-290}; TAG=${TAG:-g}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${TESTS_S:-200} $PY -m pytest -p no:cacheprovider -m gpu -q -rfE tests/ops/test_gpu_ops.py tests/inference \
  tests/ops/test_decode_attention.py tests/layers/test_tdqkr.py > "$OUT/gpu-tests-s7-$TAG.log" 2>&1
echo "# rc=$? at $(el) s" >> "$OUT/gpu-tests-s7-$TAG.log"; grep -E "passed|failed|^# rc" "$OUT/gpu-tests-s7-$TAG.log" | tail -n 3
timeout $(( BUDGET + 40 )) $PY benchmarks/decode_final.py --out "$OUT" --budget-s "$BUDGET" --tag "$TAG" > "$OUT/decode-$TAG.log" 2>&1
echo "sweep rc=$? at $(el) s"; grep -E "^(note|hf|generate)" "$OUT/decode-$TAG.log" | cut -c1-240; tail -n 1 "$OUT/decode-$TAG.log"
if [ "${COMPILE:-0}" = 1 ]; then
  timeout 160 $PY benchmarks/decode_final.py --out "$OUT" --compile --budget-s 130 --tag "$TAG" > "$OUT/decode-$TAG-compile.log" 2>&1
  echo "compile rc=$? at $(el) s"; grep -E "^(note|hf|generate|ab)" "$OUT/decode-$TAG-compile.log" | cut -c1-200
fi
