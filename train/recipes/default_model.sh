#!/usr/bin/env bash
# Train the shipped default model: the `small` preset, class-conditional (6 landscape
# classes, CFG label dropout 0.1), v-prediction, cosine schedule, 32 px.
# Run on a CUDA machine from the repository root: bash train/recipes/default_model.sh OUT
# The first Ctrl-C (or SIGINT from `timeout -s INT`) saves a checkpoint; rerun with
# --resume appended to continue.
set -euo pipefail
out="${1:-runs/default}"
shift || true
python3 -m fewstep.runtime.cli train --data landscapes --preset small --image-size 32 \
  --steps 12000 --batch-size 256 --lr 5e-4 --warmup-steps 500 --ema-decay 0.9995 \
  --device cuda --workers 12 --sample-every 3000 --checkpoint-every 1000 --log-every 100 \
  --no-progress --out "$out" "$@"
