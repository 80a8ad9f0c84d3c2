"""fewstep's schedule against diffusers itself: scheduler configs → Schedule, the ᾱ
tables, ``set_timesteps``, and whole sampling loops (``scheduler.step``) with a fixed
model output function, in numpy and in torch.

DDIMScheduler.step takes the previous timestep as ``t - T // steps``; an imported
schedule records that rule (``prev_rule="ratio"``), so the plain diffusers loop is the
reference for every spacing and step count. fewstep's own models take the next entry
of the sequence (what DDPMScheduler.previous_timestep returns): where the two rules
differ, that loop equals ``DDIMScheduler.step`` with its table entry at
``t - T // steps`` holding ᾱ of the next entry (diffusers' arithmetic, fewstep's
choice of previous timestep).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fewstep.runtime import ddim, sampling
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta, Schedule

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
dc = pytest.importorskip("fewstep.export.diffusers_config")

TORCH_RTOL = 1e-4
SHAPE = (2, 3, 2, 2)  # (B, C, H, W): the loop's arithmetic does not care about the size
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012),
         "squaredcos_cap_v2": (1e-4, 0.02)}


def scheduler(cls: str = "DDIMScheduler", **config: Any) -> Any:
    beta = config.get("beta_schedule", "linear")
    config.setdefault("beta_start", BETAS[beta][0])
    config.setdefault("beta_end", BETAS[beta][1])
    return getattr(diffusers, cls)(**config)


def model_output(x: Any, t: int) -> Any:
    """A fixed "network": a smooth deterministic function of x and t, numpy or torch."""
    lib = torch if isinstance(x, torch.Tensor) else np
    return 0.9 * lib.sin(1.3 * x + 0.01 * t) + 0.2 * lib.cos(0.7 * x - 0.003 * t)


def meta_of(sched: Any) -> ModelMeta:
    mapped = dc.schedule_from_scheduler(sched)
    return ModelMeta.build(prediction_type=mapped.prediction_type, schedule=mapped.schedule,
                           channels=SHAPE[1], height=SHAPE[2], width=SHAPE[3])


def diffusers_timesteps(sched: Any, steps: int) -> list[int]:
    """``set_timesteps``' sequence, checked, without the -1 that trailing spacing can
    append after ``steps`` entries (see runtime/ddim.py)."""
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    assert len(ts) == steps or (len(ts) == steps + 1 and ts[-1] == -1), ts
    return ts[:steps]


def use_float64_tables(sched: Any, schedule: Schedule) -> None:
    """Give the scheduler fewstep's float64 ᾱ table (equal to its own float32 one to
    float32 rounding: test_alphas_cumprod_equal_diffusers), so that what is compared
    below is the loop's arithmetic: an epsilon model without clipping divides by √ᾱ_t
    ≈ 5e-4 at t = T-1, which turns float32 rounding of ᾱ into 1e-5 relative changes."""
    ac = schedule.alphas_cumprod()
    sched.alphas_cumprod = torch.from_numpy(ac)
    if hasattr(sched, "final_alpha_cumprod"):
        final = 1.0 if schedule.set_alpha_to_one else float(ac[0])
        sched.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)


def diffusers_loop(sched: Any, steps: int, x_T: np.ndarray, *, next_entry: bool,
                   eta: float = 0.0, noise: np.ndarray | None = None) -> np.ndarray:
    """diffusers' DDIM loop in float64. ``next_entry``: each step reads ᾱ of the next
    entry where diffusers would read ᾱ[t - T // steps]."""
    ts = diffusers_timesteps(sched, steps)
    table, final = sched.alphas_cumprod, sched.final_alpha_cumprod
    x = torch.from_numpy(x_T.copy())
    try:
        for i, t in enumerate(ts):
            if next_entry:
                value = table[ts[i + 1]] if i + 1 < steps else final
                wrong = t - sched.config.num_train_timesteps // steps
                patched, patched_final = table.clone(), final
                if wrong >= 0:
                    patched[wrong] = value
                else:
                    patched_final = value
                sched.alphas_cumprod, sched.final_alpha_cumprod = patched, patched_final
            var = None if noise is None else torch.from_numpy(noise[:, i].copy())
            x = sched.step(model_output(x, t), t, x, eta=eta, variance_noise=var,
                           return_dict=False)[0]
    finally:
        sched.alphas_cumprod, sched.final_alpha_cumprod = table, final
    return np.asarray(x.numpy())


def fewstep_loop(meta: ModelMeta, steps: int, x_T: Any, eta: float = 0.0,
                 noise: Any = None) -> Any:
    """The runtime's loop (``sampling.run_loop``), with the model's default spacing."""
    plan = sampling.SamplingPlan.create(meta, steps, eta=eta)
    return sampling.run_loop(plan, lambda x, i: model_output(x, plan.timesteps[i]), x_T,
                             noise)


def fewstep_with_diffusers_prev(meta: ModelMeta, steps: int, x_T: np.ndarray) -> np.ndarray:
    """``ddim.step`` with diffusers' previous timestep t - T // steps."""
    s = meta.schedule
    ac, ts = s.alphas_cumprod(), s.timesteps(steps)
    final = 1.0 if s.set_alpha_to_one else float(ac[0])
    x = x_T
    for t in ts:
        prev = int(t) - s.num_train_timesteps // steps
        x = ddim.step(model_output(x, int(t)), x, float(ac[t]),
                      float(ac[prev]) if prev >= 0 else final,
                      prediction_type=meta.prediction_type,
                      clip_sample_range=s.clip_sample_range)
    return x


def same_previous_timesteps(meta: ModelMeta, steps: int) -> bool:
    ts = meta.schedule.timesteps(steps).tolist()
    ratio = meta.schedule.num_train_timesteps // steps
    return all(
        (t - ratio if t - ratio >= 0 else None) == (ts[i + 1] if i + 1 < steps else None)
        for i, t in enumerate(ts)
    )


def assert_close(ours: np.ndarray, ref: np.ndarray, rtol: float, what: object) -> None:
    """Relative to the sample's scale (an epsilon model without clipping reaches |x| ~ 100)."""
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - ref)))
    assert err <= rtol * scale, (what, err, scale)


