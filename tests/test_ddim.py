"""runtime/ddim.py: schedules, timesteps, the update; oracle exactness; diffusers parity."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.runtime import ddim

T = 1000


def oracle_output(x0: np.ndarray, x_t: np.ndarray, a_t: float, prediction_type: str) -> np.ndarray:
    eps = ddim.eps_from_x0(x_t, x0, a_t)
    return ddim.target_for(prediction_type, x0, eps, a_t)


def run_oracle(x0: np.ndarray, steps: int, spacing: str, prediction_type: str = "epsilon",
               eta: float = 0.0, schedule: str = "linear", seed: int = 0) -> np.ndarray:
    ac = ddim.alphas_cumprod(schedule, T)
    ts = ddim.timesteps(T, steps, spacing)
    a_t, a_prev = ddim.step_alphas(ac, ts)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x0.shape)
    for i in range(steps):
        out = oracle_output(x0, x, float(a_t[i]), prediction_type)
        noise = rng.standard_normal(x0.shape) if eta else None
        x = ddim.step(out, x, float(a_t[i]), float(a_prev[i]), prediction_type=prediction_type,
                      eta=eta, noise=noise)
    return x


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_oracle_returns_x0_for_every_step_count(spacing: str) -> None:
    x0 = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 4))
    for steps in range(1, 51):
        x = run_oracle(x0, steps, spacing)
        assert np.max(np.abs(x - x0)) <= 1e-6, (spacing, steps)


@pytest.mark.parametrize("prediction_type", ddim.PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("schedule", ddim.BETA_SCHEDULES)
def test_oracle_exact_for_every_parameterisation(prediction_type: str, eta: float,
                                                 schedule: str) -> None:
    x0 = np.random.default_rng(1).uniform(-1, 1, (2, 3, 4, 4))
    for steps in (1, 2, 4, 7, 20):
        x = run_oracle(x0, steps, "trailing", prediction_type, eta, schedule)
        assert np.max(np.abs(x - x0)) <= 1e-6


def test_without_alpha_one_the_last_step_lands_at_alphas_cumprod_0() -> None:
    ac = ddim.alphas_cumprod("linear", T)
    ts = ddim.timesteps(T, 4, "leading")
    _, a_prev = ddim.step_alphas(ac, ts, set_alpha_to_one=False)
    assert a_prev[-1] == ac[0]
    assert list(a_prev[:-1]) == list(ac[ts[1:]])


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_timesteps_valid_for_every_step_count(spacing: str) -> None:
    for t_max in (1, 7, 100, T):
        for steps in range(1, t_max + 1):
            ts = ddim.timesteps(t_max, steps, spacing)
            assert len(ts) == steps
            assert ts.dtype == np.int64
            assert np.all(np.diff(ts) < 0), (t_max, steps)
            assert ts[-1] >= 0 and ts[0] <= t_max - 1


def test_timesteps_known_values() -> None:
    assert ddim.timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert ddim.timesteps(1000, 4, "leading", steps_offset=1).tolist() == [751, 501, 251, 1]
    assert ddim.timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert ddim.timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert ddim.timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert ddim.timesteps(1000, 1, "trailing").tolist() == [999]


def test_previous_timestep_is_the_next_entry_not_t_minus_ratio() -> None:
    ac = ddim.alphas_cumprod("linear", T)
    ts = ddim.timesteps(T, 3, "trailing")  # 999, 666, 332: gaps differ from T // 3 = 333
    _, a_prev = ddim.step_alphas(ac, ts)
    assert a_prev[0] == ac[666] and a_prev[1] == ac[332] and a_prev[2] == 1.0


def test_schedules() -> None:
    for name in ddim.BETA_SCHEDULES:
        ac = ddim.alphas_cumprod(name, T)
        assert ac.dtype == np.float64 and ac.shape == (T,)
        assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < ac[0] < 1
    lin = ddim.betas_for("linear", T)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    sl = ddim.betas_for("scaled_linear", T, 0.00085, 0.012)
    assert sl[0] == pytest.approx(0.00085) and sl[-1] == pytest.approx(0.012)
    cos = ddim.betas_for("squaredcos_cap_v2", T)
    assert cos.max() <= 0.999


def test_zero_terminal_snr() -> None:
    ac = ddim.alphas_cumprod("scaled_linear", T, 0.00085, 0.012, rescale_zero_snr=True)
    assert ac[-1] == pytest.approx(0.0, abs=1e-12)
    plain = ddim.alphas_cumprod("scaled_linear", T, 0.00085, 0.012)
    assert ac[0] == pytest.approx(plain[0])
    x0 = np.random.default_rng(2).uniform(-1, 1, (1, 3, 4, 4))
    # v-prediction recovers x0 even from the zero-SNR first step.
    ts = ddim.timesteps(T, 4, "trailing")
    a_t, a_prev = ddim.step_alphas(ac, ts)
    x = np.random.default_rng(3).standard_normal(x0.shape)
    for i in range(4):
        eps = ddim.eps_from_x0(x, x0, a_t[i])
        v = ddim.v_target(x0, eps, a_t[i])
        x = ddim.step(v, x, float(a_t[i]), float(a_prev[i]), prediction_type="v_prediction")
    assert np.max(np.abs(x - x0)) < 1e-6


def test_conversions_round_trip(rng: np.random.Generator) -> None:
    x0, eps = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3, 8, 8))
    for a in (0.999, 0.5, 0.01):
        x_t = ddim.q_sample(x0, eps, a)
        np.testing.assert_allclose(ddim.x0_from_eps(x_t, eps, a), x0, atol=1e-10)
        np.testing.assert_allclose(ddim.eps_from_x0(x_t, x0, a), eps, atol=1e-8)
        v = ddim.v_target(x0, eps, a)
        np.testing.assert_allclose(ddim.x0_from_v(x_t, v, a), x0, atol=1e-10)
        np.testing.assert_allclose(ddim.eps_from_v(x_t, v, a), eps, atol=1e-10)


def test_clip_sample_range_clips_x0(rng: np.random.Generator) -> None:
    x_t = rng.standard_normal((1, 3, 4, 4)) * 3
    out = ddim.step(x_t * 2, x_t, 0.5, 1.0, prediction_type="sample", clip_sample_range=1.0)
    assert np.max(np.abs(out)) <= 1.0 + 1e-12
    unclipped = ddim.step(x_t * 2, x_t, 0.5, 1.0, prediction_type="sample")
    assert np.max(np.abs(unclipped)) > 1.0


def test_numpy_and_torch_agree(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    ac = ddim.alphas_cumprod("squaredcos_cap_v2", T)
    ts = ddim.timesteps(T, 5, "trailing")
    a_t, a_prev = ddim.step_alphas(ac, ts)
    for pred in ddim.PREDICTION_TYPES:
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        xt = torch.from_numpy(x.copy())
        for i in range(5):
            out = np.tanh(x * 0.7 + 0.1 * i).astype(np.float32)
            noise = rng.standard_normal(x.shape).astype(np.float32)
            kw = dict(prediction_type=pred, eta=0.7, clip_sample_range=1.0)
            x = ddim.step(out, x, float(a_t[i]), float(a_prev[i]), noise=noise, **kw)
            xt = ddim.step(torch.from_numpy(out), xt, float(a_t[i]), float(a_prev[i]),
                           noise=torch.from_numpy(noise), **kw)
            assert x.dtype == np.float32 and xt.dtype == torch.float32
        np.testing.assert_allclose(xt.numpy(), x, rtol=1e-5, atol=1e-5)
    # Per-sample (B, 1, 1, 1) coefficient tensors, as the fused step graph passes them.
    a = torch.tensor([0.3, 0.6]).view(-1, 1, 1, 1)
    b = torch.tensor([0.5, 0.9]).view(-1, 1, 1, 1)
    xs = torch.randn(2, 3, 4, 4)
    o = torch.randn(2, 3, 4, 4)
    batched = ddim.step(o, xs, a, b)
    for j in range(2):
        single = ddim.step(o[j : j + 1], xs[j : j + 1], float(a[j]), float(b[j]))
        torch.testing.assert_close(batched[j : j + 1], single)


@pytest.mark.parametrize("prediction_type", ddim.PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 10, 50])
def test_equals_diffusers_ddim_where_diffusers_is_right(prediction_type: str, eta: float,
                                                        steps: int) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for offset, alpha_one, clip in ((0, True, True), (1, False, False)):
        sched = diffusers.DDIMScheduler(
            num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
            prediction_type=prediction_type, clip_sample=clip, clip_sample_range=1.0,
            set_alpha_to_one=alpha_one, steps_offset=offset, timestep_spacing="leading",
        )
        sched.set_timesteps(steps)
        ts = ddim.timesteps(T, steps, "leading", steps_offset=offset)
        assert sched.timesteps.tolist() == ts.tolist()
        ac = ddim.alphas_cumprod("linear", T)
        a_t, a_prev = ddim.step_alphas(ac, ts, set_alpha_to_one=alpha_one)
        gen = np.random.default_rng(steps)
        x = gen.standard_normal((2, 3, 4, 4)).astype(np.float32)
        xd = torch.from_numpy(x.copy())
        for i, t in enumerate(ts):
            out = np.sin(x * 1.3 + 0.01 * t).astype(np.float32)
            outd = torch.sin(xd * 1.3 + 0.01 * float(t))
            noise = gen.standard_normal(x.shape).astype(np.float32)
            xd = sched.step(outd, int(t), xd, eta=eta,
                            variance_noise=torch.from_numpy(noise)).prev_sample
            x = ddim.step(out, x, float(a_t[i]), float(a_prev[i]), prediction_type=prediction_type,
                          eta=eta, noise=noise, clip_sample_range=1.0 if clip else None)
        np.testing.assert_allclose(x, xd.numpy(), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_train_timesteps=1000, steps=0),
         "steps=0 must be a whole number >= 1; pass 1 <= steps <= 1000"),
        (dict(num_train_timesteps=1000, steps=-3), "steps=-3 must be a whole number >= 1"),
        (dict(num_train_timesteps=1000, steps=1200),
         "steps=1200 exceeds num_train_timesteps=1000; pass steps <= 1000"),
        (dict(num_train_timesteps=1000, steps=2.5), "steps=2.5 must be a whole number"),
        (dict(num_train_timesteps=1000, steps=True), "steps=True must be a whole number"),
        (dict(num_train_timesteps=1000, steps=4, spacing="middle"),
         "spacing='middle' is not supported; use one of leading, trailing, linspace"),
        (dict(num_train_timesteps=1000, steps=4, spacing="trailing", steps_offset=1),
         "steps_offset=1 applies to leading spacing only"),
        (dict(num_train_timesteps=1000, steps=4, steps_offset=300),
         "steps_offset=300 puts timesteps outside 0..999"),
        (dict(num_train_timesteps=0, steps=1), "num_train_timesteps=0 must be a whole number >= 1"),
    ],
)
def test_timesteps_errors_name_value_and_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        ddim.timesteps(**kwargs)
    assert message in str(e.value)


def test_other_errors() -> None:
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not supported; use one of"):
        ddim.betas_for("cosine", 1000)
    with pytest.raises(ValueError, match=r"beta_start=0\.5, beta_end=0\.1 must satisfy"):
        ddim.betas_for("linear", 1000, 0.5, 0.1)
    with pytest.raises(ValueError, match="prediction_type='eps' is not supported"):
        ddim.step(np.zeros(1), np.zeros(1), 0.5, 0.9, prediction_type="eps")
    with pytest.raises(ValueError, match=r"eta=0\.5 needs noise of the same shape as x_t"):
        ddim.step(np.zeros(1), np.zeros(1), 0.5, 0.9, eta=0.5)


X = np.zeros((2, 3, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eta=-1, noise=X), r"eta=-1\.0 is outside \[0, 1\].*pass 0 <= eta <= 1"),
        (dict(eta=3, noise=X), r"eta=3\.0 is outside \[0, 1\].*pass 0 <= eta <= 1"),
        (dict(eta=float("nan"), noise=X), r"eta=nan is outside \[0, 1\]"),
        (dict(eta=np.float32(1.5), noise=X), r"eta=1\.5 is outside \[0, 1\]"),
        (dict(eta=True, noise=X), r"eta=True must be a number in \[0, 1\]"),
        (dict(eta=np.array([0.5, 2.0]).reshape(2, 1, 1, 1), noise=X),
         r"eta has 1 of 2 value\(s\) outside \[0, 1\] \(first: 2\.0\); pass per-sample eta"),
        (dict(clip_sample_range=-1), r"clip_sample_range=-1 must be a finite number > 0 or None"),
        (dict(clip_sample_range=0.0), r"clip_sample_range=0\.0 must be a finite number > 0"),
        (dict(clip_sample_range=float("inf")), r"clip_sample_range=inf must be a finite"),
        (dict(eta=0.5, noise=np.zeros((2, 3))),
         r"noise has shape \(2, 3\) but x_t has shape \(2, 3, 4, 4\); pass noise of x_t's shape"),
        (dict(eta=0.0, noise=np.zeros((1, 3, 4, 4))),
         r"noise has shape \(1, 3, 4, 4\) but x_t has shape \(2, 3, 4, 4\)"),
    ],
)
def test_step_rejects_invalid_arguments_naming_value_and_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ddim.step(X, X, 0.5, 0.9, **kwargs)


@pytest.mark.parametrize("zero", [0, 0.0, np.float32(0), np.float64(0), np.array(0.0),
                                  np.zeros((2, 1, 1, 1))])
def test_step_zero_eta_in_any_numpy_form_needs_no_noise(zero: object,
                                                       rng: np.random.Generator) -> None:
    out, x_t = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    expected = ddim.step(out, x_t, 0.5, 0.9, eta=0.0)
    np.testing.assert_array_equal(ddim.step(out, x_t, 0.5, 0.9, eta=zero), expected)


def test_step_numpy_scalar_eta_equals_float_eta(rng: np.random.Generator) -> None:
    out, x_t = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    noise = rng.standard_normal((2, 3, 4, 4))
    expected = ddim.step(out, x_t, 0.5, 0.9, eta=0.5, noise=noise)
    for eta in (np.float64(0.5), np.array(0.5), np.full((2, 1, 1, 1), 0.5)):
        np.testing.assert_allclose(ddim.step(out, x_t, 0.5, 0.9, eta=eta, noise=noise),
                                   expected, rtol=0, atol=1e-15)


def test_step_tensor_eta_is_traceable_and_shape_checked() -> None:
    """A per-sample eta tensor (the fused step graph's input) is not inspected: the step
    traces and exports with a dynamic batch, no data-dependent branch; noise is still
    checked by shape."""
    torch = pytest.importorskip("torch")
    import warnings

    def f(out: object, x: object, eta: object, noise: object) -> object:
        return ddim.step(out, x, 0.3, 0.6, prediction_type="v_prediction",
                         eta=eta, noise=noise, clip_sample_range=1.0)

    class Step(torch.nn.Module):
        def forward(self, out: object, x: object, eta: object, noise: object) -> object:
            return f(out, x, eta, noise)

    args = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 1, 1),
            torch.randn(2, 3, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace itself
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(f, args)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(Step(), args, dynamic_shapes=({0: batch},) * 4)
    new = (torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4),
           torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1), torch.randn(3, 3, 4, 4))
    torch.testing.assert_close(traced(*new), f(*new))
    torch.testing.assert_close(exported.module()(*new), f(*new))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3\) but x_t has shape"):
        f(args[0], args[1], args[2], torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"per-sample eta .* needs noise"):
        f(args[0], args[1], args[2], None)


def test_zero_terminal_snr_with_one_timestep_is_refused() -> None:
    with pytest.raises(ValueError, match=r"zero-terminal-SNR rescaling needs num_train_timesteps "
                                         r">= 2, got num_train_timesteps=1.*pass "
                                         r"num_train_timesteps >= 2 or rescale_zero_snr=False"):
        ddim.alphas_cumprod("linear", 1, rescale_zero_snr=True)
    ac = ddim.alphas_cumprod("linear", 2, rescale_zero_snr=True)
    assert np.all(np.isfinite(ac)) and ac[-1] == pytest.approx(0.0, abs=1e-12)


def test_trained_betas_replace_the_named_schedule() -> None:
    betas = np.linspace(2e-4, 0.03, 50)
    ac = ddim.alphas_cumprod("squaredcos_cap_v2", 50, trained_betas=betas.tolist())
    assert ac.dtype == np.float64
    np.testing.assert_array_equal(ac, np.cumprod(1.0 - betas))
    ac[0] = 5.0  # a copy: the cached table is not touched
    assert ddim.alphas_cumprod("linear", 50, trained_betas=tuple(betas))[0] == 1.0 - betas[0]
    rescaled = ddim.alphas_cumprod(num_train_timesteps=50, trained_betas=betas,
                                   rescale_zero_snr=True)
    assert rescaled[-1] == 0.0 and rescaled[0] == pytest.approx(1.0 - betas[0])


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        ([0.01] * 9, "trained_betas has 9 values for num_train_timesteps=10; pass one beta per "
         "training timestep (10 values)"),
        ([0.01] * 9 + [1.0], "trained_betas[9]=1.0 is not in (0, 1)"),
        ([0.0] + [0.01] * 9, "trained_betas[0]=0.0 is not in (0, 1)"),
        ([float("nan")] * 10, "trained_betas[0]=nan is not in (0, 1)"),
        (["0.1"] * 10, "trained_betas must be a list of numbers"),
        ([True] * 10, "trained_betas must be a list of numbers"),
    ],
)
def test_trained_betas_are_checked(betas: list, message: str) -> None:
    with pytest.raises(ValueError) as e:
        ddim.alphas_cumprod(num_train_timesteps=10, trained_betas=betas)
    assert message in str(e.value)


def test_trailing_spacing_rounds_ties_and_stops_at_steps_entries() -> None:
    # T * i / steps = 12.5 at i = 3: the float step of arange (diffusers' arithmetic)
    # rounds it to 13, so the 4th timestep is 100 - 13 - 1 = 86.
    assert ddim.timesteps(100, 24, "trailing")[3] == 86
    # np.arange(100, 0, -100 / 29) has 30 entries (the last ~1e-14 → -1): 29 are kept.
    ts = ddim.timesteps(100, 29, "trailing")
    assert len(ts) == 29 and ts[-1] == 2
