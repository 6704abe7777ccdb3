#!/usr/bin/env bash
# A side-by-side comparison of training formulations on one GPU, as a single command: four runs
# share the GPU for the same wall time (the GPU check is benchmarks/gpu_session.sh).
#
#   benchmarks/formulations_session.sh DATA WORK OUT [TRAIN_MINUTES]
#
# DATA is a built dataset (`tfsdeploy data build`). WORK receives the runs (WORK/runs/<name>/, full
# checkpoints and log.jsonl). OUT receives only what is worth copying off the machine:
# <name>.safetensors (each run's EMA weights) and results.tgz (configs and logs).
set -u
DATA=$1
WORK=$2
OUT=$3
MINUTES=${4:-4.5}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK/runs" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

common=(--preset small --data "$DATA" --steps 200000 --batch-size 64 --crop 64 --lr 2e-4
        --val-every 500 --ckpt-every 1000 --log-every 50 --no-progress --time-limit "$MINUTES")
launch() {
    local name=$1; shift
    "$PY" -m tfsdeploy train --out "$WORK/runs/$name" "${common[@]}" "$@" >"$WORK/runs/$name.log" 2>&1 &
}
launch x0-res-bal --prediction x0 --target residual --scale-balance
launch x0-res --prediction x0 --target residual --no-scale-balance
launch regression-bal --prediction x0 --target residual --objective regression --scale-balance
launch v-res-bal --prediction v --target residual --scale-balance
wait
for f in "$WORK"/runs/*.log; do echo "== $f"; tail -n 6 "$f"; done

"$PY" - "$WORK" "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
for run in sorted((work / "runs").iterdir()):
    latest = run / "latest"
    if run.is_dir() and latest.is_file():
        ckpt = run / latest.read_text().strip()
        # model.safetensors embeds its configs in the header: on its own it is a loadable checkpoint
        shutil.copy(ckpt / "model.safetensors", out / f"{run.name}.safetensors")
        shutil.copy(ckpt / "config.json", work / "runs" / f"{run.name}.config.json")
PY

tar -czf "$OUT/results.tgz" -C "$WORK" $(cd "$WORK" && ls runs/*.log runs/*/log.jsonl runs/*.config.json 2>/dev/null)
ls -la "$OUT"
