#!/usr/bin/env bash
# Rebuild the packaged default model (tfsdeploy/models/default) from scratch: three `small` runs,
# one per bundle member, then `tfsdeploy bundle`. See MODEL_CARD.md for what each run is and why.
#
#   training/default_model.sh [RUNS_DIR] [BUNDLE_DIR]
#
# The shipped members were trained on one NVIDIA H200 (about 2-4 minutes each, several runs
# sharing the GPU); on a 2-core CPU the same steps take hours. Every run resumes where it stopped
# (run the script again), and `--time-limit MINUTES` can be added to spread it over sessions.
set -euo pipefail
RUNS=${1:-runs/default}
BUNDLE=${2:-tfsdeploy/models/default}
common=(--preset small --prediction x0 --target residual --batch-size 64 --crop 64 --lr 2e-4
        --val-every 500 --ckpt-every 500)

# x2 member: all scales, loss balanced per scale (1 / baseline MSE)
tfsdeploy train --out "$RUNS/x2" "${common[@]}" --scales 2,4,8 --scale-balance --steps 2070
# x4 member: x4 only
tfsdeploy train --out "$RUNS/x4" "${common[@]}" --scales 4 --no-scale-balance --steps 1857
# x8 member: all scales, unbalanced (the large x8 residuals dominate, which is what x8 wants)
tfsdeploy train --out "$RUNS/x8" "${common[@]}" --scales 2,4,8 --no-scale-balance --steps 2163

tfsdeploy bundle "$BUNDLE" --x2 "$RUNS/x2" --x4 "$RUNS/x4" --x8 "$RUNS/x8" --ddim-steps 2:2,4:2,8:2 \
    --notes "TFS-Diff small preset (3.99 M parameters), residual over bicubic + classical fusion, x0-prediction; one model per scale; DDIM steps chosen by the sampler studies. See MODEL_CARD.md."