def check_loop(sched: Any, steps: int, what: object, plain: bool = True) -> None:
    """fewstep's loop (numpy float64, torch float32) against diffusers'; ``plain``: also
    diffusers' unchanged loop against ``ddim.step`` fed its previous timesteps."""
    meta = meta_of(sched)
    ratio = meta.schedule.prev_rule == "ratio"
    assert ratio == (type(sched).__name__ == "DDIMScheduler")
    use_float64_tables(sched, meta.schedule)
    x_T = np.random.default_rng(steps).standard_normal(SHAPE)
    ours = fewstep_loop(meta, steps, x_T)
    ours_torch = fewstep_loop(meta, steps, torch.from_numpy(x_T).float())
    assert ours_torch.dtype == torch.float32
    same = same_previous_timesteps(meta, steps)
    ref = diffusers_loop(sched, steps, x_T, next_entry=not (ratio or same))
    assert_close(ours, ref, 1e-9, what)
    assert_close(ours_torch.numpy(), ref, TORCH_RTOL, what)  # float32 arithmetic
    if plain and ratio and not same:
        # fewstep's own rule (the next entry) against diffusers' arithmetic with that entry
        own = dataclasses.replace(meta, schedule=dataclasses.replace(meta.schedule,
                                                                     prev_rule="next"))
        assert_close(fewstep_loop(own, steps, x_T),
                     diffusers_loop(sched, steps, x_T, next_entry=True), 1e-9, what)


# ---------------------------------------------------------------------------------
# Timesteps and tables
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", dc.SCHEDULER_CLASSES)
@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_equal_set_timesteps(cls: str, spacing: str, num_train_timesteps: int,
                                       steps_offset: int) -> None:
    sched = scheduler(cls, num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                      steps_offset=steps_offset)
    schedule = dc.schedule_from_scheduler(sched).schedule
    assert schedule.timestep_spacing == spacing
    overshoot = []
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        theirs = sched.timesteps.tolist()
        ours = schedule.timesteps(steps).tolist()
        if len(theirs) == steps + 1:  # diffusers' trailing overshoot: a last entry -1
            assert spacing == "trailing" and theirs[-1] == -1
            overshoot.append(steps)
            theirs = theirs[:-1]
        assert ours == theirs, (steps, ours, theirs)
    assert overshoot == ([29, 31] if (spacing, num_train_timesteps) == ("trailing", 100)
                         else [])


