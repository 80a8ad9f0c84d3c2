"""Imported models against diffusers' own loop, eager and compiled, in one process.

    python benchmarks/lab/byom_latency.py OUT [--work DIR] [--tiny] [--steps 4 8 16]
        [--backends ort-cuda] [--models unet64 unet128 policy]

Makes three models with fixed seeds (no weights can be downloaded where this runs):

* ``unet64`` and ``unet128``: diffusers ``UNet2DModel``s (64×64 and 128×128 RGB, four
  resolution levels of widths 32/64/128/128, two ResNet blocks each, self-attention at
  the third: an edge-sized model) in ``DDPMPipeline`` folders with a
  DDPMScheduler (linear betas, epsilon, clip_sample) — sampled with DDIM, the common case;
* ``policy``: a diffusion policy after the Diffusion Policy architecture (the 1-D
  conditional UNet with FiLM conditioning on a 36-float observation of
  ``tests/test_byom_oracle.py``, at widths 256/512), over (16, 2) action sequences;
  100 training timesteps, squaredcos_cap_v2, clip_sample, DDIM.

Each is exported fp32 and fp16 through fewstep's own front doors (``fewstep export
FOLDER`` for the diffusers folders, ``fewstep.export.export_module`` for the policy)
with the fused step graph (and, fp16, a fused sampler: per step count for the policy, at
the first step count for the UNets, whose N-step sampler graphs take minutes each to
trace), then timed by ``fewstep
bench`` at batch 1 against ``diffusers-eager`` (diffusers' DDIMScheduler loop) and
``diffusers-compile`` (the same loop, the model under torch.compile as diffusers
documents), fp32 and fp16, all in one process per model. ``--tiny``: small widths, for a
check of the script on a CPU. Writes OUT/<model>/bench/results.jsonl and report.md, and
prints one table last.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

POLICY_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "prediction_type": "epsilon",
    "set_alpha_to_one": True, "steps_offset": 0,
}


def unet2d(size: int, tiny: bool) -> Any:
    import diffusers
    import torch

    torch.manual_seed(size)
    widths = (8, 16, 16, 32) if tiny else (32, 64, 128, 128)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=widths,
        layers_per_block=1 if tiny else 2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).eval()


def save_pipeline(unet: Any, folder: Path) -> None:
    import diffusers

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        clip_sample=True, prediction_type="epsilon")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)


def fused(precision: str) -> tuple[str, ...]:
    """The fused graphs exported: fp16 (the fast path) gets a sampler per step count too."""
    return ("step", "sampler") if precision == "fp16" else ("step",)


def export_folder(folder: Path, steps: list[int], precision: str) -> Path:
    from fewstep.runtime import cli

    out = folder.parent / f"{folder.name}-{precision}.onnx"
    argv = ["export", str(folder), "--out", str(out), "--precision", precision]
    for kind in fused(precision):
        argv += ["--fused", kind]
    if "sampler" in fused(precision):
        for n in steps:
            argv += ["--steps", str(n)]
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"fewstep export {folder} ({precision}) failed: exit {code}")
    return out


def policy_module(tiny: bool) -> Any:
    import torch
    from test_byom_oracle import ConditionalUnet1D

    torch.manual_seed(3)
    dims = (32, 64) if tiny else (256, 512)
    return ConditionalUnet1D(action_dim=2, obs_dim=36, dims=dims, tdim=32 if tiny else 128).eval()


def policy_call(net: Any) -> Any:
    return lambda x, t, c: net(x, t, c["global_cond"])


def export_policy(net: Any, out: Path, steps: list[int], precision: str) -> Path:
    from fewstep.export.api import Conditioning, export_module

    export_module(net, out, sample_shape=(16, 2), schedule=POLICY_SCHEDULER,
                  call=policy_call(net),
                  cond=[Conditioning("global_cond", (36,))], precision=precision,
                  fused=fused(precision), steps=tuple(steps))
    return out


def bench(models: list[Path], out: Path, steps: list[int], backends: list[str],
          source: Any = None, folder: Path | None = None,
          quick: bool = False, extra: list[str] | None = None) -> list[dict[str, Any]]:
    from fewstep.benchmarks import cli as bench_cli

    argv = [a for m in models for a in ("--model", str(m))]
    argv += ["--steps", *map(str, steps), "--batch", "1", "--backends", *backends,
             "--baselines", "diffusers-eager", "diffusers-compile",
             "--compile-steps", *map(str, steps), "--compile-batch", "1", "--guidance", "none",
             "--out", str(out), "--no-plots"]
    if folder is not None:
        argv += ["--source", str(folder)]
    if quick:
        argv += ["--quick"]
    argv += extra or []
    args = bench_cli.build_parser("fewstep bench").parse_args(argv)
    _, rows = bench_cli.run(bench_cli.config_from_args(args), out, source=source, plots=False)
    return rows


def export_one(name: str, precision: str, work: Path, steps: list[int], tiny: bool) -> Path:
    """Export model ``name``: the policy made here (seeded: the same weights in every
    process), a UNet from the diffusers folder saved before."""
    work.mkdir(parents=True, exist_ok=True)
    if name == "policy":
        return export_policy(policy_module(tiny), work / f"policy-{precision}.onnx", steps,
                             precision)
    if tiny:
        return export_folder(work / "pipeline", steps, precision)
    folder = work / "pipeline"
    return export_folder(folder, steps[:1], precision)


def artifacts(name: str, work: Path) -> list[Path]:
    stem = "policy" if name == "policy" else "pipeline"
    return [work / f"{stem}-{prec}.onnx" for prec in ("fp32", "fp16")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--work", type=Path, default=None,
                   help="where the diffusers folders and exported models go (default: OUT)")
    p.add_argument("--tiny", action="store_true", help="small widths: a check on a CPU")
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--backends", nargs="+", default=["ort-cuda"])
    p.add_argument("--models", nargs="+", default=["unet64", "unet128", "policy"])
    p.add_argument("--sampler-steps", nargs="+", type=int, default=None,
                   help="step counts of the fused sampler graphs (default: --steps for the "
                        "policy, the first of --steps for the UNets)")
    p.add_argument("--bench-args", default="", help="more `fewstep bench` arguments")
    p.add_argument("--phase", choices=("all", "export", "bench"), default="all",
                   help="export: every model and precision in parallel processes; bench: "
                        "time what an earlier export phase wrote")
    args = p.parse_args()
    from fewstep.benchmarks.torch_source import TorchSource
    from fewstep.runtime.artifact import Artifact

    root = args.work or args.out
    if args.phase in ("all", "export"):
        import concurrent.futures as cf
        import multiprocessing

        t0 = time.perf_counter()
        for m in args.models:  # the diffusers folders first: both precisions read them
            if m != "policy":
                save_pipeline(unet2d(int(m.removeprefix("unet")), args.tiny),
                              root / m / "pipeline")
        jobs = [(m, prec) for m in args.models for prec in ("fp32", "fp16")]
        with cf.ProcessPoolExecutor(len(jobs),
                                    mp_context=multiprocessing.get_context("spawn")) as ex:
            for f in [ex.submit(export_one, m, prec, root / m, args.sampler_steps or args.steps,
                                args.tiny)
                      for m, prec in jobs]:
                f.result()
        print(f"exported {len(jobs)} artifacts in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    if args.phase == "export":
        return 0
    table: list[tuple[str, dict[str, Any]]] = []
    for name in args.models:
        work = root / name
        arts = artifacts(name, work)
        source, folder = None, None
        if name == "policy":
            net = policy_module(args.tiny)
            source = TorchSource.from_module(net, Artifact.open(arts[0]).meta,
                                             call=policy_call(net),
                                             scheduler=POLICY_SCHEDULER, name="policy")
        else:
            folder = work / "pipeline"
        rows = bench(arts, args.out / f"{name}-bench", args.steps, args.backends, source,
                     folder, quick=args.tiny, extra=shlex.split(args.bench_args))
        table += [(name, r) for r in rows if r.get("record") == "result"]
    (args.out / "table.json").write_text(json.dumps(
        [{"model": m, **{k: r.get(k) for k in ("name", "steps", "batch", "status", "p50_ms",
                                                "psnr_db", "first_call_ms", "reason")}}
         for m, r in table], indent=1))
    print(f"{'model':8} {'steps':>5}  {'path':44} {'p50 ms':>9} {'PSNR dB':>8}")
    for m, r in table:
        if r.get("p50_ms") is None:
            continue
        psnr = "-" if r.get("psnr_db") is None else f"{r['psnr_db']:.1f}"
        print(f"{m:8} {r['steps']:>5}  {r['name'][:44]:44} {r['p50_ms']:9.3f} {psnr:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
