"""Training: the loop behind ``fewstep train`` (one process, or several under torchrun).

AdamW with linear warm-up and cosine decay, EMA of the weights, bf16 autocast on
CUDA, gradient clipping, classifier-free-guidance label dropout, ε/v/x0 targets.

Sample indices. Step k of a run uses the global batch of G = batch_size × grad_accum
× world_size consecutive global sample indices starting at the checkpointed sample
counter (k × G when G never changed); micro-batch m of rank r takes the b = batch_size
indices at offset (m × world_size + r) × b of it (``_StepBatches``). So the ranks never
share a sample, and together they cover exactly the samples one process would.

Per-sample draws. The image and label of sample i come from the data source
(``source.image(i)``); its timestep t, its noise eps and its label-dropout coin come
from a generator keyed by (seed, i) alone (``sample_draws``). They depend neither on
the rank nor on the batch layout, so a run sees the same inputs whatever the number of
processes, and ``--resume`` continues exactly where an uninterrupted run would be.
Only the UNet's own dropout (the ``base`` preset) draws from torch's generator, seeded
per (seed, step, rank, micro-batch).

Several processes (``distributed.py``): DistributedDataParallel averages the
gradients over the ranks; every rank's loss is the mean over its b samples divided by
grad_accum, so the averaged gradient is the gradient of the mean loss over the global
batch: the same, up to float rounding, as one process with batch G. Gradients are
all-reduced once per optimizer step (``no_sync`` on all but the last micro-batch);
the weights, and so the EMA, are identical on every rank after every step. Rank 0
alone writes the checkpoint, the sample grids and metrics.jsonl (atomically where it
replaces a file); the others wait at a barrier while it writes. The logged loss is the
mean over all ranks. A Ctrl-C on any rank stops every rank after the same step.

Resuming on another number of processes (``--resume`` with another torchrun
``--nproc-per-node``): allowed when the global batch G stays the same (change
--batch-size or --grad-accum to keep it); the checkpoint records world_size and the
sample counter. The global step, the learning-rate schedule, the optimizer state and
the set of sample indices of every later step (and so every image, label, t, eps and
label-dropout coin) are then identical to the uninterrupted run; what differs is only
how the global batch is split over processes and micro-batches, so gradients agree to
float rounding (summation order; bf16 autocast on CUDA), not bit for bit, and the
``base`` preset's UNet dropout masks differ. Resuming on the same number of processes
with the same settings is exact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.runtime import __version__, clitools, ddim
from fewstep.runtime import images as imgs
from fewstep.runtime.clitools import plural
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.fileio import atomic_path
from fewstep.runtime.meta import ModelMeta, Schedule

from . import checkpoint as ckpt_io
from . import distributed, reference
from .config import TrainConfig, UNetConfig, preset
from .data import DataError, ImageSource, open_source
from .loop import (
    StopOnInterrupt,
    TrainingDiverged,
    cpu_state,
    ema_update,
    pick_device,
    step_seed,
)
from .unet import UNet, count_parameters

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOG_LINE_SECONDS = 30.0  # without a terminal: a progress line at most this often
# Keys the per-sample draws (t, eps, label dropout) apart from the data's own generators.
DRAW_STREAM = 0x6E6F697365  # "noise"




@dataclass(frozen=True)
class RunOptions:
    """How to run: none of these change the result."""

    out: Path = Path("runs/train")
    device: str = "auto"
    workers: int | None = None
    checkpoint_every: int = 1000
    sample_every: int = 1000
    sample_steps: int = 20
    log_every: int = 50
    resume: bool = False
    force: bool = False
    compile: bool = False
    progress: bool = True
    rank: int = 0
    world_size: int = 1
    stop_after: int | None = None  # stop (with a checkpoint) once this step is done
    fp32: bool = False  # no bf16 autocast on CUDA (slower; float rounding differs only)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 5 % of it at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_draws(seed: int, index: int, num_train_timesteps: int,
                 shape: tuple[int, ...]) -> tuple[int, float, np.ndarray]:
    """(t, label-dropout uniform in [0, 1), eps) of global sample ``index``.

    A function of (seed, index) alone: the same on any rank, in any batch, after resume.
    """
    rng = np.random.default_rng([DRAW_STREAM, seed, index])
    t = int(rng.integers(0, num_train_timesteps))
    u = float(rng.random())
    eps = rng.standard_normal(shape, dtype=np.float32)
    return t, u, eps


def global_batch(config: TrainConfig, world_size: int) -> int:
    return config.batch_size * config.grad_accum * world_size


def build_meta(config: TrainConfig, source: ImageSource, ema: dict[str, torch.Tensor],
               world_size: int = 1) -> ModelMeta:
    return ModelMeta.build(
        prediction_type=config.prediction_type,
        schedule=Schedule(
            beta_schedule=config.beta_schedule, num_train_timesteps=config.num_train_timesteps,
            rescale_zero_terminal_snr=config.zero_terminal_snr,
        ),
        channels=3,
        height=source.size,
        width=source.size,
        num_classes=source.num_classes if config.conditional else 0,
        class_names=tuple(source.class_names) if config.conditional else (),
        train_config={**dataclasses.asdict(config), "world_size": world_size},
        source_hash=ckpt_io.weights_hash(ema),
        fewstep_version=__version__,
    )


Sample = tuple[torch.Tensor, int, int, bool, torch.Tensor]
# (images uint8 (B, H, W, 3), labels (B,), t (B,), label dropped (B,), eps (B, 3, H, W))
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _Samples(torch.utils.data.Dataset[Sample]):
    """Global sample index → image, label and the sample's own draws (``sample_draws``)."""

    def __init__(self, source: ImageSource, config: TrainConfig) -> None:
        self.source, self.config = source, config

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> Sample:
        c = self.config
        image, label = self.source.image(int(i))
        t, u, eps = sample_draws(c.seed, int(i), c.num_train_timesteps,
                                 (3, self.source.size, self.source.size))
        return (torch.from_numpy(np.ascontiguousarray(image)), int(label), t,
                u < c.cfg_dropout, torch.from_numpy(eps))


