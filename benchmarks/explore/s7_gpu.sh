#!/usr/bin/env bash
# Session 7's GPU call: the GPU tests of what changed (skinny_linear in the host model, the ring
# map kernel, the grid chunk rule; every cached-decoding test), then the default-path decode
# sweep beside HF's compiled static cache (benchmarks/decode_final.py -> decode-h200-g.json).
#   OUT=dir BUDGET=290 bash benchmarks/explore/s7_gpu.sh
set -u
OUT=${OUT:?set OUT}; BUDGET=${BUDGET:-290}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${TESTS_S:-200} $PY -m pytest -p no:cacheprovider -m gpu -q -rfE tests/ops/test_gpu_ops.py tests/inference \
  tests/ops/test_decode_attention.py tests/layers/test_tdqkr.py > "$OUT/gpu-tests-s7.log" 2>&1
echo "# rc=$? at $(el) s" >> "$OUT/gpu-tests-s7.log"; tail -n 8 "$OUT/gpu-tests-s7.log"
timeout $(( BUDGET + 40 )) $PY benchmarks/decode_final.py --out "$OUT" --budget-s "$BUDGET" > "$OUT/decode-g.log" 2>&1
echo "sweep rc=$? at $(el) s"; grep -E "^(note|hf|generate)" "$OUT/decode-g.log" | cut -c1-240; tail -n 1 "$OUT/decode-g.log"
