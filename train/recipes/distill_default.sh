#!/usr/bin/env bash
# Distil the shipped default model (train/recipes/default_model.sh: `small` preset, 1.74 M
# params, 6 landscape classes, v-prediction, cosine schedule, 32 px) from 64 DDIM steps
# down to 1, then measure teacher vs. students. Three stages, one command each on the
# GPU machine (one H100/H200), from the repository root:
#
#   bash train/recipes/distill_default.sh distill-a [TEACHER] [DIR]  # 64->32->16->8->4  ~3.5 min
#   bash train/recipes/distill_default.sh distill-b [TEACHER] [DIR]  # 4->2->1            ~4.3 min
#   bash train/recipes/distill_default.sh eval      [TEACHER] [DIR]  # FD-cls, grid       ~3 min
#
# TEACHER defaults to runs/default/checkpoint.pt (default_model.sh's output), DIR to
# runs/distill (round_032.pt ... round_001.pt, distill.json, metrics.jsonl; eval/ inside).
# Every stage is restartable: distill passes --resume (a fresh DIR starts fresh), and
# `timeout -s INT` makes a stage that runs long save its round and stop before 9 minutes;
# rerunning the same stage continues exactly where it stopped. When $OUT is a folder (the
# device tool's output folder), each stage copies its results there.
#
# Cost model (per optimizer step at batch 256, W = teacher guidance = 1):
#   plain training measured 21 steps/s on an H200 (10,185 steps in 480 s): one fwd+bwd of
#   the student = 3 forward-equivalents F, so F ~ 16 ms at batch 256. A distillation step
#   is 2 teacher forwards without grad (2F) + student fwd+bwd (3F) + EMA ~ 5F ~ 80 ms,
#   i.e. ~12.5 steps/s whatever the round (the teacher always takes exactly two steps).
#   (With --teacher-guidance W != 1 the teacher runs at batch 512: ~7F, ~9 steps/s.)
# Steps per round 400 400 600 800 | 1200 1600 (more for the last rounds, which matter most
# and change the model most): 2200 steps ~ 176 s + ~25 s start-up (CUDA, 12 loader
# workers), then 2800 steps ~ 224 s + start-up: ~7.5 min of GPU in total. At a pessimistic
# 9 steps/s the stages take ~4.5 and ~5.6 min: still under the 9-minute cap.
# Eval: classifier 3000 steps of batch 256 (0.7 M-param CNN, 30k real images rendered by 12
# workers) ~30 s; sampling 1+2+4+8+16+50 teacher + 32+16+8+4+2+1 student steps = 144 UNet
# passes x 2000 images x 3 seeds = 864k fp32 image-forwards at batch 1000 ~ 40-90 s;
# 12k real reference images ~3 s: ~2-3 min with start-up.
set -uo pipefail
stage="${1:?usage: distill_default.sh distill-a|distill-b|eval [TEACHER] [DIR]}"
teacher="${2:-runs/default/checkpoint.pt}"
dir="${3:-runs/distill}"
py="${PYTHON:-python3}"  # the interpreter with fewstep installed
limit=530  # seconds; SIGINT then saves the current round (continue: rerun the stage)

echo "== $stage: $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
if [ ! -f "$teacher" ]; then
  echo "error: teacher checkpoint $teacher not found; train it with train/recipes/default_model.sh" >&2
  exit 2
fi
mkdir -p "$dir"
SECONDS=0

distill() {
  timeout -s INT "$limit" "$py" -m fewstep.runtime.cli distill "$teacher" --out "$dir" \
    --from-steps 64 --to-steps 1 --steps-per-round 400 400 600 800 1200 1600 \
    --batch-size 256 --lr 2e-4 --warmup-steps 50 --ema-decay 0.995 --teacher-guidance 1 \
    --device cuda --workers 12 --checkpoint-every 200 --log-every 100 --no-progress \
    --resume "$@"
}

case "$stage" in
  distill-a) distill --stop-at-round 4; rc=$? ;;
  distill-b) distill; rc=$? ;;
  eval)
    mkdir -p "$dir/eval"
    rounds=()
    for n in 032 016 008 004 002 001; do
      if [ -f "$dir/round_$n.pt" ]; then rounds+=("$dir/round_$n.pt"); else echo "warning: $dir/round_$n.pt missing" >&2; fi
    done
    timeout -s INT "$limit" "$py" -m fewstep.runtime.cli eval "$teacher" "${rounds[@]}" \
      --steps 1 2 4 8 16 50 --n 2000 --seeds 3 --device cuda --batch-size 1000 --workers 12 \
      --classifier "$dir/eval/classifier-landscapes-32px.pt" --classifier-steps 3000 \
      --classifier-images 30000 --out "$dir/eval/results.jsonl" --grid "$dir/eval/grid.png" \
      --no-progress
    rc=$? ;;
  *) echo "error: unknown stage $stage; use distill-a, distill-b or eval" >&2; exit 2 ;;
esac

echo "== $stage: exit $rc after ${SECONDS} s"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]; then
  echo "== $stage stopped at the time limit with its progress saved; rerun the same stage to continue"
fi
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp -r "$dir"/. "$OUT"/ 2>/dev/null && echo "== copied $dir to $OUT"
fi
exit "$rc"
