#!/usr/bin/env bash
# The full GPU sweep of `fewstep bench` as ONE command, sized for a machine
# that allows ~9 minutes per command (1 NVIDIA GPU, 16 CPU cores, no network).
#
#   bash benchmarks/lab/gpu_sweep.sh OUT CHECKPOINT MODEL.onnx [MODEL2.onnx ...]
#
#   OUT         output folder: results.jsonl, report.md, *.png, bench.log
#   CHECKPOINT  the training checkpoint the models were exported from (torch baselines,
#               PyTorch fp32 reference for max-error/PSNR)
#   MODEL       exported artifacts, e.g. the fp32 one and an fp16 one of the same
#               checkpoint (their .step / .sampler-N graphs and .plan files are found)
#
# Environment (all optional):
#   PYTHON=python3       the interpreter that has torch, onnxruntime-gpu (and tensorrt)
#   BUDGET=420           seconds after which no new configuration is started
#   HARD_LIMIT=500       seconds after which the bench process is interrupted (SIGINT,
#                        then SIGKILL 15 s later); every finished row is already on disk
#   COMPILE_BUDGET=150   seconds of torch.compile first calls (compilation) in total
#   FP16_EXPORT=1        first export an fp16 artifact of CHECKPOINT into OUT/fp16/
#                        (fewstep export; ~1 minute, taken from BUDGET and HARD_LIMIT)
#   EXTRA="..."          more `fewstep bench` flags, e.g. "--max-autotune"
#
# What runs, in this order (each stage is cut by BUDGET, most important first):
#   1. nvidia-smi state, device ceilings (bf16/fp32 8192^3 matmul, 2 GiB copy; ~5 s),
#      PyTorch fp32 reference images for every step count at batch 64 (~5 s).
#   2. Tier 0, every path at 4 steps batch 1; tier 1: 1/2/8 steps at batch 1 and 4 steps
#      at batch 4; tier 2: the rest of steps<=8 x batch<=4; tier 3: 20/50 steps and batch
#      16/64. Paths: fewstep ort-cuda {denoiser, step, sampler} per MODEL (ort-tensorrt
#      and tensorrt give one "unavailable" row each where TensorRT is missing),
#      ort-steps cuda per MODEL, torch-eager fp32/fp16, torch-compile reduce-overhead
#      fp16/fp32 at steps 1 2 4 8 x batch 1 4 (each a fresh compile of the whole loop).
#   Expected (H100, 1.7 M-param UNet at 32 px): fewstep paths ~30 s each, ort-steps
#   ~45 s each, torch-eager ~50 s each, torch-compile 20-90 s per compile (the
#   COMPILE_BUDGET stops it): about 7 minutes in all; tier 3 of the slow baselines is
#   what gets skipped first if the machine is slower. Skipped rows say so.
#   3. report.md and the plots are (re)drawn from results.jsonl and the summary table is
#      printed last, also after an interruption.
set -uo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/../.."
out=$1
ckpt=$2
shift 2
py=${PYTHON:-python3}
budget=${BUDGET:-420}
hard=${HARD_LIMIT:-500}
compile_budget=${COMPILE_BUDGET:-150}
mkdir -p "$out"
start=$SECONDS

# fewstep importable? If not, a folder of links gives Python the package layout that
# pyproject's package-dir mapping gives an installed fewstep (fewstep.runtime -> runtime/).
if ! "$py" -c "import fewstep.benchmarks.cli" 2>/dev/null; then
  shim=$(mktemp -d)
  mkdir -p "$shim/fewstep"
  for d in runtime export train benchmarks; do ln -s "$PWD/$d" "$shim/fewstep/$d"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "fewstep is not installed: using the source tree through $shim" >&2
fi

echo "== device" >&2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu \
  --format=csv >&2 || echo "nvidia-smi failed (no GPU?)" >&2
"$py" - <<'EOF' >&2 || true
import importlib
for m in ("torch", "onnxruntime", "tensorrt", "onnx", "cupy", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__})")
from fewstep.runtime import backends
for name, why in backends.availability().items():
    print(f"backend {name}: {'ok' if why is None else why}")
EOF

models=()
for m in "$@"; do models+=(--model "$m"); done
if [ "${FP16_EXPORT:-0}" = "1" ]; then
  echo "== exporting an fp16 artifact to $out/fp16" >&2
  mkdir -p "$out/fp16"
  if "$py" -m fewstep.runtime.cli export "$ckpt" --out "$out/fp16/model.onnx" --precision fp16 \
       --guidance --fused step --fused sampler --steps 4 >&2; then
    models+=(--model "$out/fp16/model.onnx")
  else
    echo "fp16 export failed: sweeping the given models only" >&2
  fi
  used=$((SECONDS - start))
  budget=$((budget - used))
  hard=$((hard - used))
fi

echo "== fewstep bench (budget ${budget} s, hard limit ${hard} s)" >&2
# shellcheck disable=SC2086
timeout -s INT -k 15 "$hard" "$py" -m fewstep.benchmarks.cli \
  "${models[@]}" --checkpoint "$ckpt" --out "$out" \
  --backends ort-cuda ort-tensorrt tensorrt --graphs denoiser step sampler \
  --steps 1 2 4 8 20 50 --batch 1 4 16 64 \
  --baselines torch-eager torch-compile ort-steps \
  --compile-steps 1 2 4 8 --compile-batch 1 4 --compile-budget "$compile_budget" \
  --warmup 10 --iters 50 --target-seconds 0.3 --max-config-seconds 2 \
  --time-budget "$budget" ${EXTRA:-} 2> >(tee "$out/bench.log" >&2) >"$out/bench.out"
status=$?
echo "== fewstep bench exited with $status after $((SECONDS - start)) s" >&2

# Whatever happened: the report from the rows on disk, and the summary table last.
"$py" -m fewstep.benchmarks.cli --render "$out"
exit "$status"
