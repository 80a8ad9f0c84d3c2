"""Train a UNet denoiser on the built-in landscapes or on a folder of your images.

Writes OUT/checkpoint.pt (weights, EMA, optimizer state and the model's metadata),
sample grids under OUT/samples/ and the loss curve in OUT/metrics.jsonl. Ctrl-C once
saves after the current step; --resume continues exactly where the run stopped. A loss
or weights gone NaN/Inf stop the run (exit code 1) and keep the last good checkpoint.
Image folders: one sub-folder per class (or images directly in the folder for an
unconditional model), PNG/JPEG/BMP/WebP, any size (resized and centre-cropped).

Several GPUs: --gpus N starts N processes through torchrun (DistributedDataParallel,
one GPU each); `torchrun --nproc-per-node N -m fewstep.train ...` does the same.
--batch-size is per process: the global batch is batch-size x grad-accum x N. A run
can be resumed on another number of GPUs if the global batch stays the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from fewstep.runtime import clitools

from .config import PRESETS, TrainConfig


def build_parser(prog: str) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = clitools.parser(prog, __doc__)
    p.add_argument("--data", default=d.data,
                   help="'landscapes' (built-in, infinite) or a path to an image folder")
    p.add_argument("--out", type=Path, default=Path("runs/train"),
                   help="output folder for checkpoint.pt, samples/ and metrics.jsonl")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="UNet size")
    p.add_argument("--image-size", type=clitools.positive_int, default=d.image_size,
                   help="training resolution in pixels (square)")
    p.add_argument("--steps", type=clitools.positive_int, default=d.steps,
                   help="optimizer steps in total (a resumed run continues to this count)")
    p.add_argument("--batch-size", type=clitools.positive_int, default=d.batch_size,
                   help="images per step per process")
    p.add_argument("--grad-accum", type=clitools.positive_int, default=d.grad_accum,
                   help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=clitools.nonneg_int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables clipping")
    p.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout,
                   help="probability of training a sample with the null label (for guidance)")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore class labels (no classifier-free guidance)")
    p.add_argument("--prediction", default=d.prediction_type,
                   choices=["epsilon", "v_prediction", "sample"], help="network target")
    p.add_argument("--schedule", default=d.beta_schedule,
                   choices=["linear", "scaled_linear", "squaredcos_cap_v2"], help="beta schedule")
    p.add_argument("--timesteps", type=clitools.positive_int, default=d.num_train_timesteps,
                   help="number of training timesteps T")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the beta schedule to zero SNR at the last timestep (Lin et al. "
                        "2024; needs --prediction v_prediction or sample); recorded in the "
                        "checkpoint's schedule, so export and sampling use the same one")
    p.add_argument("--seed", type=clitools.nonneg_int, default=d.seed)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--gpus", type=clitools.positive_int, default=None,
                   help="train on N GPUs of this host (N processes via torchrun, DDP); with "
                        "--device cpu: N CPU processes (gloo)")
    p.add_argument("--workers", type=clitools.nonneg_int, default=None,
                   help="data loader processes (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--checkpoint-every", type=clitools.positive_int, default=1000)
    p.add_argument("--sample-every", type=clitools.positive_int, default=1000,
                   help="write a sample grid every N steps (and at the end)")
    p.add_argument("--sample-steps", type=clitools.positive_int, default=20,
                   help="DDIM steps for the sample grids")
    p.add_argument("--log-every", type=clitools.positive_int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--fp32", action="store_true",
                   help="no bf16 autocast on CUDA (slower; try it if the loss diverges)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    g.add_argument("--force", action="store_true", help="start over, replacing OUT/checkpoint.pt")
    return p


def body(args: argparse.Namespace) -> int:
    from . import distributed, fit

    launch = distributed.from_env()
    if args.gpus is not None and launch is not None:
        raise ValueError("--gpus starts the processes itself; under torchrun leave it out "
                         "(torchrun's --nproc-per-node says how many)")
    if args.gpus is not None and args.gpus > 1:
        return distributed.launch(args.gpus, distributed.strip_gpus(args.argv), args.device)
    if args.gpus == 1 and args.device == "auto":
        args.device = "cuda"

    config = fit.TrainConfig(
        data=args.data, image_size=args.image_size, preset=args.preset,
        conditional=not args.unconditional, prediction_type=args.prediction,
        beta_schedule=args.schedule, num_train_timesteps=args.timesteps,
        zero_terminal_snr=args.zero_terminal_snr, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, cfg_dropout=args.cfg_dropout,
        seed=args.seed,
    )
    options = fit.RunOptions(
        out=args.out, device=args.device, workers=args.workers,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
        sample_steps=args.sample_steps, log_every=args.log_every, resume=args.resume,
        force=args.force, compile=args.compile, progress=not args.no_progress, fp32=args.fp32,
    )
    if launch is None or launch.world_size == 1:
        print(fit.train(config, options))
        return 0
    device = distributed.device_for(args.device, launch.local_rank)
    options = dataclasses.replace(
        options, device=str(device), rank=launch.rank, world_size=launch.world_size,
        progress=options.progress and launch.rank == 0,
    )
    with distributed.process_group(launch, device):
        path = fit.train(config, options)
    if launch.rank == 0:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "fewstep") -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(args_list)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else clitools.EXIT_USAGE
    args.argv = args_list  # --gpus N passes them on to the worker processes
    return clitools.run(body, args)
