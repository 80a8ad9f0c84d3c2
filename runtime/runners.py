"""The three ways a batch of images runs through a model's graphs.

``run_sampler``: one fused graph runs the whole loop. ``run_steps``: the fused DDIM-step
graph driven by ``graph.run_loop`` (x stays on the device); with a mask, one step per
call and the inpainting blend on the host in between. ``run_denoiser``: the network
alone, the DDIM update on the host (``sampling.run_loop``). Each names the step that
produced NaN/Inf where it can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from . import sampling
from .backends import Array, Graph
from .errors import ArtifactError, NumericalError
from .images import nonfinite_images
from .sampling import SamplingPlan

NUMERIC_FIX: Final = "fp16 overflow? export with --precision fp32 or keep more fp32 islands"

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Batch:
    """One batch's inputs: initial noise (B, *sample), per-step noise (B, steps, *sample)
    when eta > 0, the label/conditioning/guidance feeds, and for img2img/inpainting the
    init image and mask (one row, or one per image of the batch)."""

    x_T: F32
    step_noise: F32 | None
    extra: dict[str, Array] = field(default_factory=dict)
    init: F32 | None = None
    mask: F32 | None = None
    first: int = 0  # index of the batch's first image in the whole call


def name(path: str) -> str:
    """A graph's file name for messages (in-memory graphs keep their ``<...>`` name)."""
    return Path(path).name if path and not path.startswith("<") else path


def extra_feeds(graph: Graph, labels: NDArray[np.int64] | None, guidance: float | None,
                n: int, cond: dict[str, Array] | None = None) -> dict[str, Array]:
    """The label, conditioning and guidance inputs ``graph`` takes, for a batch of ``n``
    (``cond``: {name: (n, ...)} already checked)."""
    feeds: dict[str, Array] = {k: v for k, v in (cond or {}).items()
                               if k in graph.meta.graph.inputs}
    if "label" in graph.meta.graph.inputs:
        assert labels is not None
        feeds["label"] = np.ascontiguousarray(labels, dtype=np.int64)
    if "guidance" in graph.meta.graph.inputs:
        feeds["guidance"] = np.full(n, 1.0 if guidance is None else guidance, np.float32)
    return feeds


def numerical(graph: Graph, plan: SamplingPlan, i: int) -> NumericalError:
    return NumericalError(
        f"step {i} of {plan.steps} (t={plan.timesteps[i]}) produced NaN/Inf in "
        f"{name(graph.path)}; {NUMERIC_FIX}"
    )


def run_sampler(graph: Graph, batch: Batch) -> Array:
    """The fused sampler graph: uint8 (B, H, W, C) images or float (B, C, H, W) samples."""
    feeds = {"x": batch.x_T, **batch.extra}
    if "noise" in graph.meta.graph.inputs:
        assert batch.step_noise is not None
        feeds["noise"] = batch.step_noise
    y = graph.run(feeds)
    n, lo = batch.x_T.shape[0], batch.first
    if graph.meta.graph.output_format == "uint8":
        c, h, w = graph.meta.image_shape
        if y.dtype != np.uint8 or y.shape != (n, h, w, c):
            raise ArtifactError(
                f"{graph.path} returned {y.dtype} {y.shape}, not uint8 ({n}, {h}, {w}, {c}) "
                "images as its metadata says; re-export it"
            )
        bad = nonfinite_images(y)
        if bad.size:
            which = ", ".join(str(lo + int(b)) for b in bad[:8]) + (
                ", ..." if bad.size > 8 else "")
            raise NumericalError(
                f"the sampler graph {name(graph.path)} produced NaN/Inf for image(s) "
                f"{which} of this call; {NUMERIC_FIX}"
            )
        return y
    y = np.asarray(y, dtype=np.float32)
    if not np.all(np.isfinite(y)):
        raise NumericalError(
            f"the sampler graph {name(graph.path)} returned NaN/Inf for images "
            f"{lo}..{lo + n - 1}; {NUMERIC_FIX}"
        )
    return y


def run_steps(graph: Graph, plan: SamplingPlan, batch: Batch) -> F32:
    """The fused step graph, every step in one ``run_loop`` (one call per step with a
    mask: the inpainting blend runs on the host between steps)."""
    x_T, step_noise, init, m = batch.x_T, batch.step_noise, batch.init, batch.mask
    n = x_T.shape[0]
    x: F32 = np.ascontiguousarray(sampling.initial_state(plan, x_T, init), dtype=np.float32)
    fixed: dict[str, Array] = {**batch.extra, "eta": np.full(n, plan.eta, np.float32)}
    if not plan.stochastic:
        fixed["noise"] = np.zeros_like(x_T)

    def feeds(i: int) -> dict[str, Array]:
        d: dict[str, Array] = {
            "t": np.full(n, plan.timesteps[i], np.float32),
            "a_t": np.full(n, plan.a_t[i], np.float32),
            "a_prev": np.full(n, plan.a_prev[i], np.float32),
        }
        if plan.stochastic:
            assert step_noise is not None
            d["noise"] = np.ascontiguousarray(step_noise[:, i])
        return d

    def one_step(x: F32, i: int) -> F32:
        out = np.asarray(graph.run_loop(x, fixed, [feeds(i)]), dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise numerical(graph, plan, i)
        return out

    if m is None:
        y = np.asarray(graph.run_loop(x, fixed, [feeds(i) for i in range(plan.start,
                                                                        plan.steps)]))
        if not np.all(np.isfinite(y)):
            # All steps ran on the device in one loop: rerun them one at a time (only on
            # this failure path) to name the first step that produced NaN/Inf.
            for i in range(plan.start, plan.steps):
                x = one_step(x, i)
            raise NumericalError(
                f"the step graph {name(graph.path)} returned NaN/Inf after steps "
                f"{plan.start}..{plan.steps - 1} (t={plan.timesteps[plan.start]}.."
                f"{plan.timesteps[-1]}); {NUMERIC_FIX}"
            )
        return y.astype(np.float32, copy=False)
    assert init is not None
    for i in range(plan.start, plan.steps):
        x = sampling.blend(one_step(x, i), init, m, x_T, plan.a_prev[i])
    return x


def run_denoiser(graph: Graph, plan: SamplingPlan, batch: Batch) -> F32:
    """The denoiser graph, with the DDIM update (and any inpainting blend) on the host."""
    n = batch.x_T.shape[0]

    def denoise(x: F32, i: int) -> F32:
        if i > plan.start and not np.all(np.isfinite(x)):
            raise numerical(graph, plan, i - 1)
        t = np.full(n, plan.timesteps[i], np.float32)
        out = np.asarray(graph.run({"x": np.ascontiguousarray(x), "t": t, **batch.extra}),
                         dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise numerical(graph, plan, i)
        return out

    x = sampling.initial_state(plan, batch.x_T, batch.init)
    inpaint = (None if batch.mask is None or batch.init is None
               else (batch.init, batch.mask, batch.x_T))
    y: F32 = sampling.run_loop(plan, denoise, x, batch.step_noise, inpaint)
    if not np.all(np.isfinite(y)):
        raise numerical(graph, plan, plan.steps - 1)
    return y


def run(path: str, graph: Graph, plan: SamplingPlan, batch: Batch) -> Array:
    """The batch through ``graph`` the way ``path`` says (sampler, step, step-blend,
    denoiser)."""
    if path == "sampler":
        return run_sampler(graph, batch)
    if path == "denoiser":
        return run_denoiser(graph, plan, batch)
    return run_steps(graph, plan, batch)
