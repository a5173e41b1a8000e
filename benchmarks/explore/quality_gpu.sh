#!/usr/bin/env bash
# Issue 13's GPU round (docs/results/quality.md): build the shared dataset from this machine's
# site-packages (experiments/data/code.json), then train the v1 and V2 families and a same-seed
# rerun concurrently on one GPU, each run scored on the probes when it ends.
#   OUT=dir bash benchmarks/explore/quality_gpu.sh          # STOP: seconds until training is stopped
#   ROUND=2 OUT=dir bash ...: the v1 MoE and the ablation ladder (experiments/ablation-ladder.json)
# Local smoke test: SPEC=/tmp/q/tiny.json V1=/tmp/q/v1-family.json V2=/tmp/q/v2-family.json ...
set -u
OUT=${OUT:?set OUT}; WORK=${WORK:-/tmp/qgpu}; STOP=${STOP:-430}; PY=${PY:-python3}
SPEC=${SPEC:-experiments/data/code.json}; V1=${V1:-v1-family}; V2=${V2:-v2-family}; EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -c "import torch, triton, tokenizers; print('torch', torch.__version__, 'triton', triton.__version__, 'tokenizers', tokenizers.__version__)"
SD=$(dirname "$SPEC")
if [ ! -f "$WORK/data/index.json" ]; then
  $PY -m ultramem.cli data build --spec "$SPEC" --out "$WORK/data" --train-tokenizer --no-progress > "$WORK/build.log" 2>&1
  echo "build rc=$? in $(el) s"; tail -c 1500 "$WORK/build.log"
fi
if [ ! -f "$WORK/data/index.json" ]; then  # insurance for this one GPU call: drop missing packages, rebuild
  $PY - "$SPEC" <<'PYEOF'
import json, sys, importlib.util
p = sys.argv[1]; s = json.load(open(p))
s["packages"] = [e for e in s["packages"] if importlib.util.find_spec(e["module"]) is not None]
json.dump(s, open(p, "w"), indent=1)
PYEOF
  $PY -m ultramem.cli data build --spec "$SPEC" --out "$WORK/data" --train-tokenizer --no-progress >> "$WORK/build.log" 2>&1
  echo "rebuild rc=$? in $(el) s"; tail -c 600 "$WORK/build.log"
fi
cp "$SD"/code-tokenizer.json "$SD"/code-manifest.json "$SD"/code-files.txt.gz "$OUT"/ 2>/dev/null
[ -f "$WORK/data/index.json" ] || { echo "no dataset"; exit 1; }
left=$(( STOP - $(el) ))
echo "training for at most $left s"
run_exp() {  # name out args...: one experiment in the background, stopped at the deadline
  local name=$1 out=$2; shift 2
  # shellcheck disable=SC2086
  timeout -s TERM "$left" $PY -m ultramem.cli experiment "$name" data.path="$WORK/data" $EXTRA --out "$WORK/$out" \
    --no-progress "$@" > "$WORK/$out.log" 2>&1 &
}
if [ "${ROUND:-1}" = 2 ]; then  # round 2: the v1 MoE (round 1's failed) and the ablation ladder
  run_exp "$V1" v1 --only moe
  run_exp ablation-ladder ladder --jobs 12
else
  run_exp "$V1" v1 --jobs 5
  run_exp "$V2" v2 --jobs 4
  run_exp "$V1" repro --only ultramem
fi
snap() {
  for e in v1 v2 repro ladder; do [ -f "$WORK/$e/results.json" ] && cp "$WORK/$e/results.json" "$OUT/$e-results.json"; done
  (cd "$WORK" && tar czf "$OUT/logs.tar.gz.tmp" build.log ./*.log data/manifest.json data/index.json \
     $(ls -d ./*/runs/*/metrics.jsonl ./*/runs/*.log ./*/runs/*/summary.json ./*/runs/*/after.json 2>/dev/null) 2>/dev/null \
   && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz")
}
while [ -n "$(jobs -r)" ]; do sleep 15; snap; echo "t=$(el)s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"; done
wait; snap
echo "all done in $(el) s"
cat "$WORK"/v1.log "$WORK"/v2.log "$WORK"/repro.log "$WORK"/ladder.log 2>/dev/null
df -h "$WORK" | tail -1
