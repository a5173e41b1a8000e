#!/usr/bin/env bash
# Session 6's last GPU call (the lead's), on merged main: the decode rows the split-KV round left
# unmeasured (the new tile, attention="rope_sdpa"; decode-h200-f.json), then, beside each other,
# the GPU tests of the merged tree and the overtaking pair (UltraMem and its dense host, 2000 steps)
# until STOP seconds after the start. The code set is rebuilt while the decode rows run (CPU only).
#   OUT=dir STOP=430 bash benchmarks/explore/final_s6_gpu.sh
set -u
OUT=${OUT:?set OUT}; STOP=${STOP:-430}; WORK=${WORK:-/tmp/final}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
( $PY -m ultramem.cli data build --spec experiments/data/code.json --out "$WORK/data" --no-progress > "$WORK/build.log" 2>&1
  echo "build rc=$? at $(el) s" >> "$WORK/build.log" ) &
BUILD=$!
timeout 110 $PY benchmarks/decode_splitkv.py --out "$OUT" --rows 6 --budget-s 95 > "$OUT/decode-f.log" 2>&1
echo "decode rows rc=$? at $(el) s"; tail -n 2 "$OUT/decode-f.log"
( timeout 260 $PY -m pytest -p no:cacheprovider -m gpu -q -rA tests/inference tests/ops/test_decode_attention.py \
    tests/eval/test_causality.py > "$OUT/gpu-tests-s6-final.log" 2>&1
  echo "# rc=$? at $(el) s" >> "$OUT/gpu-tests-s6-final.log" ) &
wait "$BUILD"; tail -c 300 "$WORK/build.log"
[ -f "$WORK/data/index.json" ] || { echo "no dataset"; wait; exit 1; }
cp "$WORK/data/manifest.json" "$OUT/data-manifest.json"
left=$(( STOP - $(el) )); echo "training for at most $left s"
timeout -s TERM "$left" $PY -m ultramem.cli experiment overtake data.path="$WORK/data" --out "$WORK/over" \
  --no-progress --jobs 2 --only ultramem dense > "$WORK/over.log" 2>&1 &
EXP=$!
snap() {
  [ -f "$WORK/over/results.json" ] && cp "$WORK/over/results.json" "$OUT/overtake-results.json"
  (cd "$WORK" && tar czf "$OUT/logs.tar.gz.tmp" build.log over.log $(ls over/runs/*/metrics.jsonl 2>/dev/null) \
     2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz")
}
while kill -0 "$EXP" 2>/dev/null; do sleep 15; snap; echo "t=$(el)s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; done
wait; snap
echo "all done at $(el) s"; tail -n 12 "$WORK/over.log"; tail -n 5 "$OUT/gpu-tests-s6-final.log"
