"""Progressive distillation: the loop behind ``fewstep distill``.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR
2022), Algorithm 2, on fewstep's discrete schedule. Round r trains a student sampler of
N steps to do in one DDIM step what its teacher does in two; the student's EMA becomes
the next round's teacher and N halves (64 → 32 → … → 1).

Notation (code name → symbol in the paper, where z_t = α_t x + σ_t ε, so that ``a`` =
ᾱ of runtime/ddim.py = α², α = √a, σ = √(1-a)):

=============== ========= ===========================================================
code            paper     meaning
=============== ========= ===========================================================
``t``           t         the student's timestep, ``timesteps(T, N)[i]``, i uniform
``t_mid``       t'        the teacher's intermediate timestep, ``timesteps(T, 2N)[2i+1]``
``a_t``         α²_t      ᾱ at t (``a_mid`` at t')
``a_next``      α²_t''    ᾱ at the student's next timestep (1.0 after the last step)
``z_t``         z_t       q_sample(x0, ε, a_t): the training input
``z_next``      z_t''     the teacher's result after two DDIM steps (η = 0)
``x_tilde``     x̃         the x0 that makes ONE student DDIM step from z_t land on z_t''
``c, d``                  x̃ = (z_t'' - c z_t) / d, c = σ_t''/σ_t, d = α_t'' - c α_t
=============== ========= ===========================================================

The grids must nest: the teacher's 2N-step timesteps must contain the student's N-step
ones as their even entries (true for ``trailing`` spacing, checked for every round).
The teacher's two steps are ``ddim.step`` (η = 0, the model's clip range). The student
outputs in the checkpoint's prediction type; the loss is the x0 error weighted by
max(SNR, 1) ("truncated SNR"; "snr+1" is exactly v-space MSE). The student starts from
the teacher's weights with a fresh AdamW (warm-up, then linear decay to 0 per round) and
an EMA, and keeps the teacher's label dropout, so its conditional and unconditional
outputs are both distilled. A teacher guided with W != 1 gives uncond + W (cond - uncond)
(the unconditional output where the label was dropped): the students' conditional
output is then already guided, recorded in ``train_config["distill"]``.

Every random draw of global step g depends only on (seed, g) and its images are the
global sample indices g·B … (g+1)·B - 1 (the same machinery as ``fit.py``), so
``--resume`` continues the current round exactly. Each finished round is a normal
fewstep checkpoint (``round_032.pt`` …) whose ModelMeta records ``distilled_steps=(N,)``,
``distilled_spacing`` and the round history in ``train_config["distill"]``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.runtime import __version__, checks, clitools, ddim, sampling
from fewstep.runtime.clitools import plural
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.fileio import atomic_path, write_text
from fewstep.runtime.meta import ModelMeta, Schedule

from . import checkpoint as ckpt_io
from .data import DataError, open_source, to_model_range
from .loop import (
    Indexed,
    StopOnInterrupt,
    TrainingDiverged,
    collate,
    cpu_state,
    ema_update,
    pick_device,
    step_seed,
)
from .unet import UNet, count_parameters

STATE = "distill.json"
METRICS = "metrics.jsonl"
STATE_FORMAT = "fewstep-distill"
STATE_VERSION = 1
DEFAULT_FROM_STEPS = 64
LOSS_WEIGHTINGS = ("truncated-snr", "snr+1")

A = Any  # a numpy array or a torch tensor (see runtime/ddim.py)


# ---------------------------------------------------------------------------------
# The math of one round (duck-typed over numpy and torch, like runtime/ddim.py)
# ---------------------------------------------------------------------------------


def halvings(from_steps: int, to_steps: int) -> tuple[int, ...]:
    """Student step counts from ``from_steps`` down to ``to_steps``: 64, 4 → (32, 16, 8, 4)."""
    checks.whole_number("from_steps", from_steps, 2)
    checks.whole_number("to_steps", to_steps, 1)
    if to_steps >= from_steps:
        raise ValueError(
            f"to_steps={to_steps} is not below from_steps={from_steps}: each round halves "
            "the step count; pass --to-steps < --from-steps"
        )
    chain = [from_steps]
    while chain[-1] % 2 == 0:
        chain.append(chain[-1] // 2)
    if to_steps not in chain:
        raise ValueError(
            f"to_steps={to_steps} is not reachable from from_steps={from_steps} by halving "
            f"({', '.join(map(str, chain))}); pass one of those"
        )
    return tuple(chain[1: chain.index(to_steps) + 1])


def check_nesting(schedule: Schedule, steps: int, spacing: str) -> None:
    """Refuse a (steps, spacing) whose 2N-step grid does not contain the N-step grid."""
    student = schedule.timesteps(steps, spacing)
    teacher = schedule.timesteps(2 * steps, spacing)
    if not np.array_equal(teacher[0::2], student):
        raise ValueError(
            f"spacing={spacing!r} does not nest for {steps} steps: the teacher's "
            f"{2 * steps}-step timesteps {teacher[:6].tolist()}... do not contain the student's "
            f"{student[:3].tolist()}... as every other entry; use spacing 'trailing'"
        )


@dataclass(frozen=True)
class RoundPlan:
    """Per student step i (N entries): the three timesteps and ᾱ values of one example."""

    steps: int
    t: tuple[int, ...]
    t_mid: tuple[int, ...]
    a_t: tuple[float, ...]
    a_mid: tuple[float, ...]
    a_next: tuple[float, ...]

    @classmethod
    def create(cls, schedule: Schedule, steps: int, spacing: str) -> RoundPlan:
        check_nesting(schedule, steps, spacing)
        ts2, a2_t, a2_prev = schedule.step_alphas(2 * steps, spacing)
        _, _, a_prev = schedule.step_alphas(steps, spacing)
        assert np.array_equal(a2_prev[1::2], a_prev), (a2_prev, a_prev)
        return cls(
            steps=steps,
            t=tuple(int(v) for v in ts2[0::2]), t_mid=tuple(int(v) for v in ts2[1::2]),
            a_t=tuple(float(v) for v in a2_t[0::2]), a_mid=tuple(float(v) for v in a2_t[1::2]),
            a_next=tuple(float(v) for v in a2_prev[1::2]),
        )


def target_coefficients(a_t: Any, a_next: Any) -> tuple[Any, Any]:
    """(c, d) with x̃ = (z_t'' - c z_t) / d: c = σ_t''/σ_t, d = α_t'' - c α_t."""
    c = ((1 - a_next) / (1 - a_t)) ** 0.5
    return c, a_next**0.5 - c * a_t**0.5


def distill_target(z_t: A, z_next: A, a_t: Any, a_next: Any) -> A:
    """x̃: the x0 for which one DDIM step (η = 0) from z_t at a_t lands exactly on z_next.

    One step from z_t with x0_pred = x̃ gives α'' x̃ + σ'' (z_t - α_t x̃) / σ_t; solving
    that for x̃ gives this (Salimans & Ho, appendix G). With a_next = 1 (after the last
    step) it is z_next itself. The student's step clips x0_pred to the data range (not
    ε), so the landing is exact when |x̃| <= clip_sample_range, which holds for all but
    the rare teacher trajectories that leave the range.
    """
    c, d = target_coefficients(a_t, a_next)
    return (z_next - c * z_t) / d


def loss_weight(a_t: Any, weighting: str = "truncated-snr") -> Any:
    """Weight of the x0-space squared error: max(SNR, 1) (truncated SNR) or SNR + 1.

    SNR + 1 is exactly v-space MSE; truncated SNR is within a factor 2 of it and is the
    paper's choice for distillation. Both stay finite at SNR = 0.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting={weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
    snr = a_t / (1 - a_t)
    if weighting == "snr+1":
        return snr + 1
    return (snr - 1).clip(0, None) + 1  # max(snr, 1), for numpy and torch alike


