#!/usr/bin/env bash
# Issue 13, session 6's GPU rounds (docs/results/quality.md). The machine starts bare: the code
# set is rebuilt from its site-packages (checked against the committed manifest) while the GPU
# checks run, then the experiments train concurrently, each scored on the whole validation split.
#   ROUND=1 OUT=dir STOP=s bash benchmarks/explore/quality_gpu_s6.sh
#     causality (training mode, bf16, kernels) + GPU tests, then v2-diagnosis, sparse-scaling,
#     v1-family's dense-flops and ultramem-tucker-per-head, then the train/val overlap analysis
#   ROUND=2 ...: overtake (2000 steps) and EXPS2 ("name:out:--jobs N --only ..." items)
# STOP: seconds after the start at which training is stopped (finished runs are kept).
set -u
OUT=${OUT:?set OUT}; WORK=${WORK:-/tmp/qgpu}; STOP=${STOP:-420}; PY=${PY:-python3}; ROUND=${ROUND:-1}
SPEC=${SPEC:-experiments/data/code.json}; EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ ! -f "$WORK/data/index.json" ]; then
  ( $PY -m ultramem.cli data build --spec "$SPEC" --out "$WORK/data" --no-progress > "$WORK/build.log" 2>&1;
    echo "build rc=$? at $(el) s" >> "$WORK/build.log" ) &
  BUILD=$!
else
  BUILD=""
fi
if [ "$ROUND" = 1 ]; then  # GPU checks that need no data, while the set builds (and beside training)
  ( timeout 150 $PY benchmarks/explore/quality_causality.py --out "$OUT/causality.json" ${CAUSAL_ARGS:-} \
      > "$WORK/causality.log" 2>&1; echo "causality rc=$? at $(el) s" >> "$WORK/causality.log"
    timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ops/test_tucker_per_head_kernels.py \
      > "$OUT/gpu-tests.log" 2>&1; echo "gpu tests rc=$? at $(el) s" >> "$OUT/gpu-tests.log" ) &
  CHECKS=$!
fi
[ -n "$BUILD" ] && wait "$BUILD"
tail -c 600 "$WORK/build.log"
[ -f "$WORK/data/index.json" ] || { echo "no dataset"; exit 1; }
cp "$WORK/data/manifest.json" "$OUT/data-manifest.json"
timeout 200 $PY benchmarks/explore/quality_overlap.py --data "$WORK/data" --out "$OUT/overlap.json" \
  --cache "$WORK/overlap.npz" > "$WORK/overlap.log" 2>&1 &  # CPU, beside the training
OVL=$!
left=$(( STOP - $(el) ))
echo "training for at most $left s"
EXPS=()
run_exp() {  # name out args...: one experiment in the background, stopped at the deadline
  local name=$1 out=$2; shift 2
  EXPS+=("$out")
  # shellcheck disable=SC2086
  timeout -s TERM "$left" $PY -m ultramem.cli experiment "$name" data.path="$WORK/data" $EXTRA --out "$WORK/$out" \
    --no-progress "$@" > "$WORK/$out.log" 2>&1 &
}
if [ "$ROUND" = 1 ]; then
  run_exp v2-diagnosis v2d --jobs 7
  run_exp sparse-scaling scal --jobs 6
  run_exp v1-family v1 --jobs 2 --only dense-flops ultramem-tucker-per-head
else
  run_exp overtake over --jobs 3
  for item in ${EXPS2:-}; do  # name:out:args (args with ',' for spaces)
    IFS=: read -r n o a <<< "$item"; run_exp "$n" "$o" ${a//,/ }
  done
fi
snap() {
  for e in "${EXPS[@]}"; do [ -f "$WORK/$e/results.json" ] && cp "$WORK/$e/results.json" "$OUT/$e-results.json"; done
  (cd "$WORK" && tar czf "$OUT/logs.tar.gz.tmp" build.log ./*.log \
     $(ls -d ./*/runs/*/metrics.jsonl ./*/runs/*.log ./*/runs/*/summary.json ./*/runs/*/after.json 2>/dev/null) 2>/dev/null \
   && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz")
}
while [ -n "$(jobs -rp | grep -v -e "^$OVL$" -e "^${CHECKS:-x}$")" ]; do sleep 15; snap; echo "t=$(el)s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"; done
wait; snap
echo "training done at $(el) s"
cut -c1-400 "$WORK/causality.log" 2>/dev/null; tail -4 "$OUT/gpu-tests.log" 2>/dev/null
runs=$(ls -d "$WORK"/*/runs/*/ 2>/dev/null)

cat "$WORK/overlap.log"
# shellcheck disable=SC2086
timeout 100 $PY benchmarks/explore/quality_overlap.py --data "$WORK/data" --out "$OUT/overlap.json" \
  --cache "$WORK/overlap.npz" --runs $runs 2>&1 | tail -5
echo "all done in $(el) s"
for e in "${EXPS[@]}"; do tail -n 20 "$WORK/$e.log"; done
