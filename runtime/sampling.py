"""The DDIM sampling loop, written once for numpy, torch and tracing.

``SamplingPlan`` fixes everything about a loop that does not depend on the images
(timesteps, ᾱ pairs, η, the start step for img2img); ``run_loop`` walks it with a
caller-supplied ``denoise(x, i)``. The runtime's host path calls it with numpy and an
ONNX Runtime denoiser, the PyTorch reference sampler with torch and the UNet, and the
fused sampler export traces it into one ONNX graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import checks, ddim
from .errors import inert, some_of
from .meta import DEFAULT_SPACING as DEFAULT_SPACING  # re-exported: callers import it here
from .meta import ModelMeta

A = Any  # a numpy array or a torch tensor (see ddim.py)

FALLBACK_STEPS = 4  # default steps of a model with no distilled steps and no fused sampler


def default_spacing(meta: ModelMeta) -> str:
    """The spacing a sampler of this model uses when none is asked for: the one it was
    distilled for, else its schedule's (trailing for fewstep's own models, the
    scheduler's for an imported one)."""
    return meta.distilled_spacing or meta.schedule.timestep_spacing


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: tuple[int, ...]
    a_t: tuple[float, ...]
    a_prev: tuple[float, ...]
    eta: float
    prediction_type: str
    clip_sample_range: float | None
    start: int = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @classmethod
    def create(
        cls,
        meta: ModelMeta,
        steps: int,
        spacing: str | None = None,
        eta: float = 0.0,
        strength: float = 1.0,
    ) -> SamplingPlan:
        """Validate the sampler arguments against ``meta`` and fix the loop.

        ``spacing`` None is ``default_spacing(meta)``.

        ``strength`` < 1 (img2img) skips the first steps: the loop starts at step
        ``steps - round(steps * strength)`` and runs at least one step.
        """
        eta = checks.eta(eta)
        if not checks.is_number(strength) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in (0, 1]; 1 = ignore the image")
        ts, a_t, a_prev = meta.schedule.step_alphas(
            steps, default_spacing(meta) if spacing is None else spacing)
        run = max(1, round(len(ts) * strength))
        return cls(
            timesteps=tuple(int(t) for t in ts),
            a_t=tuple(float(a) for a in a_t),
            a_prev=tuple(float(a) for a in a_prev),
            eta=eta,
            prediction_type=meta.prediction_type,
            clip_sample_range=meta.schedule.clip_sample_range,
            start=len(ts) - run,
        )


def initial_state(plan: SamplingPlan, x_T: A, init: A | None = None) -> A:
    """x at the first step: pure noise, or the init image noised to that step (img2img)."""
    if init is None:
        return x_T
    return ddim.q_sample(init, x_T, plan.a_t[plan.start])


def run_loop(
    plan: SamplingPlan,
    denoise: Callable[[A, int], A],
    x: A,
    noise: A | None = None,
    inpaint: tuple[A, A, A] | None = None,
) -> A:
    """Walk the plan from ``plan.start``; returns the final sample (B, C, H, W).

    ``denoise(x, i)`` returns the network output at step i (timestep
    ``plan.timesteps[i]``). ``noise`` is (B, steps, C, H, W) and is needed when η > 0.
    ``inpaint`` = (known image, mask, x_T noise): after each step the region where
    mask == 0 is replaced by the known image noised to the same level, so it comes out
    exactly as given.
    """
    if plan.stochastic and noise is None:
        raise ValueError(f"eta={plan.eta} needs per-step noise; pass noise (B, steps, C, H, W)")
    for i in range(plan.start, plan.steps):
        out = denoise(x, i)
        x = ddim.step(
            out,
            x,
            plan.a_t[i],
            plan.a_prev[i],
            prediction_type=plan.prediction_type,
            eta=plan.eta,
            noise=noise[:, i] if plan.stochastic and noise is not None else None,
            clip_sample_range=plan.clip_sample_range,
        )
        if inpaint is not None:
            known, mask, eps0 = inpaint
            x = blend(x, known, mask, eps0, plan.a_prev[i])
    return x


def blend(x: A, known: A, mask: A, x_T: A, a_prev: Any) -> A:
    """Inpainting after a step to ``a_prev``: keep ``x`` where mask == 1, and where
    mask == 0 the known image noised to the same level (with the initial noise ``x_T``),
    so the kept region comes out exactly as given."""
    return mask * x + (1 - mask) * ddim.q_sample(known, x_T, a_prev)


def guided(cond: A, uncond: A, guidance: Any) -> A:
    """Classifier-free guidance: uncond + g (cond - uncond); g = 1 is the conditional model."""
    return uncond + guidance * (cond - uncond)


def check_guidance(meta: ModelMeta, guidance: float | None) -> float | None:
    if guidance is None:
        return None
    if not meta.guidable:
        why = ("it has no conditioning" if not (meta.conditional or meta.cond) else
               "it records no null conditioning (the value meaning 'no condition')")
        raise ValueError(
            f"guidance={guidance} needs a conditional model with null conditioning; {why}: "
            "drop guidance"
        )
    if (
        not checks.is_number(guidance)
        or not math.isfinite(guidance)
        or not 0.0 <= guidance <= 50.0
    ):
        raise ValueError(f"guidance={guidance!r} must be a number in [0, 50]; 1 = no guidance")
    return float(guidance)