def teacher_two_steps(
    teacher: Callable[[A, A], A], z_t: A, t: A, t_mid: A, a_t: Any, a_mid: Any, a_next: Any,
    prediction_type: str, clip_sample_range: float | None,
) -> A:
    """z_t → z_t' → z_t'': two deterministic DDIM steps (``ddim.step``, η = 0) of the teacher.

    ``teacher(x, t)`` returns the network output (guided if the teacher is guided).
    """
    z_mid = ddim.step(teacher(z_t, t), z_t, a_t, a_mid, prediction_type=prediction_type,
                      clip_sample_range=clip_sample_range)
    return ddim.step(teacher(z_mid, t_mid), z_mid, a_mid, a_next,
                     prediction_type=prediction_type, clip_sample_range=clip_sample_range)


# ---------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillConfig:
    """Everything that decides the distilled weights (recorded in every round checkpoint).

    ``steps_per_round``: one count for every round, or one per round. ``from_steps``
    None = the checkpoint's distilled step count, else 64. ``cfg_dropout`` None = the
    teacher's training value. ``data`` None = the teacher's training data.
    """

    to_steps: int = 4
    from_steps: int | None = None
    steps_per_round: tuple[int, ...] = (1500,)
    batch_size: int = 256
    lr: float = 2e-4
    warmup_steps: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    teacher_guidance: float = 1.0
    cfg_dropout: float | None = None
    spacing: str = "trailing"
    loss_weighting: str = "truncated-snr"
    data: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks.choice("spacing", self.spacing, ddim.SPACINGS)
        checks.choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if not self.steps_per_round or any(
                not checks.is_whole_number(s) or s < 1 for s in self.steps_per_round):
            raise ValueError(f"steps_per_round={self.steps_per_round!r}: pass whole numbers >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1); try 2e-4")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps and grad_clip must be >= 0")
        if not (math.isfinite(self.teacher_guidance) and 0 <= self.teacher_guidance <= 50):
            raise ValueError(f"teacher_guidance={self.teacher_guidance} must be in [0, 50]; "
                             "1 = the plain conditional teacher")
        if self.cfg_dropout is not None and not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.from_steps is not None:
            halvings(self.from_steps, self.to_steps)

    def rounds(self) -> tuple[int, ...]:
        assert self.from_steps is not None, "resolve from_steps first (Distiller does)"
        return halvings(self.from_steps, self.to_steps)

    def round_steps(self) -> tuple[int, ...]:
        """Optimizer steps of every round (checks the length of ``steps_per_round``)."""
        rounds = self.rounds()
        if len(self.steps_per_round) == 1:
            return self.steps_per_round * len(rounds)
        if len(self.steps_per_round) != len(rounds):
            raise ValueError(
                f"{len(self.steps_per_round)} values for steps_per_round but "
                f"{len(rounds)} rounds ({' -> '.join(map(str, (self.from_steps, *rounds)))}); "
                "pass one value, or one per round"
            )
        return self.steps_per_round

    def result_fields(self) -> dict[str, Any]:
        """What a resumed run must share with the saved state (all but steps_per_round)."""
        d = dataclasses.asdict(self)
        d.pop("steps_per_round")
        return d


