"""Distil a checkpoint into a few-step sampler (progressive distillation).

Each round trains a student, initialised from its teacher, to match two of the
teacher's DDIM steps (eta = 0, trailing spacing) with one of its own; the student's
EMA becomes the next round's teacher and the step count halves: 64 -> 32 -> ... -> 4
(Salimans & Ho 2022). Writes OUT/round_032.pt, OUT/round_016.pt, ... (normal fewstep
checkpoints whose metadata records the distilled step count, so `fewstep export
OUT/round_004.pt --fused sampler` exports a 4-step sampler), OUT/distill.json (the run's
state) and OUT/metrics.jsonl. Ctrl-C once saves after the current step; --resume
continues the current round exactly. With --teacher-guidance W != 1 the students learn
the guided teacher: sample them with guidance 1 (the default).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

from fewstep.runtime import clitools

# The parser's defaults, written out so that building it (and --help) needs no torch:
# train/distill.py imports torch. tests/test_cli_robustness.py checks that they equal
# DistillConfig()'s fields, DEFAULT_FROM_STEPS and LOSS_WEIGHTINGS of train/distill.py.
DEFAULTS: Final[dict[str, Any]] = {
    "to_steps": 4, "steps_per_round": (1500,), "batch_size": 256, "lr": 2e-4,
    "warmup_steps": 50, "ema_decay": 0.995, "grad_clip": 1.0, "teacher_guidance": 1.0,
    "spacing": "trailing", "loss_weighting": "truncated-snr", "seed": 0,
}
DEFAULT_FROM_STEPS: Final = 64
LOSS_WEIGHTINGS: Final = ("truncated-snr", "snr+1")


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 50.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 50]; 1 = no guidance")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    d = argparse.Namespace(**DEFAULTS)  # no torch here: see DEFAULTS
    p = clitools.parser(prog, __doc__)
    p.add_argument("checkpoint", type=Path, help="teacher checkpoint (fewstep train or distill)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for round_NNN.pt, distill.json and metrics.jsonl")
    p.add_argument("--from-steps", type=clitools.positive_int, default=None,
                   help="the teacher's step count (default: the checkpoint's distilled step "
                        f"count, else {DEFAULT_FROM_STEPS})")
    p.add_argument("--to-steps", type=clitools.positive_int, default=d.to_steps,
                   help="the last student's step count (reached by halving --from-steps)")
    p.add_argument("--steps-per-round", type=clitools.positive_int, nargs="+",
                   default=list(d.steps_per_round), metavar="STEPS",
                   help="optimizer steps per round: one value for all, or one per round")
    p.add_argument("--batch-size", type=clitools.positive_int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (AdamW; warm-up, then linear decay to 0 per round)")
    p.add_argument("--warmup-steps", type=clitools.nonneg_int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="EMA of the student; the EMA becomes the next teacher")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables clipping")
    p.add_argument("--teacher-guidance", type=_guidance, default=d.teacher_guidance,
                   help="classifier-free guidance of the teacher (1 = plain conditional)")
    p.add_argument("--cfg-dropout", type=float, default=None,
                   help="label dropout of the student (default: the teacher's training value)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=d.spacing,
                   help="timestep spacing; the 2N- and N-step grids must nest (trailing does)")
    p.add_argument("--loss-weighting", choices=list(LOSS_WEIGHTINGS),
                   default=d.loss_weighting,
                   help="weight of the x0 error: max(SNR, 1) or SNR + 1 (= v-space MSE)")
    p.add_argument("--data", default=None,
                   help="training images (default: the data the teacher was trained on)")
    p.add_argument("--seed", type=clitools.nonneg_int, default=d.seed)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=clitools.nonneg_int, default=None,
                   help="data loader processes (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--checkpoint-every", type=clitools.positive_int, default=500,
                   help="save the current round every N steps")
    p.add_argument("--log-every", type=clitools.positive_int, default=50)
    p.add_argument("--stop-at-round", type=clitools.positive_int, default=None, metavar="N",
                   help="stop after the round that makes the N-step student (--resume goes on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in OUT")
    g.add_argument("--force", action="store_true",
                   help="start over, deleting OUT's round_*.pt, distill.json and metrics.jsonl")
    return p


def body(args: argparse.Namespace) -> int:
    from . import distill

    config = distill.DistillConfig(
        to_steps=args.to_steps, from_steps=args.from_steps,
        steps_per_round=tuple(args.steps_per_round), batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
        teacher_guidance=args.teacher_guidance, cfg_dropout=args.cfg_dropout,
        spacing=args.spacing, loss_weighting=args.loss_weighting, data=args.data,
        seed=args.seed,
    )
    options = distill.DistillOptions(
        out=args.out, device=args.device, workers=args.workers,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
        force=args.force, progress=not args.no_progress, stop_at_round=args.stop_at_round,
    )
    for path in distill.distill(args.checkpoint, config, options):
        print(path)
    return 0


main = clitools.main_of(build_parser, body)
