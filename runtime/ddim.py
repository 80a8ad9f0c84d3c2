"""DDIM: the one home of the diffusion math in fewstep.

Training's forward noising, the PyTorch reference sampler, the fused ONNX graphs
(traced) and the runtime's host loop all call the functions below. Schedule tables
are float64 numpy; ``step`` and the conversions use plain arithmetic only
(``+ - * / **`` and ``.clip``), so the same code runs on numpy arrays and on torch
tensors, and traces into an ONNX graph.

Notation (code name → symbol in Song, Meng & Ermon, "Denoising Diffusion Implicit
Models", ICLR 2021; ᾱ is written α there):

================== ============ =====================================================
code               paper        meaning
================== ============ =====================================================
``betas``          β_t          per-step noise variance of the forward process
``alphas_cumprod`` α_t          ᾱ_t = Π_{s≤t} (1 - β_s); signal fraction at step t
``a_t``            α_t          alphas_cumprod at the current timestep t
``a_prev``         α_{t-1}      alphas_cumprod at the previous (next-in-sequence) step
``x_t``            x_t          the noisy sample at timestep t, shape (B, C, H, W)
``x0_pred``        f_θ(x_t)     predicted clean sample, "predicted x_0"
``eps``            ε_θ(x_t)     predicted noise
``v``              v            velocity √α_t ε - √(1-α_t) x_0 (Salimans & Ho, 2022)
``eta``            η            0 = deterministic DDIM, 1 = DDPM-like ancestral noise
``sigma_t``        σ_t(η)       η √((1-α_{t-1})/(1-α_t)) √(1 - α_t/α_{t-1}), eq. (16)
``noise``          ε_t          fresh standard normal noise for the σ_t term
``x_prev``         x_{t-1}      the result of one update
================== ============ =====================================================

Timesteps run from T-1 down to 0; a sampler visits ``timesteps(T, steps, spacing)``
in order and the *previous* timestep of entry i is entry i+1 (never ``t - T // steps``,
which is wrong for trailing and linspace spacing). After the last entry comes the
final alpha: 1.0 with ``set_alpha_to_one`` (the clean image), else alphas_cumprod[0].

Relation to diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` (the options of their
configs that fewstep reproduces: ``num_train_timesteps``, ``beta_schedule``,
``beta_start``/``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``,
``prediction_type``, ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``,
``clip_sample``/``clip_sample_range``):

* The tables are the same formulas in float64; diffusers keeps them in float32 (they
  agree to float32 rounding: relative 1e-6, 4e-5 where ᾱ nears zero terminal SNR).
* ``timesteps`` returns what ``set_timesteps(steps)`` gives, for every spacing; like
  diffusers, ``steps_offset`` shifts leading spacing only. One exception: for some
  step counts (T=100 with 29 or 31 trailing steps) diffusers' trailing sequence has a
  ``steps + 1``-th entry, -1, whose step would read ᾱ_{T-1} (pure noise) at the very
  end; fewstep stops after ``steps`` entries.
* ``DDIMScheduler.step`` takes the previous timestep as ``t - T // steps``. That is the
  next entry of the sequence for leading spacing, but not for trailing or linspace
  spacing whenever ``T / steps`` is not a whole number (T=1000, 3 trailing steps visit
  999, 666, 332; diffusers steps 666 → 333 instead of 666 → 332 and 332 → final alpha
  — the last image sits at another noise level than the one it was asked for), nor for
  leading spacing with ``steps_offset >= T // steps``, where diffusers' last step lands
  at ``alphas_cumprod[steps_offset - T // steps]`` instead of the final alpha. fewstep
  takes the next entry, then the final alpha, for its own models: what
  ``DDPMScheduler.previous_timestep`` returns (diffusers' DDPM has no
  ``set_alpha_to_one``: its final alpha is always 1.0). A model imported from a diffusers
  scheduler config records ``prev_rule="ratio"`` and is sampled as DDIMScheduler does.
  Wherever the two previous
  timesteps coincide, ``step`` equals ``DDIMScheduler.step`` (also for eta > 0: σ_t is
  the same formula, and ε is the network's, as with ``use_clipped_model_output=False``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from . import checks

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["leading", "trailing", "linspace"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

BETA_SCHEDULES: Final = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS: Final = ("leading", "trailing", "linspace")
PREDICTION_TYPES: Final = ("epsilon", "v_prediction", "sample")

# An array-like that supports + - * / ** and .clip: a numpy array, a torch tensor (or a
# float). Typed as Any because the functions are deliberately duck-typed over both.
A = Any

F64 = NDArray[np.float64]


# ---------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------


def betas_for(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> F64:
    """β_1..β_T in float64 for ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.

    ``squaredcos_cap_v2`` is the cosine schedule of Nichol & Dhariwal (2021) with
    β capped at 0.999; it ignores ``beta_start``/``beta_end``.
    """
    checks.choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    n = checks.whole_number("num_train_timesteps", num_train_timesteps, 1)
    if beta_schedule != "squaredcos_cap_v2" and not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"beta_start={beta_start}, beta_end={beta_end} must satisfy "
            "0 < beta_start <= beta_end < 1; the usual values are 1e-4 and 0.02"
        )
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        root: F64 = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64)
        return root**2

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
        dtype=np.float64,
    )


def rescale_zero_terminal_snr(betas: F64) -> F64:
    """Rescale β so that the last timestep has zero SNR (Lin et al. 2024, Algorithm 1).

    With zero terminal SNR the network never sees signal at t = T-1, so an
    ``epsilon`` model cannot recover x0 there: use ``v_prediction`` (or ``sample``).
    Needs at least two timesteps (with one, the first is the last: 0/0).
    """
    if len(betas) < 2:
        raise ValueError(
            f"zero-terminal-SNR rescaling needs num_train_timesteps >= 2, got "
            f"num_train_timesteps={len(betas)} (the only timestep would be both the first "
            "and the zero-SNR last one); pass num_train_timesteps >= 2 or rescale_zero_snr=False"
        )
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def check_trained_betas(trained_betas: Sequence[float], num_train_timesteps: int) -> F64:
    """``trained_betas`` as float64 after checking it: one β per training timestep, each
    a finite number in (0, 1)."""
    n = checks.whole_number("num_train_timesteps", num_train_timesteps, 1)
    if len(trained_betas) != n:
        raise ValueError(
            f"trained_betas has {len(trained_betas)} values for num_train_timesteps={n}; "
            f"pass one beta per training timestep ({n} values)"
        )
    if not all(
        not isinstance(b, (bool, np.bool_)) and isinstance(b, (int, float, np.number))
        for b in trained_betas
    ):
        raise ValueError("trained_betas must be a list of numbers; pass e.g. [0.0001, ...]")
    betas = np.asarray(trained_betas, dtype=np.float64)
    inside = np.isfinite(betas) & (betas > 0) & (betas < 1)
    if not np.all(inside):
        i = int(np.argmin(inside))
        raise ValueError(
            f"trained_betas[{i}]={float(betas[i])!r} is not in (0, 1); every beta must be a "
            "finite number with 0 < beta < 1"
        )
    return betas


def alphas_cumprod(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    rescale_zero_snr: bool = False,
    trained_betas: Sequence[float] | None = None,
) -> F64:
    """ᾱ_t for t = 0..T-1, float64, strictly decreasing (computed once, copied out).

    ``trained_betas`` (one β per timestep), when given, replaces the named schedule
    and its ``beta_start``/``beta_end``, as in diffusers.
    """
    trained = None if trained_betas is None else tuple(
        check_trained_betas(trained_betas, num_train_timesteps).tolist())
    table = _alphas_cumprod(str(beta_schedule), int(num_train_timesteps), float(beta_start),
                            float(beta_end), bool(rescale_zero_snr), trained)
    return np.array(table, dtype=np.float64)  # a copy: callers may modify theirs


@functools.lru_cache(maxsize=32)
def _alphas_cumprod(beta_schedule: str, num_train_timesteps: int, beta_start: float,
                    beta_end: float, rescale_zero_snr: bool,
                    trained_betas: tuple[float, ...] | None) -> F64:
    # Cached: the cosine table is a 1000-step Python loop, and every generate() asks.
    if trained_betas is not None:  # checked by the caller
        betas = np.array(trained_betas, dtype=np.float64)
    else:
        betas = betas_for(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    table = np.cumprod(1.0 - betas).astype(np.float64)
    table.flags.writeable = False
    return table


# ---------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------


def timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> NDArray[np.int64]:
    """The timesteps a ``steps``-step sampler visits, strictly decreasing, no duplicates.

    ``leading``  (DDIM paper, diffusers' default): ``arange(steps) * (T // steps) + steps_offset``
    ``trailing`` (Lin et al. 2024, table 2): ``round(T - i * T / steps) - 1``; starts at T-1
    (ties rounded as diffusers' float arithmetic rounds them)
    ``linspace``: ``round(linspace(0, T-1, steps))``; starts at T-1, ends at 0
    """
    t_max = checks.whole_number("num_train_timesteps", num_train_timesteps, 1)
    try:
        n = checks.whole_number("steps", steps, 1)
    except ValueError as e:
        raise ValueError(f"{e}; pass 1 <= steps <= {t_max}") from None
    if n > t_max:
        raise ValueError(
            f"steps={n} exceeds num_train_timesteps={t_max}; pass steps <= {t_max}"
        )
    checks.choice("spacing", spacing, SPACINGS)
    checks.whole_number("steps_offset", steps_offset)
    if steps_offset and spacing != "leading":
        raise ValueError(
            f"steps_offset={steps_offset} applies to leading spacing only; "
            f"pass steps_offset=0 with spacing={spacing!r}"
        )
    if spacing == "leading":
        ratio = t_max // n
        ts = np.arange(n, dtype=np.int64)[::-1] * ratio + int(steps_offset)
        if steps_offset < 0 or ts[0] > t_max - 1:
            raise ValueError(
                f"steps_offset={steps_offset} puts timesteps outside 0..{t_max - 1} "
                f"with steps={n}; pass 0 <= steps_offset <= {t_max - 1 - int(ts[0] - steps_offset)}"
            )
    elif spacing == "trailing":
        # diffusers' arithmetic to the bit: where T * i / steps is a tie (k + 0.5), the
        # rounding error of arange's float step decides, as it does in diffusers. arange
        # can also overshoot by one entry (a last "timestep" -1 in diffusers): dropped.
        ts = (np.round(np.arange(t_max, 0, -(t_max / n))).astype(np.int64) - 1)[:n]
    else:
        ts = np.round(np.linspace(0.0, t_max - 1, n, dtype=np.float64))[::-1].astype(np.int64)
    assert np.all(np.diff(ts) < 0) and ts[-1] >= 0 and ts[0] <= t_max - 1, ts
    return np.ascontiguousarray(ts)


PREV_RULES: Final = ("next", "ratio")


def step_alphas(
    alphas_cumprod: F64, ts: NDArray[np.int64], set_alpha_to_one: bool = True,
    prev_rule: str = "next",
) -> tuple[F64, F64]:
    """(a_t, a_prev) for every entry of ``ts``.

    ``prev_rule`` "next": a_prev comes from the next entry (fewstep's own models);
    "ratio": from ``t - T // steps``, as ``DDIMScheduler.step`` takes it (imported
    models: the loop their library runs). Past the last entry (or below 0) a_prev is
    1.0 (``set_alpha_to_one``) or alphas_cumprod[0].
    """
    checks.choice("prev_rule", prev_rule, PREV_RULES)
    final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    a_t = alphas_cumprod[ts]
    if prev_rule == "ratio":
        prev = ts - len(alphas_cumprod) // len(ts)
        a_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
    else:
        a_prev = np.append(alphas_cumprod[ts[1:]], final)
    return a_t.astype(np.float64), a_prev.astype(np.float64)


# ---------------------------------------------------------------------------------
# Conversions between the three parameterisations, and forward noising
# ---------------------------------------------------------------------------------


def q_sample(x0: A, eps: A, a_t: Any) -> A:
    """Forward process, eq. (4): x_t = √α_t x0 + √(1-α_t) ε."""
    return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps


def v_target(x0: A, eps: A, a_t: Any) -> A:
    """Velocity v = √α_t ε - √(1-α_t) x0 (Salimans & Ho, 2022, appendix D)."""
    return a_t**0.5 * eps - (1 - a_t) ** 0.5 * x0


def x0_from_eps(x_t: A, eps: A, a_t: Any) -> A:
    return (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5


def eps_from_x0(x_t: A, x0: A, a_t: Any) -> A:
    return (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5


def x0_from_v(x_t: A, v: A, a_t: Any) -> A:
    return a_t**0.5 * x_t - (1 - a_t) ** 0.5 * v


def eps_from_v(x_t: A, v: A, a_t: Any) -> A:
    return a_t**0.5 * v + (1 - a_t) ** 0.5 * x_t


def target_for(prediction_type: str, x0: A, eps: A, a_t: Any) -> A:
    """What a network of ``prediction_type`` should output for (x0, ε) at α_t."""
    checks.choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return v_target(x0, eps, a_t)


def split_prediction(model_output: A, x_t: A, a_t: Any, prediction_type: str) -> tuple[A, A]:
    """(x0_pred, eps) from a network output of the given prediction type."""
    checks.choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, a_t), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, a_t)
    return x0_from_v(x_t, model_output, a_t), eps_from_v(x_t, model_output, a_t)


def sigma(a_t: Any, a_prev: Any, eta: Any) -> Any:
    """σ_t(η) of eq. (16): η √((1-α_{t-1})/(1-α_t)) √(1 - α_t/α_{t-1})."""
    return eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5


# ---------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------


def check_eta(eta: Any) -> Any:
    """``eta`` as a float when it is a number (numpy scalars and 0-d arrays included),
    else unchanged. Numbers and numpy arrays must lie in [0, 1]; other arrays (torch
    tensors, maybe traced) are not looked into: no branching on their values."""
    if isinstance(eta, (bool, np.bool_, str, bytes)) or eta is None or checks.is_number(eta):
        return checks.eta(eta)
    if isinstance(eta, np.ndarray) and eta.size:
        inside = (eta >= 0) & (eta <= 1)  # NaN is outside
        if not np.all(inside):
            bad = eta[~inside].ravel()
            raise ValueError(
                f"eta has {bad.size} of {eta.size} value(s) outside [0, 1] (first: "
                f"{float(bad[0])}); pass per-sample eta with 0 <= eta <= 1"
            )
    return eta


def _check_clip(clip_sample_range: Any) -> float | None:
    if clip_sample_range is None:
        return None
    if not checks.is_number(clip_sample_range) or not (
        math.isfinite(float(clip_sample_range)) and float(clip_sample_range) > 0
    ):
        raise ValueError(
            f"clip_sample_range={clip_sample_range!r} must be a finite number > 0 or None; "
            "pass e.g. 1.0 (data in [-1, 1]) or None to not clip x0_pred"
        )
    return float(clip_sample_range)


def step(
    model_output: A,
    x_t: A,
    a_t: Any,
    a_prev: Any,
    *,
    prediction_type: str = "epsilon",
    eta: Any = 0.0,
    noise: A | None = None,
    clip_sample_range: float | None = None,
) -> A:
    """One DDIM update x_t → x_{t-1}, eq. (12) of Song et al.

    ``a_t``/``a_prev`` are scalars or arrays broadcastable against ``x_t`` (for a
    per-sample (B,) vector pass it reshaped to (B, 1, 1, 1)). ``eta`` in [0, 1] may be a
    number (numpy scalars and 0-d arrays count as numbers) or such an array; ``noise``
    (same shape as x_t) is required unless eta is 0 (a number, or a numpy array of
    zeros), where it is ignored; a torch tensor eta always needs it (its values are not
    inspected, so that tracing sees no data-dependent branch). ``clip_sample_range`` is
    None or a number > 0. The stochastic term follows diffusers: ε is the network's,
    also when ``clip_sample_range`` clips x0_pred.

    Raises ValueError for eta outside [0, 1], clip_sample_range <= 0, or noise whose
    shape differs from x_t's.
    """
    # (0) Arguments. Numbers and numpy arrays are checked eagerly; tensors only by shape,
    # and only when the shape is plain ints (while tracing, torch.jit gives tensors and
    # torch.export SymInts: comparing them would add branches or guards to the graph).
    eta = check_eta(eta)
    clip_sample_range = _check_clip(clip_sample_range)
    if noise is not None:
        noise_shape = tuple(getattr(noise, "shape", ()))
        x_shape = tuple(getattr(x_t, "shape", ()))
        concrete = all(type(d) is int for d in noise_shape + x_shape)
        if concrete and hasattr(noise, "shape") and hasattr(x_t, "shape") and (
            noise_shape != x_shape
        ):
            raise ValueError(
                f"noise has shape {noise_shape} but x_t has shape {x_shape}; "
                f"pass noise of x_t's shape {x_shape} (B, C, H, W)"
            )
    # (1) "predicted x_0" and ε_θ(x_t) from whatever the network predicts.
    x0_pred, eps = split_prediction(model_output, x_t, a_t, prediction_type)
    # (2) Optional clipping of the predicted x_0 to the data range.
    if clip_sample_range is not None:
        x0_pred = x0_pred.clip(-clip_sample_range, clip_sample_range)
    # (3) σ_t(η), eq. (16).
    sigma_t = sigma(a_t, a_prev, eta)
    # (4) "direction pointing to x_t": √(1 - α_{t-1} - σ_t²) ε_θ(x_t). The radicand is >= 0,
    # but with float32 coefficients (fused step graph), η = 1 and α_t ≈ 0 rounding can make
    # it -1e-8 and the root NaN: clamp it at 0 as max(r, 0) = (r + |r|) / 2 (exact for r > 0).
    radicand = 1 - a_prev - sigma_t**2
    dir_xt = ((radicand + abs(radicand)) / 2) ** 0.5 * eps
    # (5) x_{t-1} = √α_{t-1} · predicted x_0 + direction.
    x_prev = a_prev**0.5 * x0_pred + dir_xt
    # (6) "random noise" σ_t ε_t.
    if (isinstance(eta, float) and eta == 0.0) or (
        isinstance(eta, np.ndarray) and not np.any(eta)
    ):
        return x_prev
    if noise is None:
        what = f"eta={eta}" if isinstance(eta, float) else (
            f"a per-sample eta ({type(eta).__name__}, values not inspected)")
        raise ValueError(f"{what} needs noise of the same shape as x_t; pass noise=...")
    return x_prev + sigma_t * noise
