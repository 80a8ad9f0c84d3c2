"""Training: the loop behind ``fewstep train``.

AdamW with linear warm-up and cosine decay, EMA of the weights, bf16 autocast on
CUDA, gradient clipping, classifier-free-guidance label dropout, ε/v/x0 targets.
Every random draw of step k depends only on (seed, k, rank) and every image on its
global sample index, so ``--resume`` continues exactly where an uninterrupted run
would be, and ranks of a multi-process run never see the same sample.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fewstep.runtime import __version__, ddim
from fewstep.runtime import images as imgs
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.fileio import atomic_path
from fewstep.runtime.meta import ModelMeta, Schedule

from . import checkpoint as ckpt_io
from . import reference
from .data import DataError, ImageSource, open_source, to_model_range
from .unet import UNet, UNetConfig, count_parameters, preset

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in the checkpoint)."""

    data: str = "landscapes"
    image_size: int = 32
    preset: str = "small"
    conditional: bool = True
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    steps: int = 10_000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        ddim._choice("prediction_type", self.prediction_type, ddim.PREDICTION_TYPES)
        ddim._choice("beta_schedule", self.beta_schedule, ddim.BETA_SCHEDULES)
        for name in ("steps", "batch_size", "grad_accum", "image_size", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1); try 3e-4")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")

    def result_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint (all but ``steps``)."""
        d = dataclasses.asdict(self)
        d.pop("steps")
        return d


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible to torch; pass --device cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device='mps' but MPS is not available; pass --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 5 % of it at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + micro * 15_485_863) % (2**63)


def build_meta(config: TrainConfig, source: ImageSource, ema: dict[str, torch.Tensor]) -> ModelMeta:
    return ModelMeta.build(
        prediction_type=config.prediction_type,
        schedule=Schedule(
            beta_schedule=config.beta_schedule, num_train_timesteps=config.num_train_timesteps
        ),
        channels=3,
        height=source.size,
        width=source.size,
        num_classes=source.num_classes if config.conditional else 0,
        class_names=tuple(source.class_names) if config.conditional else (),
        train_config=dataclasses.asdict(config),
        source_hash=ckpt_io.weights_hash(ema),
        fewstep_version=__version__,
    )


class _Indexed(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source.image(int(i))
        return torch.from_numpy(np.ascontiguousarray(image)), int(label)


class _StepBatches(torch.utils.data.Sampler[list[int]]):
    """Global sample indices of (step, micro-batch) for this rank, from ``start`` on."""

    def __init__(self, config: TrainConfig, start: int, rank: int, world: int) -> None:
        self.c, self.start, self.rank, self.world = config, start, rank, world

    def __len__(self) -> int:
        return (self.c.steps - self.start) * self.c.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        b, acc = self.c.batch_size, self.c.grad_accum
        per_step = b * acc * self.world
        for step in range(self.start, self.c.steps):
            for micro in range(acc):
                lo = step * per_step + (micro * self.world + self.rank) * b
                yield list(range(lo, lo + b))


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(
            list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay
        )
        for e, p in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(p)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in _unwrap(model).state_dict().items()}


class Trainer:
    """One training run; ``run()`` trains and returns the final checkpoint path."""

    def __init__(self, config: TrainConfig, options: RunOptions) -> None:
        self.config, self.opt = config, options
        self.device = pick_device(options.device)
        self.out = Path(options.out)
        self.main = options.rank == 0
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
        ac = ddim.alphas_cumprod(config.beta_schedule, config.num_train_timesteps)
        self.alphas_cumprod = torch.tensor(ac, dtype=torch.float32, device=self.device)

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
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume {str(path)!r}: it was trained with other settings ({pairs}); "
                "pass the same settings, or --force to start over"
            )
        if ck.model is None or ck.optimizer is None:
            raise ArtifactError(f"{str(path)!r} has no optimizer state to resume from")
        model, ema, optim, _ = self._fresh()
        model.load_state_dict(ck.model)
        ema.load_state_dict(ck.ema)
        optim.load_state_dict(ck.optimizer)
        return model, ema, optim, ck.step

    def _save(self, model: torch.nn.Module, ema: UNet, optim: torch.optim.Optimizer,
              step: int) -> Path:
        ema_state = _state(ema)
        meta = build_meta(self.config, self.source, ema_state)
        ck = ckpt_io.Checkpoint(
            meta=meta, unet_config=self.unet_config, ema=ema_state, model=_state(model),
            optimizer=optim.state_dict(), step=step,
        )
        return ckpt_io.save(self.out / CHECKPOINT, ck)

    def _sample_grid(self, ema: UNet, step: int) -> Path:
        meta = build_meta(self.config, self.source, {})
        k = max(1, meta.num_classes)
        n = k * max(1, 16 // k) if k > 1 else 16
        images = reference.sample_images(
            ema, meta, n, self.opt.sample_steps, seed=0,
            guidance=2.0 if meta.conditional else None, device=self.device,
        )
        path = self.out / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        imgs.save_png(imgs.grid(images, nrow=k if k > 1 else None), path, scale=2)
        return path

    # -- the loop -----------------------------------------------------------------

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
        if self.main:
            self._trim_metrics(start)
            self._log(f"fewstep train: {c.preset} UNet, {count_parameters(model) / 1e6:.2f} M "
                      f"params, data={c.data} ({self.source.num_classes} classes), "
                      f"device={self.device}, steps {start}->{c.steps}")
        train_model: torch.nn.Module = model
        if o.world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if o.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        workers = o.workers if o.workers is not None else (
            min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0
        )
        loader = torch.utils.data.DataLoader(
            _Indexed(self.source), batch_sampler=_StepBatches(c, start, o.rank, o.world_size),
            num_workers=workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        batches = iter(loader)
        bar = self._progress(start)
        t_start = t_last = time.perf_counter()
        imgs_since = 0
        with _StopOnInterrupt(self._log) as stop:
            try:
                for step in range(start, c.steps):
                    loss = self._train_step(train_model, optim, batches, step)
                    _ema_update(ema, model, min(c.ema_decay, (1 + step) / (10 + step)))
                    imgs_since += c.batch_size * c.grad_accum * o.world_size
                    done = step + 1
                    if done % o.log_every == 0 or done == c.steps:
                        now = time.perf_counter()
                        rate = imgs_since / max(now - t_last, 1e-9)
                        t_last, imgs_since = now, 0
                        if not math.isfinite(loss):
                            raise FloatingPointError(
                                f"loss became {loss} at step {done}; lower --lr or check the data"
                            )
                        if self.main:
                            self._metric({"step": done, "loss": loss, "lr": lr_at(c, step),
                                          "images_per_s": rate})
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
                    if bar is not None:
                        bar.update(1)
                    last = done == c.steps or done == o.stop_after
                    if self.main and (done % o.checkpoint_every == 0 or last or stop.requested):
                        self._save(model, ema, optim, done)
                    if self.main and (done % o.sample_every == 0 or last):
                        self._sample_grid(ema, done)
                    if stop.requested:
                        self._log(f"stopped: checkpoint of step {done} saved to {path}; "
                                  "continue with --resume")
                        raise KeyboardInterrupt
                    if done == o.stop_after:
                        break
            finally:
                if bar is not None:
                    bar.close()
        if self.main:
            seconds = time.perf_counter() - t_start
            n = (o.stop_after or c.steps) - start
            rate = n / max(seconds, 1e-9)
            self._log(f"trained {n} steps in {seconds:.1f} s ({rate:.2f} steps/s, batch "
                      f"{c.batch_size * c.grad_accum * o.world_size}); checkpoint: {path}")
        return path

    def _train_step(self, model: torch.nn.Module, optim: torch.optim.Optimizer,
                    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], step: int) -> float:
        c, dev = self.config, self.device
        for group in optim.param_groups:
            group["lr"] = lr_at(c, step)
        optim.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(c.grad_accum):
            images, labels = next(batches)
            seed = step_seed(c.seed, step, self.opt.rank, micro)
            torch.manual_seed(seed)  # dropout
            gen = torch.Generator(device=dev).manual_seed(seed)
            x0 = torch.from_numpy(to_model_range(images.numpy())).to(dev, non_blocking=True)
            b = x0.shape[0]
            t = torch.randint(0, c.num_train_timesteps, (b,), device=dev, generator=gen)
            eps = torch.randn(x0.shape, device=dev, generator=gen)
            a_t = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = ddim.q_sample(x0, eps, a_t)
            target = ddim.target_for(c.prediction_type, x0, eps, a_t)
            lab = None
            if self.unet_config.num_classes:
                lab = labels.to(dev)
                drop = torch.rand((b,), device=dev, generator=gen) < c.cfg_dropout
                lab = torch.where(drop, torch.full_like(lab, self.unet_config.num_classes), lab)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(x_t, t.float(), lab)
            loss = F.mse_loss(out.float(), target) / c.grad_accum
            loss.backward()
            total += float(loss.detach())
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optim.step()
        return total

    # -- output -------------------------------------------------------------------

    def _progress(self, start: int) -> Any:
        if not (self.opt.progress and self.main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.steps, initial=start, desc="train", unit="step",
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def _log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def _metric(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, start: int) -> None:
        """Drop metric rows past the resumed step (they belong to the lost tail)."""
        path = self.out / METRICS
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and
                json.loads(ln).get("step", 0) <= start]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))


class _StopOnInterrupt:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self, log: Any) -> None:
        self.requested = False
        self._log = log
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("\nCtrl-C: saving after this step (press again to stop without saving)")

    def __enter__(self) -> _StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train(config: TrainConfig, options: RunOptions) -> Path:
    return Trainer(config, options).run()
