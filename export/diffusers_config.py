"""A diffusers scheduler config (``scheduler_config.json``) as a fewstep ``Schedule``.

``DDIMScheduler`` and ``DDPMScheduler`` configs map option by option (DDIM sampling of
a DDPM-trained model is the common case; a DDPM config has no ``set_alpha_to_one``:
its final alpha is 1.0). Anything fewstep cannot reproduce exactly — another scheduler
class, dynamic thresholding, a beta schedule or variance type it does not have, an
option it does not know — is one ``ArtifactError`` naming the field and its value.
diffusers itself is not needed: a config is JSON, read here as hostile input (size
cap, strict JSON, every field's type checked, values printed inert).

=========================== ================================================================
diffusers option            fewstep
=========================== ================================================================
``num_train_timesteps``     ``Schedule.num_train_timesteps`` (1..100000)
``beta_schedule``           ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``
``beta_start``/``beta_end`` the same
``trained_betas``           ``Schedule.trained_betas`` (one per timestep, each in (0, 1))
``rescale_betas_zero_snr``  ``Schedule.rescale_zero_terminal_snr`` (not with ``epsilon``)
``prediction_type``         ``epsilon``, ``v_prediction``, ``sample``
``timestep_spacing``        ``Schedule.timestep_spacing``: the model's default spacing
``steps_offset``            the same (leading spacing only, as in diffusers)
``set_alpha_to_one``        the same (DDIM; a DDPM config means true)
``clip_sample`` + range     ``Schedule.clip_sample_range`` (None when not clipping)
``thresholding``            false only
``variance_type``           DDPM: the ``fixed_*`` kinds, which DDIM sampling does not use
=========================== ================================================================

A DDIMScheduler config records ``prev_rule="ratio"``: each step goes to ``t - T //
steps``, the previous timestep ``DDIMScheduler.step`` takes; a DDPMScheduler config
steps to the next entry of the sequence, as ``DDPMScheduler.previous_timestep`` (and
fewstep's own models) do. The two differ for trailing and linspace spacing when
``T / steps`` is not whole (see runtime/ddim.py).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fewstep.runtime import ddim
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import MAX_TRAIN_TIMESTEPS, Schedule

SCHEDULER_CLASSES: Final = ("DDIMScheduler", "DDPMScheduler")
# A config with 100000 trained betas is about 2.5 MB of JSON.
MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024

# diffusers' defaults for an option a config leaves out (DDIMScheduler.__init__ and
# DDPMScheduler.__init__; tests/test_schedule_diffusers.py checks them against diffusers).
DEFAULTS: Final[Mapping[str, Any]] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",
}
OPTIONS: Final[Mapping[str, frozenset[str]]] = {
    "DDIMScheduler": frozenset(DEFAULTS) - {"variance_type"},
    "DDPMScheduler": frozenset(DEFAULTS) - {"set_alpha_to_one"},
}
# DDPM's variance kinds that only shape DDPM's own ancestral noise: DDIM sampling never
# reads them. The learned kinds make the network output twice the channels.
FIXED_VARIANCE_TYPES: Final = ("fixed_small", "fixed_small_log", "fixed_large",
                               "fixed_large_log")
# Keys of old configs that never changed sampling: the array library of early releases.
INERT_KEYS: Final = frozenset({"tensor_format"})


@dataclass(frozen=True)
class DiffusersSchedule:
    """What a scheduler config says about a model: its schedule and prediction type."""

    schedule: Schedule
    prediction_type: str
    scheduler_class: str
    # The validated config itself (diffusers' ``DDIMScheduler.from_config`` rebuilds the
    # scheduler from it: the benchmark's diffusers loop).
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)


def _show(value: object) -> str:
    """``repr(value)`` on one line, elided in the middle past 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:28]}...{text[-28:]} ({len(text)} chars)"


