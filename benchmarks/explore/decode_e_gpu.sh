#!/bin/bash
# The one GPU call of session 6 for the split-KV decode attention (docs/results/decode-h200-e.json):
# kernel GPU tests, the sweep (benchmarks/decode_splitkv.py), the inference GPU tests, then HF
# generate() with its compiled static cache if time is left. Everything lands in $OUT as it finishes.
#   run: cd .gpu/inference && OUT=$OUT bash benchmarks/explore/decode_e_gpu.sh
set -u
T0=$(date +%s); END=$((T0 + ${TOTAL_S:-450}))
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
left() { echo $((END - $(date +%s))); }
LOG=$OUT/gpu-tests-e.log
echo "# commit $(cat COMMIT 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader)" > "$LOG"
echo "# pytest -m gpu tests/ops/test_decode_attention.py" >> "$LOG"
timeout 60 python3 -m pytest -p no:cacheprovider -m gpu tests/ops/test_decode_attention.py -q -rA >> "$LOG" 2>&1
echo "# rc=$? at $(( $(date +%s) - T0 )) s" >> "$LOG"
timeout 250 python3 benchmarks/decode_splitkv.py --out "$OUT" --budget-s 225 > "$OUT/suite-e.log" 2>&1
echo "# suite rc=$? at $(( $(date +%s) - T0 )) s" >> "$LOG"
echo "# pytest -m gpu tests/inference" >> "$LOG"
timeout $(( $(left) > 170 ? 170 : $(left) - 5 )) python3 -m pytest -p no:cacheprovider -m gpu tests/inference -q -rA --durations=8 >> "$LOG" 2>&1
echo "# rc=$? at $(( $(date +%s) - T0 )) s" >> "$LOG"
if [ "$(left)" -gt 90 ]; then
  timeout $(( $(left) - 5 )) python3 benchmarks/decode_splitkv.py --out "$OUT" --hf --budget-s $(( $(left) - 15 )) > "$OUT/hf-e.log" 2>&1
  echo "# hf rc=$? at $(( $(date +%s) - T0 )) s" >> "$LOG"
else
  echo "# hf skipped: $(left) s left" >> "$LOG"
fi