@dataclass(frozen=True)
class DistillOptions:
    """How to run: none of these change the result."""

    out: Path = Path("runs/distill")
    device: str = "auto"
    workers: int | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    resume: bool = False
    force: bool = False
    progress: bool = True
    stop_at_round: int | None = None  # stop once the round that makes this step count is done
    stop_after: int | None = None  # stop (saving) once this many steps of all rounds are done


def lr_at(config: DistillConfig, step: int, steps: int) -> float:
    """Per round: linear warm-up, then linear decay towards 0 at the round's last step."""
    warm = min(config.warmup_steps, max(steps - 1, 0))
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * (steps - step) / max(1, steps - warm)


def round_name(steps: int, partial: bool = False) -> str:
    return f"round_{steps:03d}{'.partial' if partial else ''}.pt"


class _GlobalBatches(torch.utils.data.Sampler[list[int]]):
    """Sample indices of global steps ``start`` … ``stop - 1``: step g → g·B … (g+1)·B - 1."""

    def __init__(self, start: int, stop: int, batch: int) -> None:
        self.start, self.stop, self.batch = start, stop, batch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for g in range(self.start, self.stop):
            yield list(range(g * self.batch, (g + 1) * self.batch))


# ---------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------


class Distiller:
    """One distillation run over all rounds; ``run()`` returns the finished round files."""

    def __init__(self, checkpoint: str | os.PathLike[str], config: DistillConfig,
                 options: DistillOptions) -> None:
        self.source_path = Path(checkpoint)
        self.opt = options
        self.out = Path(options.out)
        base = ckpt_io.load(self.source_path)
        meta = base.meta
        self.base, self.meta = base, meta
        prior = meta.train_config.get("distill") if isinstance(meta.train_config, dict) else None
        self.prior: dict[str, Any] = dict(prior) if isinstance(prior, dict) else {}
        if config.from_steps is None:
            config = dataclasses.replace(
                config, from_steps=meta.distilled_steps[-1] if meta.distilled_steps
                else DEFAULT_FROM_STEPS)
        assert config.from_steps is not None
        if meta.distilled_steps and config.from_steps not in meta.distilled_steps:
            raise ValueError(
                f"{str(self.source_path)!r} was distilled for {meta.distilled_steps[-1]} steps; "
                f"as a teacher it must run at that count: pass --from-steps "
                f"{meta.distilled_steps[-1]}, not {config.from_steps}"
            )
        if config.teacher_guidance != 1.0 and not meta.conditional:
            raise ValueError(
                f"teacher_guidance={config.teacher_guidance:g} needs a class-conditional "
                f"teacher; {str(self.source_path)!r} has no classes: drop --teacher-guidance"
            )
        prior_w = float(self.prior.get("teacher_guidance", 1.0))
        if config.teacher_guidance != 1.0 and prior_w != 1.0:
            raise ValueError(
                f"{str(self.source_path)!r} was distilled from a teacher guided with "
                f"{prior_w:g}: its outputs are guided already; pass --teacher-guidance 1")
        self.baked_guidance = config.teacher_guidance if config.teacher_guidance != 1.0 else prior_w
        T = meta.schedule.num_train_timesteps
        if config.from_steps > T:
            raise ValueError(f"from_steps={config.from_steps} exceeds num_train_timesteps={T}; "
                             f"pass --from-steps <= {T}")
        if config.cfg_dropout is None:
            config = dataclasses.replace(
                config, cfg_dropout=float(meta.train_config.get("cfg_dropout", 0.1))
                if meta.conditional else 0.0)
        if config.data is None:
            config = dataclasses.replace(config, data=str(meta.train_config.get("data", "")))
        self.config = config
        self.rounds = config.rounds()
        self.round_steps = config.round_steps()
        self.plans = [RoundPlan.create(meta.schedule, n, config.spacing) for n in self.rounds]
        if not config.data:
            raise ValueError(f"{str(self.source_path)!r} does not record its training data; "
                             "pass --data landscapes or --data FOLDER")
        seed = int(meta.train_config.get("seed", 0))
        try:
            self.source = open_source(config.data, meta.height, seed)
        except DataError as e:
            raise ValueError(str(e)) from None
        if meta.conditional and self.source.num_classes != meta.num_classes:
            raise ValueError(
                f"data {config.data!r} has {self.source.num_classes} classes but the teacher "
                f"has {meta.num_classes}; pass the data the teacher was trained on (--data)"
            )
        if options.stop_at_round is not None and options.stop_at_round not in self.rounds:
            raise ValueError(f"stop_at_round={options.stop_at_round} is not one of the rounds' "
                             f"step counts {list(self.rounds)}")
        self.device = pick_device(options.device)
        self.unet_config = dataclasses.replace(base.unet_config, dropout=0.0)

    # -- files --------------------------------------------------------------------------

    def _root_hash(self) -> str:
        return str(self.prior.get("teacher_source_hash") or self.meta.source_hash)

    def _state_dict(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "teacher": {"path": str(self.source_path), "source_hash": self.meta.source_hash},
            "config": dataclasses.asdict(self.config), "rounds": history,
        }

    def _write_state(self, history: list[dict[str, Any]]) -> None:
        write_text(self.out / STATE, json.dumps(self._state_dict(history), indent=1) + "\n")

    def _read_state(self) -> list[dict[str, Any]]:
        path = self.out / STATE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{str(path)!r} is not a readable distillation state ({e}); "
                                "pass --force to start over") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ArtifactError(f"{str(path)!r} is not a fewstep distillation state; "
                                "pass --force to start over")
        if state.get("teacher", {}).get("source_hash") != self.meta.source_hash:
            raise ValueError(
                f"cannot resume {str(self.out)!r}: it distils another teacher "
                f"({state.get('teacher', {}).get('path')!r}); pass that checkpoint, or --force"
            )
        saved, mine = state.get("config", {}), self.config.result_fields()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            pairs = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {str(self.out)!r}: it was started with other "
                             f"settings ({pairs}); pass the same settings, or --force")
        history: list[dict[str, Any]] = list(state.get("rounds", []))
        for entry, n in zip(history, self.rounds, strict=False):
            if entry.get("to") != n:
                raise ArtifactError(f"{str(path)!r} is inconsistent (round {entry} where "
                                    f"{n} steps were expected); pass --force to start over")
            if not (self.out / entry["checkpoint"]).is_file():
                raise ArtifactError(f"{str(self.out / entry['checkpoint'])!r} of a finished "
                                    "round is missing; pass --force to start over")
        return history[: len(self.rounds)]

    def _clear(self) -> None:
        """--force: remove what an earlier run of this command wrote into out/."""
        for p in self.out.glob("round_*.pt"):
            p.unlink()
        for name in (STATE, METRICS):
            (self.out / name).unlink(missing_ok=True)

    def _meta(self, ema: dict[str, torch.Tensor], steps: int, history: list[dict[str, Any]],
              complete: bool) -> ModelMeta:
        tc = dict(self.meta.train_config)
        w = self.baked_guidance
        tc["distill"] = {
            "method": "progressive distillation (Salimans & Ho 2022, Algorithm 2)",
            "teacher_source_hash": self._root_hash(),
            "teacher_guidance": w,
            # The student's conditional output is the guided teacher's: sample it with
            # guidance None (or 1.0); guidance g on top acts roughly like g * w.
            "sample_guidance": 1.0 if w != 1.0 else None,
            "spacing": self.config.spacing,
            "loss_weighting": self.config.loss_weighting,
            "cfg_dropout": self.config.cfg_dropout,
            "rounds": list(self.prior.get("rounds", [])) + history,
            "config": dataclasses.asdict(self.config),
            "complete": complete,
        }
        return dataclasses.replace(
            self.meta, distilled_steps=(steps,), distilled_spacing=self.config.spacing,
            train_config=tc, source_hash=ckpt_io.weights_hash(ema), fewstep_version=__version__)

    # -- the loop -----------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def _metric(self, row: dict[str, Any]) -> None:
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, done: set[int], current: int, start: int) -> None:
        path = self.out / METRICS
        if not path.exists():
            return
        keep = []
        for ln in path.read_text(encoding="utf-8").splitlines():
            if not ln.strip():
                continue
            row = json.loads(ln)
            if row.get("to") in done or (row.get("to") == current and row.get("step", 0) <= start):
                keep.append(ln)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _teacher_fn(self, teacher: UNet, labels: torch.Tensor | None) -> Callable[[A, A], A]:
        w, null = self.config.teacher_guidance, self.meta.null_label
        dev = self.device

        def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                if w == 1.0 or labels is None:
                    plain: torch.Tensor = teacher(x, t.float(), labels)
                    return plain.float()
                out: torch.Tensor = teacher(torch.cat([x, x]), torch.cat([t, t]).float(),
                                            torch.cat([labels, torch.full_like(labels, null)]))
            cond, uncond = out.float().chunk(2)
            guided: torch.Tensor = sampling.guided(cond, uncond, w)  # uncond where label is null
            return guided

        return run

    def _step(self, student: torch.nn.Module, teacher: UNet, optim: torch.optim.Optimizer,
              batch: tuple[torch.Tensor, torch.Tensor], plan: RoundPlan, tables: dict[str, Any],
              g: int, lr: float) -> float:
        c, dev, meta = self.config, self.device, self.meta
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad(set_to_none=True)
        images, labels = batch
        seed = step_seed(c.seed, g, 0)
        torch.manual_seed(seed)
        gen = torch.Generator(device=dev).manual_seed(seed)
        x0 = torch.from_numpy(to_model_range(images.numpy())).to(dev, non_blocking=True)
        b = x0.shape[0]
        i = torch.randint(0, plan.steps, (b,), device=dev, generator=gen)
        eps = torch.randn(x0.shape, device=dev, generator=gen)
        lab = None
        if meta.conditional:
            lab = labels.to(dev)
            drop = torch.rand((b,), device=dev, generator=gen) < (c.cfg_dropout or 0.0)
            lab = torch.where(drop, torch.full_like(lab, meta.null_label), lab)
        t, t_mid = tables["t"][i], tables["t_mid"][i]  # (B,)
        a64 = {k: tables[k][i].view(-1, 1, 1, 1) for k in ("a_t", "a_mid", "a_next")}
        a32 = {k: v.float() for k, v in a64.items()}
        z_t = ddim.q_sample(x0, eps, a32["a_t"])
        with torch.no_grad():
            z_next = teacher_two_steps(
                self._teacher_fn(teacher, lab), z_t, t, t_mid, a32["a_t"], a32["a_mid"],
                a32["a_next"], meta.prediction_type, meta.schedule.clip_sample_range)
            x_tilde = distill_target(z_t, z_next, a64["a_t"], a64["a_next"]).float()
            weight = loss_weight(a64["a_t"], c.loss_weighting).float()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = student(z_t, t.float(), lab)
        x0_pred, _ = ddim.split_prediction(out.float(), z_t, a32["a_t"], meta.prediction_type)
        loss = (weight * (x0_pred - x_tilde) ** 2).mean()
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), c.grad_clip)
        optim.step()
        return float(loss.detach())

    def _tables(self, plan: RoundPlan) -> dict[str, torch.Tensor]:
        dev = self.device
        out = {k: torch.tensor(getattr(plan, k), dtype=torch.float64, device=dev)
               for k in ("a_t", "a_mid", "a_next")}
        out["t"] = torch.tensor(plan.t, dtype=torch.int64, device=dev)
        out["t_mid"] = torch.tensor(plan.t_mid, dtype=torch.int64, device=dev)
        return out

    def _fresh_student(self, teacher_state: dict[str, torch.Tensor]
                       ) -> tuple[UNet, UNet, torch.optim.Optimizer]:
        student = UNet(self.unet_config)
        student.load_state_dict(teacher_state)
        student = student.to(self.device).train()
        ema = copy.deepcopy(student).eval().requires_grad_(False)
        optim = torch.optim.AdamW(student.parameters(), lr=self.config.lr, weight_decay=0.0)
        return student, ema, optim

    def _teacher(self, state: dict[str, torch.Tensor]) -> UNet:
        teacher = UNet(self.base.unet_config)
        teacher.load_state_dict(state)
        return teacher.to(self.device).eval().requires_grad_(False)

    def _progress(self, desc: str, total: int, initial: int) -> Any:
        if not self.opt.progress:
            return None
        return clitools.terminal_bar(total=total, initial=initial, desc=desc, unit="step")

    def _start(self) -> tuple[list[dict[str, Any]], int, ckpt_io.Checkpoint | None]:
        """(finished rounds, step to resume the current round at, its partial checkpoint)."""
        o = self.opt
        self.out.mkdir(parents=True, exist_ok=True)
        history: list[dict[str, Any]] = []
        if (self.out / STATE).exists():
            if o.force:
                self._clear()
            elif not o.resume:
                raise ValueError(f"{str(self.out)!r} already holds a distillation ({STATE}); "
                                 "pass --resume to continue it or --force to start over")
            else:
                history = self._read_state()
        elif o.force:
            self._clear()
        r0 = len(history)
        if r0 == len(self.rounds) or not o.resume:
            return history, 0, None
        n0 = self.rounds[r0]
        partial = self.out / round_name(n0, partial=True)
        if not partial.exists():
            return history, 0, None
        ck = ckpt_io.load(partial)
        extra = ck.extra or {}
        if extra.get("round_to") != n0 or ck.model is None or not ck.optimizer:
            raise ArtifactError(f"{str(partial)!r} is not a partial round of {n0} steps; "
                                "delete it or pass --force")
        if extra.get("round_steps") != self.round_steps[r0]:
            raise ValueError(
                f"the partial round {2 * n0}->{n0} in {str(self.out)!r} was started with "
                f"{extra.get('round_steps')} steps, now {self.round_steps[r0]}; pass the same "
                "--steps-per-round for it")
        return history, ck.step, ck

    def run(self) -> list[Path]:
        c, o = self.config, self.opt
        history, start, resume_ck = self._start()
        r0 = len(history)
        done_paths = [self.out / h["checkpoint"] for h in history]
        if r0 == len(self.rounds):
            self._log(f"nothing to do: {str(self.out)!r} already holds every round "
                      f"({', '.join(p.name for p in done_paths)})")
            return done_paths
        last_round = len(self.rounds) if o.stop_at_round is None else (
            self.rounds.index(o.stop_at_round) + 1)
        if r0 >= last_round:
            self._log(f"nothing to do: the rounds down to {o.stop_at_round} steps are finished "
                      f"in {str(self.out)!r}; drop --stop-at-round to go on")
            return done_paths
        if r0 == 0:
            teacher_state = self.base.ema
        else:
            prev = ckpt_io.load(done_paths[-1])
            if prev.meta.source_hash != history[-1].get("source_hash"):
                raise ArtifactError(f"{str(done_paths[-1])!r} changed since its round finished; "
                                    "pass --force to start over")
            teacher_state = prev.ema
        self._trim_metrics({h["to"] for h in history}, self.rounds[r0], start)
        # Global steps: round r covers offsets[r - r0] ... offsets[r - r0 + 1] - 1.
        offsets = [sum(h["steps"] for h in history)]
        for s in self.round_steps[r0:]:
            offsets.append(offsets[-1] + s)
        g_stop = offsets[last_round - r0]
        if o.stop_after is not None:
            g_stop = min(g_stop, o.stop_after)
        workers = o.workers if o.workers is not None else (
            min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(
            Indexed(self.source),
            batch_sampler=_GlobalBatches(offsets[0] + start, g_stop, c.batch_size),
            num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if workers else None,
        )
        batches = iter(loader)
        self._announce(r0, start)
        t_run, steps_run = time.perf_counter(), 0
        with StopOnInterrupt(self._log) as stop:
            for r in range(r0, last_round):
                if offsets[r - r0] >= g_stop:
                    break
                t_round = time.perf_counter()
                k0 = start if r == r0 else 0
                student, ema, optim = self._fresh_student(teacher_state)
                if resume_ck is not None and r == r0:
                    student.load_state_dict(resume_ck.model or {})
                    ema.load_state_dict(resume_ck.ema)
                    optim.load_state_dict(resume_ck.optimizer or {})
                k, loss = self._train_round(r, self._teacher(teacher_state), student, ema, optim,
                                            batches, k0, offsets[r - r0], g_stop, history, stop)
                steps_run += k - k0
                if k < self.round_steps[r]:  # stopped inside the round (saved)
                    if stop.requested:
                        self._log(f"stopped: round {2 * self.rounds[r]}->{self.rounds[r]} saved "
                                  f"at step {k}; continue with --resume")
                        raise KeyboardInterrupt
                    break
                teacher_state = cpu_state(ema)
                done_paths.append(self._finish_round(r, teacher_state, loss, k0, t_round,
                                                     history))
                if stop.requested:
                    self._log("stopped after a finished round; continue with --resume")
                    raise KeyboardInterrupt
        seconds = time.perf_counter() - t_run
        self._log(f"distilled {plural(steps_run, 'step')} in {seconds:.1f} s "
                  f"({steps_run / max(seconds, 1e-9):.2f} steps/s); finished rounds: "
                  f"{', '.join(p.name for p in done_paths) or 'none'}")
        return done_paths

    def _announce(self, r0: int, start: int) -> None:
        c = self.config
        n_params = count_parameters(UNet(self.unet_config)) / 1e6
        passes = 2 if c.teacher_guidance == 1.0 else 4
        chain = " -> ".join(map(str, (c.from_steps, *self.rounds)))
        n0 = self.rounds[r0]
        self._log(
            f"fewstep distill: {str(self.source_path)!r} ({n_params:.2f} M params, "
            f"{self.meta.prediction_type}, {self.meta.num_classes} classes), rounds {chain}, "
            f"steps per round {list(self.round_steps)}, batch {c.batch_size}, teacher guidance "
            f"{c.teacher_guidance:g} ({passes} teacher passes + student fwd/bwd per step), "
            f"device {self.device}" + (f"; resuming round {2 * n0}->{n0} at step {start}"
                                       if start or r0 else ""))
        if self.meta.prediction_type == "epsilon":
            self._log("warning: an epsilon-prediction student is unstable at low SNR (Salimans "
                      "& Ho, section 4); v_prediction or sample teachers distil better")

    def _train_round(self, r: int, teacher: UNet, student: UNet, ema: UNet,
                     optim: torch.optim.Optimizer, batches: Iterator[Any], k0: int, offset: int,
                     g_stop: int, history: list[dict[str, Any]], stop: StopOnInterrupt
                     ) -> tuple[int, float]:
        """Steps k0 … of round r (until its end, g_stop or Ctrl-C); (steps done, last loss)."""
        c, o = self.config, self.opt
        n, steps_r, plan = self.rounds[r], self.round_steps[r], self.plans[r]
        tables = self._tables(plan)
        bar = self._progress(f"{2 * n}->{n}", steps_r, k0)
        t_last, since, loss, k_done = time.perf_counter(), 0, float("nan"), k0
        try:
            for k in range(k0, min(steps_r, g_stop - offset)):
                g = offset + k
                loss = self._step(student, teacher, optim, next(batches), plan, tables, g,
                                  lr_at(c, k, steps_r))
                ema_update(ema, student, min(c.ema_decay, (1 + k) / (10 + k)))
                k_done, since = k + 1, since + 1
                if k_done % o.log_every == 0 or k_done == steps_r:
                    now = time.perf_counter()
                    rate, t_last, since = since / max(now - t_last, 1e-9), now, 0
                    if not math.isfinite(loss):
                        raise TrainingDiverged(f"distillation diverged: loss became {loss} at "
                                               f"step {k_done} of round {2 * n}->{n}; lower "
                                               "--lr or check the teacher")
                    self._metric({"to": n, "step": k_done, "loss": loss,
                                  "lr": lr_at(c, k, steps_r), "steps_per_s": rate})
                    if bar is None:
                        self._log(f"{2 * n}->{n} step {k_done}/{steps_r} loss {loss:.5f} "
                                  f"{rate:.2f} steps/s")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    bar.update(1)
                unfinished = k_done < steps_r
                if unfinished and (k_done % o.checkpoint_every == 0 or stop.requested
                                   or g + 1 == g_stop):
                    self._save_partial(student, ema, optim, n, k_done, steps_r, history)
                if stop.requested and unfinished:
                    break
        finally:
            if bar is not None:
                bar.close()
        return k_done, loss

    def _finish_round(self, r: int, ema_state: dict[str, torch.Tensor], loss: float, k0: int,
                      t_round: float, history: list[dict[str, Any]]) -> Path:
        """Write round_NNN.pt (EMA weights, full metadata) and the state; drop the partial."""
        n, steps_r = self.rounds[r], self.round_steps[r]
        seconds = time.perf_counter() - t_round
        entry = {"from": 2 * n, "to": n, "steps": steps_r, "batch_size": self.config.batch_size,
                 "seconds": round(seconds, 2), "final_loss": loss, "checkpoint": round_name(n),
                 "source_hash": ckpt_io.weights_hash(ema_state)}
        meta = self._meta(ema_state, n, [*history, entry], complete=True)
        path = ckpt_io.save(self.out / round_name(n), ckpt_io.Checkpoint(
            meta=meta, unet_config=self.unet_config, ema=ema_state, step=steps_r,
            extra={"round_to": n, "round_steps": steps_r}))
        history.append(entry)
        self._write_state(history)
        (self.out / round_name(n, partial=True)).unlink(missing_ok=True)
        ran = steps_r - k0
        self._log(f"round {2 * n}->{n}: {ran} steps in {seconds:.1f} s "
                  f"({ran / max(seconds, 1e-9):.2f} steps/s), final loss {loss:.5f} -> {path}")
        return path

    def _save_partial(self, student: torch.nn.Module, ema: UNet, optim: torch.optim.Optimizer,
                      n: int, step: int, steps_r: int, history: list[dict[str, Any]]) -> Path:
        ema_state = cpu_state(ema)
        meta = self._meta(ema_state, n, history, complete=False)
        path = ckpt_io.save(self.out / round_name(n, partial=True), ckpt_io.Checkpoint(
            meta=meta, unet_config=self.unet_config, ema=ema_state, model=cpu_state(student),
            optimizer=optim.state_dict(), step=step,
            extra={"round_to": n, "round_steps": steps_r}))
        self._write_state(history)
        return path


def distill(checkpoint: str | os.PathLike[str], config: DistillConfig,
            options: DistillOptions) -> list[Path]:
    return Distiller(checkpoint, config, options).run()