class _Reader:
    """Typed access to one config's fields; every failure is one ArtifactError."""

    def __init__(self, config: Mapping[str, Any], source: str, cls: str) -> None:
        self.config = config
        self.source = source
        self.cls = cls

    def fail(self, key: str, message: str) -> ArtifactError:
        value = self.config.get(key, DEFAULTS.get(key))
        return ArtifactError(f"{self.source}: {key}={_show(value)} {message}")

    def get(self, key: str) -> Any:
        return self.config.get(key, DEFAULTS[key])

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.fail(key, "is not true or false; write true or false")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"is not a whole number in {low}..{high}")
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "is not a number")
        try:
            out = float(value)
        except OverflowError:
            raise self.fail(key, "is too large for a number (float64)") from None
        if not math.isfinite(out):
            raise self.fail(key, "is not finite")
        return out

    def choice(self, key: str, allowed: tuple[str, ...], why: str = "") -> str:
        value = self.get(key)
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(key, f"cannot be reproduced by fewstep{why}; use one of "
                            f"{', '.join(allowed)}")
        return value


def schedule_from_config(config: object, source: str = "scheduler config",
                         scheduler_class: str | None = None) -> DiffusersSchedule:
    """The ``Schedule`` and prediction type of a DDIMScheduler/DDPMScheduler config: the
    parsed ``scheduler_config.json`` (its ``_class_name`` names the class), or
    ``scheduler.config`` with ``scheduler_class`` (see ``schedule_from_scheduler``).

    Raises ArtifactError naming the field and its value for anything fewstep cannot
    reproduce exactly.
    """
    if not isinstance(config, Mapping):
        raise ArtifactError(f"{source}: a scheduler config is a JSON object, not "
                            f"{type(config).__name__}")
    if not all(isinstance(k, str) for k in config):
        raise ArtifactError(f"{source}: a scheduler config has text keys only")
    cls = config.get("_class_name", scheduler_class)
    if scheduler_class is not None and cls != scheduler_class:
        raise ArtifactError(f"{source}: _class_name={_show(cls)} but the scheduler is a "
                            f"{_show(scheduler_class)}; pass that scheduler's own config")
    if cls not in SCHEDULER_CLASSES:
        shown = " missing" if cls is None else f"={_show(cls)}"
        raise ArtifactError(
            f"{source}: _class_name{shown}: fewstep reproduces {' and '.join(SCHEDULER_CLASSES)} "
            "configs only; pass the config of a DDIMScheduler with the model's training "
            "schedule (e.g. DDIMScheduler.from_config(config).save_config(folder))"
        )
    assert isinstance(cls, str)
    r = _Reader(config, source, cls)
    for key in config:
        if key.startswith("_") or key in INERT_KEYS:
            continue
        if key not in OPTIONS[cls]:
            raise r.fail(key, f"is not a {cls} option fewstep can reproduce (it reproduces "
                         f"{', '.join(sorted(OPTIONS[cls]))}); remove it or use a "
                         f"{cls} config")

    if r.boolean("thresholding"):
        raise r.fail("thresholding", "cannot be reproduced by fewstep (dynamic thresholding "
                     "is not part of its sampler); use thresholding=false, with clip_sample "
                     "if the data range needs it")
    r.number("dynamic_thresholding_ratio")  # unused without thresholding, but checked
    r.number("sample_max_value")
    if cls == "DDPMScheduler":
        r.choice("variance_type", FIXED_VARIANCE_TYPES,
                 " (a learned variance doubles the network's output channels)")
    prediction_type = r.choice("prediction_type", ddim.PREDICTION_TYPES)
    beta_schedule = r.choice("beta_schedule", ddim.BETA_SCHEDULES)
    spacing = r.choice("timestep_spacing", ddim.SPACINGS)
    num_train_timesteps = r.integer("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS)
    steps_offset = r.integer("steps_offset", 0, num_train_timesteps - 1)
    beta_start, beta_end = r.number("beta_start"), r.number("beta_end")
    rescale = r.boolean("rescale_betas_zero_snr")
    set_alpha_to_one = r.boolean("set_alpha_to_one") if cls == "DDIMScheduler" else True
    clip_range = r.number("clip_sample_range")
    clip = r.boolean("clip_sample")
    if clip and not clip_range > 0:
        raise r.fail("clip_sample_range", "must be > 0 with clip_sample=true")

    trained = r.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained
        ):
            raise r.fail("trained_betas", "is not null or a list of numbers")
        try:
            ddim.check_trained_betas(trained, num_train_timesteps)
        except (ValueError, OverflowError) as e:
            raise ArtifactError(f"{source}: {e}") from None
    elif beta_schedule != "squaredcos_cap_v2" and not 0 < beta_start <= beta_end < 1:
        raise r.fail("beta_start", f"and beta_end={_show(r.get('beta_end'))} must satisfy "
                     "0 < beta_start <= beta_end < 1")
    if rescale and prediction_type == "epsilon":
        raise r.fail("rescale_betas_zero_snr", "cannot be sampled with prediction_type="
                     "'epsilon' (no x0 can be recovered at zero terminal SNR); a zero-SNR "
                     "model predicts v_prediction or sample")
    if rescale and num_train_timesteps < 2:
        raise r.fail("rescale_betas_zero_snr", "needs num_train_timesteps >= 2")
    try:
        schedule = Schedule(
            beta_schedule=beta_schedule,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            rescale_zero_terminal_snr=rescale,
            set_alpha_to_one=set_alpha_to_one,
            clip_sample_range=clip_range if clip else None,
            steps_offset=steps_offset,
            trained_betas=tuple(float(b) for b in trained) if trained is not None else (),
            timestep_spacing=spacing,
            # The previous timestep the model's own scheduler steps to: t - T // steps in
            # DDIMScheduler.step, the next entry in DDPMScheduler.previous_timestep.
            prev_rule="ratio" if cls == "DDIMScheduler" else "next",
        )
    except ArtifactError as e:  # a combination the checks above did not foresee
        raise ArtifactError(f"{source}: {e}") from None
    return DiffusersSchedule(schedule, prediction_type, cls, dict(config))