@pytest.mark.parametrize("beta_schedule", ddim.BETA_SCHEDULES)
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_equal_diffusers(beta_schedule: str, num_train_timesteps: int,
                                        rescale: bool) -> None:
    sched = scheduler(beta_schedule=beta_schedule, num_train_timesteps=num_train_timesteps,
                      rescale_betas_zero_snr=rescale, prediction_type="v_prediction")
    ours = dc.schedule_from_scheduler(sched).schedule.alphas_cumprod()
    theirs = sched.alphas_cumprod.double().numpy()
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, rtol=5e-5 if rescale else 2e-6, atol=1e-9)
    if rescale:
        assert ours[-1] == theirs[-1] == 0.0


def test_trained_betas_equal_diffusers() -> None:
    betas = np.sort(np.random.default_rng(0).uniform(1e-4, 0.05, 100)).tolist()
    sched = scheduler(num_train_timesteps=100, trained_betas=betas, beta_schedule="linear",
                      timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    schedule = dc.schedule_from_scheduler(sched).schedule
    assert schedule.trained_betas == tuple(betas)
    np.testing.assert_allclose(schedule.alphas_cumprod(), sched.alphas_cumprod.double().numpy(),
                               rtol=2e-6)
    for steps in (1, 3, 10, 29, 50):
        check_loop(sched, steps, ("trained", steps))


# ---------------------------------------------------------------------------------
# Whole loops
# ---------------------------------------------------------------------------------

COMBOS = list(itertools.product([True, False], [True, False], ddim.BETA_SCHEDULES,
                                ddim.PREDICTION_TYPES))  # alpha_one, clip, betas, prediction


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_loop_equals_diffusers_for_1_to_50_steps(spacing: str, num_train_timesteps: int,
                                                 steps_offset: int) -> None:
    """Every step count 1..50; the other options rotate through all 36 combinations
    (each combination meets every spacing, offset and T at several step counts)."""
    shift = 7 * (ddim.SPACINGS.index(spacing) * 4 + (num_train_timesteps == 100) * 2
                 + steps_offset)
    for steps in range(1, 51):
        alpha_one, clip, beta, prediction = COMBOS[(steps + shift) % len(COMBOS)]
        sched = scheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                          steps_offset=steps_offset, set_alpha_to_one=alpha_one,
                          clip_sample=clip, beta_schedule=beta, prediction_type=prediction)
        check_loop(sched, steps, (steps, alpha_one, clip, beta, prediction), plain=False)


@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("num_train_timesteps", [100, 1000])
def test_loop_equals_diffusers_for_every_option_combination(spacing: str,
                                                            num_train_timesteps: int) -> None:
    """The full product of the options (both offsets) at 1, 3 and 7 steps."""
    for offset, (alpha_one, clip, beta, prediction) in itertools.product([0, 1], COMBOS):
        sched = scheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing,
                          steps_offset=offset, set_alpha_to_one=alpha_one, clip_sample=clip,
                          clip_sample_range=0.8, beta_schedule=beta, prediction_type=prediction)
        for steps in (1, 3, 7):
            check_loop(sched, steps, (steps, offset, alpha_one, clip, beta, prediction))


def test_where_diffusers_ddim_takes_another_previous_timestep() -> None:
    """T=1000, 3 trailing steps visit 999, 666, 332: DDIMScheduler.step goes 666 → 333
    and 332 → the final alpha, and so does an imported model (prev_rule "ratio");
    fewstep's own rule goes 666 → 332, as DDPMScheduler's previous_timestep says, and
    the loops differ by far more than rounding."""
    sched = scheduler(timestep_spacing="trailing", clip_sample=False)
    meta = meta_of(sched)
    use_float64_tables(sched, meta.schedule)
    assert not same_previous_timesteps(meta, 3)
    ac = meta.schedule.alphas_cumprod()
    assert meta.schedule.step_alphas(3)[2].tolist() == [ac[666], ac[333], 1.0]
    own = dataclasses.replace(meta, schedule=dataclasses.replace(meta.schedule,
                                                                 prev_rule="next"))
    ddpm = scheduler("DDPMScheduler", timestep_spacing="trailing")
    ddpm.set_timesteps(3)
    assert [int(ddpm.previous_timestep(t)) for t in ddpm.timesteps] == [666, 332, -1]
    assert own.schedule.step_alphas(3)[2].tolist() == [ac[666], ac[332], 1.0]
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    theirs = diffusers_loop(sched, 3, x_T, next_entry=False)
    assert_close(fewstep_loop(meta, 3, x_T), theirs, 1e-9, "imported")
    assert np.max(np.abs(fewstep_loop(own, 3, x_T) - theirs)) > 1e-3
    assert_close(fewstep_with_diffusers_prev(meta, 3, x_T), theirs, 1e-9, "plain")


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_zero_terminal_snr_loop_equals_diffusers(prediction_type: str, spacing: str) -> None:
    for steps in (1, 4, 10):
        sched = scheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type,
                          timestep_spacing=spacing, beta_schedule="scaled_linear",
                          clip_sample=False)
        check_loop(sched, steps, steps)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", ddim.SPACINGS)
