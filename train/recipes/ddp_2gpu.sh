#!/usr/bin/env bash
# One GPU vs two GPUs (DistributedDataParallel) on the default model's settings: the
# `small` preset, class-conditional landscapes, v-prediction, cosine schedule, 32 px.
# Both runs use the same global batch (512: 512 x 1 GPU, 256 x 2 GPUs), the same number
# of steps and the same seed, so they see the same samples with the same t, noise and
# label dropout at every step (fit.py): their loss curves should lie on top of each
# other, and only the throughput should differ.
#
# On a host with >= 2 CUDA GPUs, from the repository root:
#   bash train/recipes/ddp_2gpu.sh [OUT]          (default OUT: runs/ddp_2gpu)
# Writes OUT/gpu1/ and OUT/gpu2/ (checkpoint, metrics.jsonl, train.log), OUT/results.json,
# OUT/loss_curves.png (needs matplotlib; skipped with a note without it) and prints a
# table last. Expected time on H100/H200: ~4-5 min in all (1 GPU ~2.5 min, 2 GPUs
# ~1.5 min, startup included). Each run is capped (RUN1_LIMIT_S, RUN2_LIMIT_S): a capped
# run saves a checkpoint (SIGINT) and the report compares the steps both runs reached.
# Knobs: STEPS (1500), GLOBAL_BATCH (512), WORKERS1 (16), WORKERS2 (12 per process),
# PYTHON (python3). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends).
set -euo pipefail
out="${1:-runs/ddp_2gpu}"
py="${PYTHON:-python3}"
steps="${STEPS:-1500}"
gbatch="${GLOBAL_BATCH:-512}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
mkdir -p "$out"

# fewstep maps fewstep.train -> train/ etc.: it must be installed (no network there).
"$py" -c "import fewstep.train.distributed" 2>/dev/null \
  || "$py" -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader \
  | tee "$out/gpus.txt"
[ "$(wc -l < "$out/gpus.txt")" -ge 2 ] || { echo "needs 2 GPUs"; exit 2; }

common=(train --data landscapes --preset small --image-size 32 --steps "$steps"
        --lr 5e-4 --warmup-steps 100 --ema-decay 0.999 --seed 0 --device cuda
        --log-every 25 --checkpoint-every 1000000 --sample-every 1000000 --sample-steps 10
        --no-progress --force)

run() {  # name visible_gpus limit_s args...
  local name="$1" visible="$2" limit="$3"; shift 3
  mkdir -p "$out/$name"
  local t0 t1 rc=0
  t0=$(date +%s%N)
  CUDA_VISIBLE_DEVICES="$visible" timeout -s INT -k 60 "$limit" \
    "$py" -m fewstep.runtime.cli "${common[@]}" --out "$out/$name" "$@" 2>&1 \
    | tee "$out/$name/train.log" || rc=$?
  t1=$(date +%s%N)
  echo "{\"rc\": $rc, \"wall_s\": $(( (t1 - t0) / 1000000 )).0e-3}" > "$out/$name/run.json"
  echo "== $name: exit $rc (124 = capped by RUN*_LIMIT_S; a checkpoint was saved)"
}

echo "== 1 GPU: batch $gbatch x 1 process"
run gpu1 "${GPU1:-0}" "${RUN1_LIMIT_S:-230}" --batch-size "$gbatch" --workers "${WORKERS1:-16}"
echo "== 2 GPUs: batch $((gbatch / 2)) x 2 processes (fewstep train --gpus 2 = torchrun)"
run gpu2 "${GPUS2:-0,1}" "${RUN2_LIMIT_S:-170}" --gpus 2 --batch-size $((gbatch / 2)) \
  --workers "${WORKERS2:-12}"

"$py" - "$out" "$steps" "$gbatch" <<'PY'
import json, math, re, statistics, subprocess, sys
from pathlib import Path