def _collate_samples(batch: list[Sample]) -> Batch:
    return (torch.stack([s[0] for s in batch]), torch.tensor([s[1] for s in batch]),
            torch.tensor([s[2] for s in batch]), torch.tensor([s[3] for s in batch]),
            torch.stack([s[4] for s in batch]))


class _StepBatches(torch.utils.data.Sampler[list[int]]):
    """Global sample indices of (step, micro-batch) for this rank, from step ``start`` on.

    Step ``start`` begins at global sample ``first`` (default ``start`` × G, G the
    global batch); every later step begins G samples further.
    """

    def __init__(self, config: TrainConfig, start: int, rank: int, world: int,
                 first: int | None = None) -> None:
        self.c, self.start, self.rank, self.world = config, start, rank, world
        self.first = start * global_batch(config, world) if first is None else first

    def __len__(self) -> int:
        return (self.c.steps - self.start) * self.c.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        b, acc = self.c.batch_size, self.c.grad_accum
        per_step = b * acc * self.world
        for k in range(self.c.steps - self.start):
            for micro in range(acc):
                lo = self.first + k * per_step + (micro * self.world + self.rank) * b
                yield list(range(lo, lo + b))


def _ddp_of(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    return inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None


class Trainer:
    """One training run; ``run()`` trains and returns the final checkpoint path."""

    def __init__(self, config: TrainConfig, options: RunOptions) -> None:
        self.config, self.opt = config, options
        self.device = pick_device(options.device)
        self.out = Path(options.out)
        self.main = options.rank == 0
        self.comm = self._comm(options)
        self.samples = 0  # global sample index where the next step begins
        self.data_wait = 0.0  # seconds spent waiting for the data loader
        self.saved_step: int | None = None  # the step of the checkpoint this run wrote last
        self.model: UNet | None = None  # the trained modules, once run() has returned
        self.ema: UNet | None = None
        try:
            self.source = open_source(config.data, config.image_size, config.seed)
        except DataError as e:
            raise ValueError(str(e)) from None
        if config.conditional and self.source.num_classes == 0 and config.data != "landscapes":
            # A flat folder has no classes: train unconditionally rather than fail.
            self.config = config = dataclasses.replace(config, conditional=False)
        self.unet_config: UNetConfig = preset(
            config.preset, image_size=config.image_size,
            num_classes=self.source.num_classes if config.conditional else 0,
        )
        ac = ddim.alphas_cumprod(config.beta_schedule, config.num_train_timesteps,
                                 rescale_zero_snr=config.zero_terminal_snr)
        self.alphas_cumprod = torch.tensor(ac, dtype=torch.float32, device=self.device)

    @staticmethod
    def _comm(o: RunOptions) -> distributed.Comm:
        if not 0 <= o.rank < o.world_size:
            raise ValueError(f"rank={o.rank} does not fit world_size={o.world_size}")
        if o.world_size == 1:
            return distributed.SINGLE
        comm = distributed.current()
        if (comm.world_size, comm.rank) != (o.world_size, o.rank):
            raise ValueError(
                f"world_size={o.world_size}, rank={o.rank} but this process is in no such "
                "process group; start several processes with torchrun -m fewstep.train or "
                "fewstep train --gpus N"
            )
        return comm

    # -- state --------------------------------------------------------------------

    def _fresh(self) -> tuple[UNet, UNet, torch.optim.Optimizer, int]:
        torch.manual_seed(self.config.seed)
        model = UNet(self.unet_config).to(self.device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optim = torch.optim.AdamW(
            model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        return model, ema, optim, 0

    def _resume(self) -> tuple[UNet, UNet, torch.optim.Optimizer, int]:
        path = self.out / CHECKPOINT
        ck = ckpt_io.load(path, map_location="cpu")
        saved = ck.meta.train_config
        mine = self.config.result_fields()
        # A setting missing from an older checkpoint had its default (zero_terminal_snr).
        then = {k: saved.get(k, d) for k, d in TrainConfig().result_fields().items()}
        # The per-process batch may change with the number of processes; the global
        # batch may not (it is checked below).
        diff = {k: (then.get(k), v) for k, v in mine.items()
                if then.get(k) != v and k not in ("batch_size", "grad_accum")}
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume {str(path)!r}: it was trained with other settings ({pairs}); "
                "pass the same settings, or --force to start over"
            )
        extra = ck.extra or {}
        world0 = int(extra.get("world_size", saved.get("world_size", 1)))
        b0, acc0 = int(saved.get("batch_size", 0)), int(saved.get("grad_accum", 1))
        g0, c, w = b0 * acc0 * world0, self.config, self.opt.world_size
        if g0 != global_batch(c, w):
            keep = g0 // (c.grad_accum * w) if g0 % (c.grad_accum * w) == 0 else None
            fix = f"pass --batch-size {keep}" if keep else "change --batch-size/--grad-accum"
            raise ValueError(
                f"cannot resume {str(path)!r}: it was trained with a global batch of {g0} "
                f"({b0} per process x {acc0} accumulated x {world0} process(es)), now "
                f"{global_batch(c, w)} ({c.batch_size} x {c.grad_accum} x {w}); {fix} to "
                "keep the global batch, or --force to start over"
            )
        if ck.model is None or ck.optimizer is None:
            raise ArtifactError(f"{str(path)!r} has no optimizer state to resume from")
        model, ema, optim, _ = self._fresh()
        model.load_state_dict(ck.model)
        ema.load_state_dict(ck.ema)
        optim.load_state_dict(ck.optimizer)
        self.samples = int(extra.get("samples", ck.step * g0))
        if world0 != w and self.main:
            self._log(f"resuming a run of {world0} process(es) on {w}: same global batch "
                      f"{g0}; step {ck.step} continues at global sample {self.samples}")
        return model, ema, optim, ck.step

    def _save(self, model: torch.nn.Module, ema: UNet, optim: torch.optim.Optimizer,
              step: int, samples: int) -> Path:
        ema_state = cpu_state(ema)
        w = self.opt.world_size
        meta = build_meta(self.config, self.source, ema_state, w)
        ck = ckpt_io.Checkpoint(
            meta=meta, unet_config=self.unet_config, ema=ema_state, model=cpu_state(model),
            optimizer=optim.state_dict(), step=step,
            extra={"world_size": w, "global_batch": global_batch(self.config, w),
                   "samples": samples},
        )
        return ckpt_io.save(self.out / CHECKPOINT, ck)

    def _sample_grid(self, ema: UNet, step: int) -> Path:
        meta = build_meta(self.config, self.source, {}, self.opt.world_size)
        k = max(1, meta.num_classes)
        n = k * max(1, 16 // k) if k > 1 else 16
        images = reference.sample_images(
            ema, meta, n, self.opt.sample_steps, seed=0,
            guidance=2.0 if meta.conditional else None, device=self.device,
        )
        path = self.out / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        imgs.save_image(imgs.grid(images, nrow=k if k > 1 else None), path, scale=2)
        return path

    # -- the loop -----------------------------------------------------------------

    def _wrap(self, model: UNet) -> torch.nn.Module:
        """The module the loop calls: DDP over several processes, compiled on request."""
        train_model: torch.nn.Module = model
        if self.opt.world_size > 1:
            # The UNet has no buffers, so DDP has none to broadcast per step.
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if self.opt.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        return train_model

    def _loader(self, start: int) -> Iterator[Batch]:
        o = self.opt
        workers = o.workers if o.workers is not None else (
            min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        )
        sampler = _StepBatches(self.config, start, o.rank, o.world_size, self.samples)
        loader = torch.utils.data.DataLoader(
            _Samples(self.source, self.config), batch_sampler=sampler,
            num_workers=workers, collate_fn=_collate_samples,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        return iter(loader)

    def run(self) -> Path:
        c, o = self.config, self.opt
        path = self.out / CHECKPOINT
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if path.exists() and not (o.resume or o.force):
            raise ValueError(
                f"{str(path)!r} exists; pass --resume to continue it or --force to start over"
            )
        model, ema, optim, start = self._resume() if (o.resume and path.exists()) else self._fresh()
        if start >= c.steps:
            raise ValueError(f"checkpoint is at step {start} >= steps={c.steps}; pass more --steps")
        g = global_batch(c, o.world_size)
        if start == 0:
            self.samples = 0
        if self.main:
            self._trim_metrics(start)
            procs = f" x {o.world_size} processes" if o.world_size > 1 else ""
            self._log(f"fewstep train: {c.preset} UNet, {count_parameters(model) / 1e6:.2f} M "
                      f"params, data={c.data} ({self.source.num_classes} classes), "
                      f"device={self.device}, steps {start}->{c.steps}, global batch {g} "
                      f"({c.batch_size} per process x {c.grad_accum} accumulated{procs})")
        train_model = self._wrap(model)
        batches = self._loader(start)
        bar = self._progress(start)
        now_and_then = clitools.Throttle(LOG_LINE_SECONDS)
        t_start = t_last = time.perf_counter()
        imgs_since, wait_last = 0, 0.0
        self.saved_step = start if start else None  # the step of the checkpoint on disk
        # The first step whose loss was NaN/Inf (0: none yet) and that loss, kept on the
        # device (no sync per step); looked at where a step logs or writes anything.
        first_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        bad_loss = torch.zeros((), device=self.device)
        quiet = self._log if self.main else (lambda msg: None)
        with StopOnInterrupt(quiet) as stop:
            try:
                for step in range(start, c.steps):
                    total = self._train_step(train_model, optim, batches, step)
                    ema_update(ema, model, min(c.ema_decay, (1 + step) / (10 + step)))
                    self.samples += g
                    imgs_since += g
                    done = step + 1
                    new_bad = (first_bad == 0) & ~torch.isfinite(total)
                    first_bad = torch.where(new_bad, done, first_bad)
                    bad_loss = torch.where(new_bad, total, bad_loss)
                    log = done % o.log_every == 0 or done == c.steps
                    if log:
                        loss = self.comm.mean(float(total))  # the mean over all ranks
                        now = time.perf_counter()
                        rate = imgs_since / max(now - t_last, 1e-9)
                        wait = (self.data_wait - wait_last) / max(now - t_last, 1e-9)
                        t_last, imgs_since, wait_last = now, 0, self.data_wait
                    stopping = self.comm.any(stop.requested)  # every rank stops at one step
                    last = done == c.steps or done == o.stop_after
                    save = done % o.checkpoint_every == 0 or last or stopping
                    sample = done % o.sample_every == 0 or last
                    if log or save or sample:
                        # Before anything is written: a diverged run keeps its last good
                        # checkpoint and metrics.
                        self._check_finite(first_bad, bad_loss, model, done,
                                           weights=save or sample)
                    if log:
                        if self.main:
                            self._metric({"step": done, "loss": loss, "lr": lr_at(c, step),
                                          "images_per_s": rate, "data_wait": round(wait, 4)})
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                        elif self.main and o.progress and (done == c.steps or now_and_then()):
                            # No terminal (a log file): a plain line now and then, no bar.
                            self._log(f"step {done}/{c.steps}: loss {loss:.4f}, "
                                      f"{rate:.0f} images/s")
                    if bar is not None:
                        bar.update(1)
                    if self.main and save:
                        self._save(model, ema, optim, done, self.samples)
                    if save:
                        self.saved_step = done
                    if self.main and sample:
                        self._sample_grid(ema, done)
                    if save or sample:
                        self.comm.barrier()  # the other ranks wait while rank 0 writes
                    if stopping:
                        if self.main:
                            self._log(f"stopped: checkpoint of step {done} saved to {path}; "
                                      "continue with --resume")
                        raise KeyboardInterrupt
                    if done == o.stop_after:
                        break
            finally:
                if bar is not None:
                    bar.close()
        self.model, self.ema = model, ema
        if self.main:
            seconds = time.perf_counter() - t_start
            n = (o.stop_after or c.steps) - start
            rate = n / max(seconds, 1e-9)
            self._log(f"trained {plural(n, 'step')} in {seconds:.1f} s ({rate:.2f} steps/s, "
                      f"{rate * g:.0f} images/s, global batch {g}); checkpoint: {path}")
        return path

    def _check_finite(self, first_bad: torch.Tensor, bad_loss: torch.Tensor,
                      model: torch.nn.Module, done: int, weights: bool) -> None:
        """Raise ``TrainingDiverged`` if a loss so far (or, with ``weights``, a weight) is
        NaN/Inf on any rank. Called by every rank at the same steps (collectives)."""
        at = int(first_bad)
        if self.comm.any(at > 0):
            what = f"the loss became {float(bad_loss)}" if at else "the loss became NaN/Inf"
            raise TrainingDiverged(self._diverged_message(what, at or done))
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
            if self.comm.any(not bool(finite)):
                raise TrainingDiverged(self._diverged_message("the weights became NaN/Inf", done))

    def _diverged_message(self, what: str, at: int) -> str:
        c, path = self.config, self.out / CHECKPOINT
        if self.saved_step is not None:
            kept = (f"the last good checkpoint (step {self.saved_step}) stays at {str(path)!r}, "
                    "nothing was written after it")
        else:
            kept = "no checkpoint was written (none was due yet)"
        clip = (f"a tighter --grad-clip (now {c.grad_clip:g})" if c.grad_clip > 0
                else "gradient clipping (--grad-clip 1.0; now off)")
        fp32 = (", --fp32 (no bf16 autocast)"
                if self.device.type == "cuda" and not self.opt.fp32 else "")
        return (f"training diverged: {what} at step {at}; {kept}. Start over (--force) with "
                f"a lower --lr (now {c.lr:g}), {clip}{fp32}, or check the data for bad images")

    def _train_step(self, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    batches: Iterator[Batch], step: int) -> torch.Tensor:
        """One optimizer step; returns the step's loss (a device scalar, not synced)."""
        for group in optim.param_groups:
            group["lr"] = lr_at(self.config, step)
        total = self._accumulate(model, batches, step)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.grad_clip)
        optim.step()
        return total

    def _accumulate(self, model: torch.nn.Module, batches: Iterator[Batch],
                    step: int) -> torch.Tensor:
        """Zero the gradients, then forward + backward every micro-batch of ``step``.

        Under DDP the gradients are all-reduced (averaged over the ranks) only in the
        backward of the last micro-batch. Afterwards every rank holds the gradient of
        the mean loss over the global batch.
        """
        c, dev = self.config, self.device
        ddp = _ddp_of(model)
        for p in model.parameters():
            p.grad = None
        total = torch.zeros((), device=dev)
        for micro in range(c.grad_accum):
            t0 = time.perf_counter()
            images, labels, t, drop, eps = next(batches)
            self.data_wait += time.perf_counter() - t0
            torch.manual_seed(step_seed(c.seed, step, self.opt.rank, micro))  # UNet dropout
            # uint8 (B, H, W, 3) -> (B, 3, H, W) in [-1, 1]: data.to_model_range's arithmetic
            x0 = (images.to(dev, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5
                  - 1.0).contiguous()
            eps = eps.to(dev, non_blocking=True)
            t = t.to(dev, non_blocking=True)
            a_t = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = ddim.q_sample(x0, eps, a_t)
            target = ddim.target_for(c.prediction_type, x0, eps, a_t)
            lab = None
            if self.unet_config.num_classes:
                lab = labels.to(dev, non_blocking=True)
                null = torch.full_like(lab, self.unet_config.num_classes)
                lab = torch.where(drop.to(dev, non_blocking=True), null, lab)
            sync = ddp is None or micro == c.grad_accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():  # type: ignore[union-attr]
                with torch.autocast(dev.type, dtype=torch.bfloat16,
                                    enabled=dev.type == "cuda" and not self.opt.fp32):
                    out = model(x_t, t.float(), lab)
                # Mean over this rank's b samples / grad_accum; DDP's average over the
                # ranks makes it the mean over the global batch.
                loss = F.mse_loss(out.float(), target) / c.grad_accum
                loss.backward()
            total += loss.detach()
        return total

    # -- output -------------------------------------------------------------------

    def _progress(self, start: int) -> Any:
        if not (self.opt.progress and self.main):
            return None
        return clitools.terminal_bar(total=self.config.steps, initial=start, desc="train",
                                     unit="step")

    def _log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def _metric(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, start: int) -> None:
        """Drop metric rows past the resumed step (they belong to the lost tail).

        A line cut short by a kill mid-append is dropped too.
        """
        path = self.out / METRICS
        if not path.exists():
            return
        keep = []
        for ln in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= start:
                keep.append(ln)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))


def train(config: TrainConfig, options: RunOptions) -> Path:
    return Trainer(config, options).run()