@pytest.mark.parametrize("prediction_type", ddim.PREDICTION_TYPES)
def test_eta_loop_equals_diffusers(eta: float, spacing: str, prediction_type: str) -> None:
    """σ_t(η) is the same formula: with the same noise the stochastic loops agree."""
    for steps, clip, alpha_one in ((4, True, True), (7, False, False), (10, True, False)):
        sched = scheduler(timestep_spacing=spacing, prediction_type=prediction_type,
                          clip_sample=clip, set_alpha_to_one=alpha_one, steps_offset=1,
                          beta_schedule="squaredcos_cap_v2")
        meta = meta_of(sched)
        use_float64_tables(sched, meta.schedule)
        gen = np.random.default_rng(steps)
        x_T = gen.standard_normal(SHAPE)
        noise = gen.standard_normal((SHAPE[0], steps, *SHAPE[1:]))
        ours = fewstep_loop(meta, steps, x_T, eta, noise)
        ours_torch = fewstep_loop(meta, steps, torch.from_numpy(x_T).float(), eta,
                                  torch.from_numpy(noise).float())
        ref = diffusers_loop(sched, steps, x_T, next_entry=meta.schedule.prev_rule == "next",
                             eta=eta, noise=noise)
        assert_close(ours, ref, 1e-9, steps)
        assert_close(ours_torch.numpy(), ref, TORCH_RTOL, steps)


@pytest.mark.parametrize("prediction_type", ddim.PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ddim.SPACINGS)
def test_eta_one_equals_ddpm_scheduler_step(prediction_type: str, spacing: str) -> None:
    """η = 1 is DDPM's posterior step with variance_type fixed_small (without clipping,
    which DDPM applies to x0 before forming its mean, DDIM after splitting off ε). The
    reference is DDPMScheduler.step itself, whose previous timestep is the next entry."""
    for steps in (1, 3, 10):
        sched = scheduler("DDPMScheduler", timestep_spacing=spacing, clip_sample=False,
                          prediction_type=prediction_type, variance_type="fixed_small")
        meta = meta_of(sched)
        use_float64_tables(sched, meta.schedule)
        gen = np.random.default_rng(steps)
        x_T = gen.standard_normal(SHAPE)
        ts = diffusers_timesteps(sched, steps)
        # DDPMScheduler draws torch.randn from the generator at every step with t > 0.
        replay = torch.Generator().manual_seed(steps)
        noise = torch.stack([torch.randn(SHAPE, generator=replay, dtype=torch.float64)
                             if t > 0 else torch.zeros(SHAPE, dtype=torch.float64)
                             for t in ts], dim=1).numpy()
        g = torch.Generator().manual_seed(steps)
        x = torch.from_numpy(x_T.copy())
        for t in ts:
            x = sched.step(model_output(x, t), t, x, generator=g, return_dict=False)[0]
        ours = fewstep_loop(meta, steps, x_T, 1.0, noise)
        assert_close(ours, x.numpy(), 1e-9, steps)


# ---------------------------------------------------------------------------------
# The config mapping
# ---------------------------------------------------------------------------------


def test_defaults_are_diffusers_defaults() -> None:
    for cls in dc.SCHEDULER_CLASSES:
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        options = {name: p.default for name, p in params.items() if name != "self"}
        assert set(options) == dc.OPTIONS[cls], cls
        assert options == {k: dc.DEFAULTS[k] for k in options}, cls