def schedule_from_scheduler(scheduler: object) -> DiffusersSchedule:
    """``schedule_from_config`` of a diffusers scheduler object (diffusers is not imported:
    its class name and ``config`` mapping are read)."""
    config = getattr(scheduler, "config", None)
    return schedule_from_config(config, source=f"{type(scheduler).__name__}.config",
                                scheduler_class=type(scheduler).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_config(path: str | os.PathLike[str]) -> object:
    """The parsed JSON of a config file: a regular file of at most ``MAX_CONFIG_BYTES``,
    strict JSON (no NaN/Infinity). Raises ArtifactError with one line otherwise."""
    p = Path(path)
    shown = _show(str(p))
    try:
        st = p.stat()
    except OSError as e:
        raise ArtifactError(f"scheduler config {shown} cannot be read ({e.strerror}); "
                            "pass the path of a scheduler_config.json") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"scheduler config {shown} is not a regular file; pass the path "
                            "of a scheduler_config.json")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ArtifactError(f"scheduler config {shown} has {st.st_size} bytes, more than "
                            f"{MAX_CONFIG_BYTES} a scheduler config can have; pass a "
                            "scheduler_config.json")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"scheduler config {shown} cannot be read ({e.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:  # grew since stat
        raise ArtifactError(f"scheduler config {shown} is larger than {MAX_CONFIG_BYTES} "
                            "bytes; pass a scheduler_config.json")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"scheduler config {shown} is not valid JSON "
                            f"({_show(str(e))[1:-1]})") from None


def load_scheduler_config(path: str | os.PathLike[str]) -> DiffusersSchedule:
    """``schedule_from_config`` of a ``scheduler_config.json`` file."""
    return schedule_from_config(read_config(path), source=_show(str(path)))
