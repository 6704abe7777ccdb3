#!/usr/bin/env bash
# The GPU check on a lent GPU machine, as one command, and nothing else: install what is missing
# from a folder of wheels, run benchmarks/gpu_check.py within its budget, and leave the report
# (gpu-check-<device>.md, .json, -kernels.json) and the check's log in OUT.
#
#   benchmarks/gpu_session.sh WHEELS OUT [BUDGET_SECONDS [gpu_check.py options...]]
#
# WHEELS is made beforehand, where a package index can be reached, by the shared
# `gpu/offline-wheels.sh WHEELS` (nibabel, tifffile and their small dependencies, and the SPM
# templates' spm-runtime); a wheel is installed (pip install --no-index --no-deps) only when its
# distribution is missing there. The machine needs CUDA torch, numpy, Pillow, typer, rich and
# safetensors already. The check runs from this checkout (no install of the project itself).
# BUDGET_SECONDS (default 420) bounds the whole check, package builds included; this script
# stops it outright at the budget plus 10 % and a minute, and the report keeps every row measured
# by then. Exit status: the check's (0 all measured rows passed, 1 some failed, 2 a usage error).
#
# When the GPU machine receives a copy of this checkout, the wheels can travel in it as an ignored
# folder: `echo /.whl/ >> .git/info/exclude`, make them with `gpu/offline-wheels.sh .whl`, and run there
#   bash benchmarks/gpu_session.sh .whl OUT 420
set -u
WHEELS=${1:?usage: $0 WHEELS OUT [BUDGET_SECONDS [gpu_check options...]]}
OUT=${2:?usage: $0 WHEELS OUT [BUDGET_SECONDS [gpu_check options...]]}
BUDGET=${3:-420}
shift $(($# < 3 ? $# : 3))
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

missing=()
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    dist=$(basename "$wheel" | cut -d- -f1)  # a wheel's file name starts with its distribution's name
    "$PY" -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' "$dist" 2>/dev/null \
        || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} missing wheel(s): ${missing[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "${missing[@]}" \
        || echo "warning: installing the wheels failed; the rows that need them will say so"
fi

stop=$(( ${BUDGET%.*} * 11 / 10 + 60 ))
timeout -k 10 "$stop" "$PY" benchmarks/gpu_check.py --budget "$BUDGET" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