def test_every_option_is_mapped() -> None:
    config = dict(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03,
                  beta_schedule="scaled_linear", clip_sample=True, clip_sample_range=2.5,
                  set_alpha_to_one=False, steps_offset=3, prediction_type="v_prediction",
                  timestep_spacing="linspace", rescale_betas_zero_snr=True)
    mapped = dc.schedule_from_scheduler(scheduler(**config))
    assert mapped.prediction_type == "v_prediction"
    assert mapped.scheduler_class == "DDIMScheduler"
    assert mapped.schedule == Schedule(
        beta_schedule="scaled_linear", num_train_timesteps=500, beta_start=2e-4,
        beta_end=0.03, rescale_zero_terminal_snr=True, set_alpha_to_one=False,
        clip_sample_range=2.5, steps_offset=3, trained_betas=(), timestep_spacing="linspace",
        prev_rule="ratio")
    no_clip = dc.schedule_from_scheduler(scheduler(clip_sample=False, clip_sample_range=3.0))
    assert no_clip.schedule.clip_sample_range is None
    ddpm = dc.schedule_from_scheduler(scheduler("DDPMScheduler", variance_type="fixed_large"))
    assert ddpm.schedule.set_alpha_to_one  # DDPM's final alpha is always 1
    assert ddpm.schedule.timestep_spacing == "leading"  # diffusers' default, not fewstep's


def test_saved_config_file_round_trip(tmp_path: Path) -> None:
    for cls in dc.SCHEDULER_CLASSES:
        sched = scheduler(cls, beta_schedule="squaredcos_cap_v2", num_train_timesteps=100,
                          timestep_spacing="trailing", prediction_type="sample")
        sched.save_config(tmp_path / cls)
        from_file = dc.load_scheduler_config(tmp_path / cls / "scheduler_config.json")
        assert from_file == dc.schedule_from_scheduler(sched)
        assert from_file.scheduler_class == cls


def test_imported_model_samples_with_its_scheduler_spacing() -> None:
    meta = meta_of(scheduler(steps_offset=1))  # diffusers' default: leading
    plan = sampling.SamplingPlan.create(meta, 10)
    assert plan.timesteps == tuple(range(901, 0, -100))
    assert sampling.SamplingPlan.create(meta, 4, "trailing").timesteps == (999, 749, 499, 249)
    own = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                          height=4, width=4)
    assert sampling.SamplingPlan.create(own, 4).timesteps == (999, 749, 499, 249)
    again = ModelMeta.from_json(meta.to_json())
    assert again.schedule.timestep_spacing == "leading" and again == meta


BASE = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"thresholding": True}, "thresholding=True cannot be reproduced by fewstep"),
        ({"use_karras_sigmas": False},
         "use_karras_sigmas=False is not a DDIMScheduler option fewstep can reproduce"),
        ({"_class_name": "PNDMScheduler"},
         "_class_name='PNDMScheduler': fewstep reproduces DDIMScheduler and DDPMScheduler"),
        ({"_class_name": None}, "_class_name missing"),
        ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"},
         "variance_type='learned_range' cannot be reproduced by fewstep (a learned variance"),
        ({"_class_name": "DDPMScheduler", "set_alpha_to_one": False},
         "set_alpha_to_one=False is not a DDPMScheduler option"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' cannot be reproduced by "
         "fewstep; use one of linear, scaled_linear, squaredcos_cap_v2"),
        ({"prediction_type": "eps"}, "prediction_type='eps' cannot be reproduced"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras' cannot be reproduced"),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 is not a whole number in 1..100000"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps='1000' is not a whole number"),
        ({"num_train_timesteps": 10**30}, "is not a whole number in 1..100000"),
        ({"steps_offset": -1}, "steps_offset=-1 is not a whole number in 0..999"),
        ({"clip_sample": "yes"}, "clip_sample='yes' is not true or false"),
        ({"clip_sample_range": 0.0}, "clip_sample_range=0.0 must be > 0 with clip_sample=true"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start=0.5 and beta_end=0.1 must satisfy"),
        ({"beta_end": 10**400}, "(401 chars) is too large for a number (float64)"),
        ({"trained_betas": [0.1] * 999}, "trained_betas has 999 values for "
         "num_train_timesteps=1000; pass one beta per training timestep (1000 values)"),
        ({"trained_betas": [0.1] * 999 + [1.0]}, "trained_betas[999]=1.0 is not in (0, 1)"),
        ({"trained_betas": "0.1"}, "trained_betas='0.1' is not null or a list of numbers"),
        ({"rescale_betas_zero_snr": True},
         "rescale_betas_zero_snr=True cannot be sampled with prediction_type='epsilon'"),
    ],
)
def test_bad_configs_are_one_line_artifact_errors(changes: dict, message: str) -> None:
    config = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    with pytest.raises(ArtifactError) as e:
        dc.schedule_from_config(config, source="sched.json")
    text = str(e.value)
    assert text.startswith("sched.json: ") and message in text, text
    assert "\n" not in text and len(text) < 400