out, steps, gbatch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
runs = {}
for name, procs in (("gpu1", 1), ("gpu2", 2)):
    folder = out / name
    metrics = folder / "metrics.jsonl"
    rows = ([json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if metrics.is_file() else [])
    log = (folder / "train.log").read_text()
    m = re.search(r"trained (\d+) steps in ([\d.]+) s", log)
    warm = [r for r in rows if r["step"] > min(200, steps // 5)]  # skip start-up rows
    runs[name] = {
        "processes": procs, "batch_per_process": gbatch // procs, "global_batch": gbatch,
        "steps_done": rows[-1]["step"] if rows else 0,
        "train_s": float(m.group(2)) if m else None,
        "images_per_s_median": statistics.median(r["images_per_s"] for r in warm) if warm else None,
        "images_per_s_mean": statistics.fmean(r["images_per_s"] for r in warm) if warm else None,
        "data_wait_median": statistics.median(r.get("data_wait", 0.0) for r in warm) if warm else None,
        "final_loss_mean_last5": statistics.fmean(r["loss"] for r in rows[-5:]) if rows else None,
        "curve": [[r["step"], r["loss"]] for r in rows],
        **json.loads((folder / "run.json").read_text()),
    }
a, b = runs["gpu1"], runs["gpu2"]
common = sorted(set(s for s, _ in a["curve"]) & set(s for s, _ in b["curve"]))
la, lb = dict(map(tuple, a["curve"])), dict(map(tuple, b["curve"]))
diffs = [abs(la[s] - lb[s]) / max(la[s], 1e-12) for s in common]
speedup = (b["images_per_s_median"] / a["images_per_s_median"]
           if a["images_per_s_median"] and b["images_per_s_median"] else None)


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


import torch  # noqa: E402

result = {
    "what": "fewstep train, small preset, landscapes 32 px, same seed and global batch: "
            "1 GPU vs 2 GPUs (DDP via fewstep train --gpus 2)",
    "gpus": (out / "gpus.txt").read_text().strip().splitlines(),
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    "git": version(["git", "rev-parse", "--short", "HEAD"]),
    "steps": steps, "global_batch": gbatch,
    "throughput_steady_state": "median images/s over metrics rows after step "
                               f"{min(200, steps // 5)} (rows every 25 steps)",
    "speedup_2gpu_over_1gpu": speedup,
    "scaling_efficiency": speedup / 2 if speedup else None,
    "loss_rel_diff_common_steps": {
        "n": len(common),
        "median": statistics.median(diffs) if diffs else None,
        "max": max(diffs) if diffs else None,
        "first_100_steps_max": max((d for s, d in zip(common, diffs) if s <= 100), default=None),
    },
    "runs": runs,
}
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, sharex=True)
    for ax, (name, title) in zip(axes, (("gpu1", f"1 GPU, batch {gbatch}"),
                                        ("gpu2", f"2 GPUs (DDP), {gbatch // 2} per GPU"))):
        s, l = zip(*runs[name]["curve"]) if runs[name]["curve"] else ((), ())
        ax.plot(s, l, lw=1.2)
        rate = runs[name]["images_per_s_median"]
        ax.set_title(f"{title}: {rate:,.0f} images/s" if rate else title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (v-prediction MSE, global-batch mean)")
    fig.suptitle(f"fewstep small preset, landscapes 32 px, global batch {gbatch}, "
                 f"{result['gpus'][0].split(',')[1].strip()}")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    print(f"wrote {out / 'loss_curves.png'}")
except ImportError:
    print("matplotlib is not installed here: no loss_curves.png (results.json has the curves)")

print(f"wrote {out / 'results.json'}\n")
print(f"{'run':<6} {'procs':>5} {'batch/proc':>10} {'steps':>6} {'train s':>8} "
      f"{'images/s':>9} {'data wait':>9} {'loss (last 5)':>13}")
for name, r in runs.items():
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{name:<6} {r['processes']:>5} {r['batch_per_process']:>10} {r['steps_done']:>6} "
          f"{fmt(r['train_s'], '.1f'):>8} {fmt(r['images_per_s_median'], ',.0f'):>9} "
          f"{fmt(r['data_wait_median'], '.1%'):>9} {fmt(r['final_loss_mean_last5'], '.4f'):>13}")
if speedup:
    print(f"speedup 2 GPUs / 1 GPU: {speedup:.2f}x (scaling efficiency {speedup / 2:.0%}); "
          f"loss relative difference over {len(common)} common steps: median "
          f"{result['loss_rel_diff_common_steps']['median']:.1e}, max "
          f"{result['loss_rel_diff_common_steps']['max']:.1e}")
PY
