#!/usr/bin/env bash
# Diagnosis runs of issue 13 (docs/results/quality.md): dense vs UltraMem at a small budget
# under the grad-clip modes and inits, several runs at once on one GPU.
#   OUT=dir STEPS=300 bash benchmarks/explore/quality_diag.sh
# Local smoke test: TINY=1 OUT=/tmp/x STEPS=4 bash benchmarks/explore/quality_diag.sh
set -u
OUT=${OUT:?set OUT}; STEPS=${STEPS:-300}; WORK=${WORK:-/tmp/qdiag}; LIMIT=${LIMIT:-420}
mkdir -p "$OUT" "$WORK/runs"
PY=${PY:-python3}
SP=$($PY -c "import transformers, os; print(os.path.dirname(os.path.dirname(transformers.__file__)))")
if [ -n "${TINY:-}" ]; then
  SRC="$PWD/ultramem"; D=tiny-dense; U=tiny-ultramem; UK=""; COMMON="data.seq_len=64 train.batch_size=2"
else
  SRC="$SP/transformers $SP/jax"; D=dense-151m; U=ultramem-151m-x12; UK="model.memory.knum=256"
  COMMON="train.batch_size=8"
fi
COMMON="$COMMON model.vocab_size=8192 train.max_steps=$STEPS train.checkpoint=false train.eval_every=$((STEPS/3)) train.eval_batches=20 train.log_every=10"
t0=$(date +%s)
[ -f "$WORK/data/index.json" ] || $PY -m ultramem.cli data prepare --out "$WORK/data" --source-dir $SRC > "$WORK/prep.log" 2>&1
echo "prepare: $(( $(date +%s) - t0 )) s"; tail -3 "$WORK/prep.log"
declare -A RUNS
if [ "${SET:-1}" = 2 ]; then  # second round: a 10 % warmup for everything, seed noise, init
RUNS=(
  [dense_w10_s0]="--preset $D train.warmup_frac=0.1"
  [dense_w10_s1]="--preset $D train.warmup_frac=0.1 train.seed=1"
  [um_w10]="--preset $U $UK train.warmup_frac=0.1"
  [um_authors_w10]="--preset $U $UK train.warmup_frac=0.1 model.memory.init=authors"
)
else
RUNS=(
  [dense_global]="--preset $D"
  [dense_noclip]="--preset $D train.grad_clip=0"
  [um_global]="--preset $U $UK"
  [um_exclude]="--preset $U $UK train.grad_clip_mode=exclude_values"
  [um_pergroup]="--preset $U $UK train.grad_clip_mode=per_group"
  [um_noclip]="--preset $U $UK train.grad_clip=0"
  [um_authors]="--preset $U $UK model.memory.init=authors"
  [dense_warm10]="--preset $D train.warmup_frac=0.1"
  [um_warm10]="--preset $U $UK train.warmup_frac=0.1"
)
fi
for name in "${!RUNS[@]}"; do
  # shellcheck disable=SC2086
  timeout "$LIMIT" $PY -m ultramem.cli train --no-progress --out "$WORK/runs/$name" ${RUNS[$name]} \
    data.path="$WORK/data" $COMMON > "$WORK/runs/$name.log" 2>&1 &
done
wait
echo "runs: $(( $(date +%s) - t0 )) s"
$PY - "$WORK" "$OUT" <<'PYEOF'
import json, sys, pathlib, tarfile
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res = {"data": json.loads((work / "data/index.json").read_text()).get("splits"), "runs": {}}
for run in sorted((work / "runs").iterdir()):
    if not run.is_dir():
        continue
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    keep = [r for r in rows if "val_loss" in r or r["step"] % 10 == 0 or r["step"] == 1]
    res["runs"][run.name] = {"summary": summ, "val": {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
                             "rows": keep, "log_tail": (work / "runs" / f"{run.name}.log").read_text()[-1500:]}
    print(run.name, {r["step"]: round(r["val_loss"], 4) for r in rows if "val_loss" in r})
(out / "diag.json").write_text(json.dumps(res))
with tarfile.open(out / "runs.tar.gz", "w:gz") as t:
    t.add(work / "runs", arcname="runs")
PYEOF