def test_legacy_and_private_keys_are_ignored() -> None:
    legacy = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1",
              "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
              "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
              "variance_type": "fixed_large", "tensor_format": "pt",
              "_use_default_values": ["steps_offset"]}
    mapped = dc.schedule_from_config(legacy)
    assert mapped.schedule == Schedule(timestep_spacing="leading")
    assert mapped.prediction_type == "epsilon"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "is not valid JSON"),
        (b'{"_class_name": "DDIMScheduler", "beta_end": NaN}', "NaN is not a number JSON"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[1, 2]", "a scheduler config is a JSON object, not list"),
        (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "scheduler_config.json"
    p.write_bytes(content)
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace("[", r"\[")):
        dc.load_scheduler_config(p)


def test_config_file_size_and_kind_are_checked(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**BASE, "pad": "x" * dc.MAX_CONFIG_BYTES}))
    with pytest.raises(ArtifactError, match="more than 4194304 a scheduler config can have"):
        dc.load_scheduler_config(big)
    with pytest.raises(ArtifactError, match="is not a regular file"):
        dc.load_scheduler_config(tmp_path)
    with pytest.raises(ArtifactError, match="cannot be read"):
        dc.load_scheduler_config(tmp_path / "missing.json")
    odd = tmp_path / "odd\nname.json"
    odd.write_text("{")
    with pytest.raises(ArtifactError) as e:
        dc.load_scheduler_config(odd)
    assert "\n" not in str(e.value) and "odd\\nname.json" in str(e.value)


@pytest.mark.slow
def test_exported_step_and_sampler_graphs_follow_a_diffusers_schedule() -> None:
    """The traced graphs take the schedule's options (clip range, final alpha, spacing
    and offset) from ddim.py: their loops equal diffusers' (float32 graphs)."""
    ort = pytest.importorskip("onnxruntime")
    from fewstep.export import onnx_export

    class Toy(torch.nn.Module):
        def forward(self, x: Any, t: Any, label: Any = None) -> Any:
            return model_output(x, t.reshape(-1, 1, 1, 1))

    sched = scheduler(num_train_timesteps=100, steps_offset=1, set_alpha_to_one=False,
                      clip_sample_range=0.5, prediction_type="v_prediction",
                      beta_schedule="squaredcos_cap_v2")  # leading spacing: diffusers'
    meta = meta_of(sched)
    use_float64_tables(sched, meta.schedule)
    steps = 7
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    ref = diffusers_loop(sched, steps, x_T, next_entry=False)  # leading: same previous t
    options = onnx_export.ExportOptions(fused=("step", "sampler"), sampler_steps=(steps,),
                                        sampler_output="float")
    sessions = {}
    for kind, module, gmeta in onnx_export.graph_modules(Toy(), meta, options):
        if kind == "denoiser":  # no schedule inside
            continue
        model = onnx_export.trace(module, gmeta, options.target_opset)
        sessions[kind] = ort.InferenceSession(model.SerializeToString(),
                                              providers=["CPUExecutionProvider"])
        if kind == "sampler":
            assert gmeta.graph.spacing == "leading"  # the schedule's default spacing
    x32 = x_T.astype(np.float32)
    (sampled,) = sessions["sampler"].run(None, {"x": x32})
    assert_close(sampled, ref, TORCH_RTOL, "sampler graph")
    plan = sampling.SamplingPlan.create(meta, steps)
    assert plan.timesteps == (85, 71, 57, 43, 29, 15, 1)
    assert plan.a_prev[-1] == meta.schedule.alphas_cumprod()[0]  # set_alpha_to_one=false
    x = x32
    b = SHAPE[0]
    for i, t in enumerate(plan.timesteps):
        (x,) = sessions["step"].run(None, {
            "x": x, "t": np.full(b, t, np.float32),
            "a_t": np.full(b, plan.a_t[i], np.float32),
            "a_prev": np.full(b, plan.a_prev[i], np.float32),
            "eta": np.zeros(b, np.float32), "noise": np.zeros(SHAPE, np.float32)})
    assert_close(x, ref, TORCH_RTOL, "step graph")
    # the clip range is in the graphs: without it the loop ends elsewhere
    unclipped = scheduler(num_train_timesteps=100, steps_offset=1, set_alpha_to_one=False,
                          clip_sample=False, prediction_type="v_prediction",
                          beta_schedule="squaredcos_cap_v2")
    use_float64_tables(unclipped, meta.schedule)
    assert np.max(np.abs(diffusers_loop(unclipped, steps, x_T, next_entry=False) - ref)) > 1e-2