def resolve_labels(meta: ModelMeta, n: int, labels: Any = None) -> Any:
    """(n,) int64 labels, or None for an unconditional model.

    ``None`` on a class-conditional model cycles through the classes (image i gets
    class i % num_classes); one int applies to all; a sequence must have n entries.
    Class names are accepted where the model records them.
    """
    import numpy as np

    if not meta.conditional:
        if labels is not None:
            raise ValueError(
                f"labels={inert(repr(labels))} given, but this model is unconditional; drop "
                "the labels"
            )
        return None
    k = meta.num_classes
    if labels is None:
        return np.arange(n, dtype=np.int64) % k
    items = [labels] * n if isinstance(labels, (int, str, np.integer)) else list(labels)
    if len(items) != n:
        raise ValueError(f"{len(items)} labels given for n={n} images; pass one label or n labels")
    out = np.empty(n, dtype=np.int64)
    for j, item in enumerate(items):
        if isinstance(item, str):
            if item in meta.class_names:
                out[j] = meta.class_names.index(item)
                continue
            if not item.lstrip("-").isdigit():
                names = some_of(meta.class_names) if meta.class_names else f"0..{k - 1}"
                raise ValueError(f"label {inert(repr(item))} is not a class of this model; "
                                 f"use one of {names}")
            item = int(item)
        if not checks.is_whole_number(item) or not 0 <= item < k:
            raise ValueError(f"label {inert(repr(item))} is outside the model's classes 0..{k - 1}")
        out[j] = int(item)
    return out


def resolve_cond(meta: ModelMeta, n: int, cond: Any = None) -> dict[str, Any]:
    """The model's conditioning inputs as {name: (n, *shape) array of its dtype}.

    ``cond`` maps each input's name to one value for all samples (its own shape) or one
    per sample (n, *shape); float inputs must be finite, int64 inputs whole numbers.
    """
    import numpy as np

    given = {} if cond is None else cond
    if not isinstance(given, dict):
        raise ValueError(f"cond must be a dict of name -> array, got {type(given).__name__}")
    want = {c.name: c for c in meta.cond}
    unknown = [k for k in given if k not in want]
    if unknown:
        names = ", ".join(want) if want else "none: this model takes no conditioning inputs"
        raise ValueError(f"cond has unknown input {inert(repr(unknown[0]))}; the model's "
                         f"conditioning inputs are {names}")
    missing = [k for k in want if k not in given]
    if missing:
        spec = want[missing[0]]
        raise ValueError(f"cond[{missing[0]!r}] is missing: this model needs it, {spec.dtype} "
                         f"of shape {spec.shape} (one for all) or (n, *{spec.shape}); pass "
                         f"cond={{{missing[0]!r}: array}}")
    out: dict[str, Any] = {}
    for name, spec in want.items():
        a = np.asarray(given[name])
        if a.dtype == object or not (a.dtype.kind in "iu" or (
                spec.dtype == "float32" and a.dtype.kind == "f")):
            raise ValueError(f"cond[{name!r}] is {a.dtype}; pass {spec.dtype} values")
        if a.shape == spec.shape:
            a = np.broadcast_to(a, (n, *spec.shape))
        if a.shape != (n, *spec.shape):
            raise ValueError(f"cond[{name!r}] has shape {a.shape}; pass {spec.shape} (one for "
                             f"all) or {(n, *spec.shape)} (one per sample)")
        if spec.dtype == "float32" and not np.all(np.isfinite(a)):
            raise ValueError(f"cond[{name!r}] holds NaN or Inf; pass finite values")
        out[name] = np.ascontiguousarray(a, dtype=spec.np_dtype)
    return out


def check_latents(meta: ModelMeta, n: int, latents: Any) -> Any:
    """``latents`` (x_T, the initial noise) as a (n, *sample_shape) float32 array."""
    import numpy as np

    a = np.asarray(latents)
    want = (n, *meta.sample_shape)
    if a.shape != want:
        raise ValueError(f"latents have shape {a.shape}; pass {want} (n, *sample_shape)")
    if a.dtype.kind != "f":
        raise ValueError(f"latents are {a.dtype}; pass float32 noise of shape {want}")
    if not np.all(np.isfinite(a)):
        raise ValueError("latents hold NaN or Inf; pass finite values (standard normal noise)")
    return np.ascontiguousarray(a, dtype=np.float32)


def default_steps(meta: ModelMeta, graphs: list[dict[str, Any]], spacing: str | None,
                  eta: float) -> int:
    """The steps ``generate`` and ``fewstep sample`` run when none are given: the model's
    distilled step count (the last recorded, as `fewstep export` picks it), else the steps
    of its fused sampler graph (one baked for this spacing and eta first, fewest steps
    first), else ``FALLBACK_STEPS``. ``graphs``: ``graph_summary`` dicts."""
    if meta.distilled_steps:
        return meta.distilled_steps[-1]
    spacing = spacing or default_spacing(meta)
    samplers = [g for g in graphs if g.get("kind") == "sampler"]
    if not samplers:
        return FALLBACK_STEPS
    best = min(samplers, key=lambda g: (g.get("spacing") != spacing or
                                         abs(float(g.get("eta", 0.0)) - eta) > 1e-9,
                                         int(g["steps"])))
    return int(best["steps"])
