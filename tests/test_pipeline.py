"""runtime/pipeline.py: every generation path checked against oracles, not golden numbers.

The oracle network returns the exact output for a known x0, so DDIM must return x0 at
any step count, spacing and η, through every path (fused sampler, step graph via
run_loop, denoiser with the update on the host), with numpy oracle graphs and with
hand-made ONNX oracles on ONNX Runtime's CPU provider. A "toy" network (the oracle
plus b·x) makes the images depend on the noise, for batch-split, seed, thread and
cross-backend checks, and for parity with the PyTorch reference sampler.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_oracle as oo
import pytest

from fewstep.runtime import ddim, noise, sampling
from fewstep.runtime.backends import Graph
from fewstep.runtime.backends.oracle import make_oracle, write_oracle_file
from fewstep.runtime.errors import ArtifactError, NumericalError
from fewstep.runtime.images import (
    nonfinite_images,
    nonfinite_marker,
    to_uint8_nhwc,
    to_uint8_nhwc_marked,
)
from fewstep.runtime.meta import ModelMeta, Schedule
from fewstep.runtime.pipeline import Pipeline

SPACINGS = ddim.SPACINGS
TOL = 1e-5


def pixels(x0: np.ndarray) -> np.ndarray:
    return to_uint8_nhwc(np.asarray(x0, dtype=np.float32))


def float_tol(meta: ModelMeta, steps: int, spacing: str, path: str) -> float:
    """1e-5, except where float32 itself cannot do better (see the comments)."""
    ts = meta.schedule.timesteps(steps, spacing)
    if path in ("step", "sampler") and ts[0] == 0:
        # One step at t=0 from pure noise: ε is ~100x x_T, and a_t = ᾱ_0 ≈ 0.9999 enters
        # the fused graph as float32, so 1 - a_t keeps only ~3 significant digits.
        return 2e-3
    if meta.prediction_type == "epsilon" and ts[0] == meta.schedule.num_train_timesteps - 1:
        # ε is float32; recovering x0 divides its rounding by √ᾱ_999 ≈ 0.006.
        return 1e-4
    return TOL


def sampler_of(meta: ModelMeta, x0: np.ndarray, steps: int, spacing: str, eta: float,
               fmt: str = "float", bias: float = 0.0) -> Graph:
    g = meta.for_graph(kind="sampler", steps=steps, spacing=spacing, eta=eta, output_format=fmt)
    graph: Graph = oo.toy(g, x0, bias, path=f"<sampler-{steps}>")
    return graph


def pipe_of(meta: ModelMeta, x0: np.ndarray, kind: str, bias: float = 0.0,
            **sampler: Any) -> Pipeline:
    if kind == "sampler":
        return Pipeline.from_graphs([sampler_of(meta, x0, bias=bias, **sampler)])
    return Pipeline.from_graphs([oo.toy(meta.for_graph(kind=kind), x0, bias, path=f"<{kind}>")])


@pytest.fixture(scope="module")
def cond_meta() -> ModelMeta:
    return oo.make_meta("v_prediction", num_classes=3)


@pytest.fixture(scope="module")
def cond_x0(cond_meta: ModelMeta) -> np.ndarray:
    return oo.pixel_x0(cond_meta)


# ---------------------------------------------------------------------------------
# Exactness through every path (numpy oracle graphs)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("path", ["denoiser", "step", "sampler", "sampler-uint8"])
def test_oracle_returns_x0_on_every_path(path: str, spacing: str, eta: float,
                                         cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    labels = np.arange(5) % 3
    want = cond_x0[labels]
    for steps in range(1, 21):
        if path.startswith("sampler"):
            fmt = "uint8" if path.endswith("uint8") else "float"
            pipe = pipe_of(cond_meta, cond_x0, "sampler", steps=steps, spacing=spacing, eta=eta,
                           fmt=fmt)
        else:
            pipe = pipe_of(cond_meta, cond_x0, path)
        images = pipe.generate(5, steps, eta=eta, spacing=spacing, seed=steps)
        assert pipe.last_path == path.split("-")[0]
        np.testing.assert_array_equal(images, pixels(want), err_msg=f"{path} steps={steps}")
        if path != "sampler-uint8":
            x = pipe.generate(5, steps, eta=eta, spacing=spacing, seed=steps, output="samples")
            err = np.abs(x - want).max()
            assert err <= float_tol(cond_meta, steps, spacing, path), (path, steps, err)


@pytest.mark.parametrize("prediction_type", ddim.PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("kind", ["denoiser", "step"])
def test_oracle_exact_for_every_parameterisation(prediction_type: str, schedule: str,
                                                 kind: str) -> None:
    meta = oo.make_meta(prediction_type, schedule=Schedule(beta_schedule=schedule))
    x0 = oo.pixel_x0(meta)
    pipe = pipe_of(meta, x0, kind)
    for spacing in SPACINGS:
        for steps in (1, 2, 3, 4, 8, 20):
            x = pipe.generate(4, steps, spacing=spacing, output="samples")
            err = np.abs(x - x0).max()
            if schedule == "squaredcos_cap_v2" and prediction_type == "epsilon" and (
                meta.schedule.timesteps(steps, spacing)[0] == 999
            ):
                # cosine: ᾱ_999 ≈ 2e-9, ε cannot carry x0 at all from there (use v or x0).
                continue
            assert err <= float_tol(meta, steps, spacing, kind), (spacing, steps, err)
            np.testing.assert_array_equal(pipe.generate(4, steps, spacing=spacing), pixels(
                np.broadcast_to(x0, (4, *meta.image_shape))))


def test_fused_step_with_eta_1_stays_finite_near_zero_snr(tmp_path: Path) -> None:
    """Cosine schedule (ᾱ_999 ≈ 2e-9), η = 1, float32 coefficients: no NaN from the root."""
    meta = oo.make_meta("v_prediction", schedule=Schedule(beta_schedule="squaredcos_cap_v2"))
    x0 = oo.pixel_x0(meta)
    ort_pipe = Pipeline.load(oo.write_artifact(tmp_path, meta, x0), backend="ort-cpu")
    for pipe in (pipe_of(meta, x0, "step"), ort_pipe):
        for steps in (2, 3):
            x = pipe.generate(4, steps, eta=1.0, spacing="linspace", output="samples")
            assert pipe.last_path == "step"
            assert np.abs(x - x0).max() <= 1e-5


def test_labels_cycle_and_accept_names(cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    pipe = pipe_of(cond_meta, cond_x0, "denoiser")
    np.testing.assert_array_equal(pipe.generate(5, 3), pixels(cond_x0[[0, 1, 2, 0, 1]]))
    np.testing.assert_array_equal(pipe.generate(2, 3, labels="class2"), pixels(cond_x0[[2, 2]]))
    np.testing.assert_array_equal(pipe.generate(3, 3, labels=["class1", 0, "2"]),
                                  pixels(cond_x0[[1, 0, 2]]))


@pytest.mark.parametrize("kind", ["denoiser", "step", "sampler"])
def test_guidance_scales_between_conditional_and_null(kind: str, cond_meta: ModelMeta) -> None:
    x0 = oo.pixel_x0(cond_meta, rows=4) * 0.4  # row 3: the null label; stays inside the clip
    gmeta = cond_meta.for_graph(guidance=True)
    for g in (0.0, 1.0, 2.0, None):
        if kind == "sampler":
            pipe = pipe_of(gmeta, x0, "sampler", steps=4, spacing="trailing", eta=0.0)
        else:
            pipe = pipe_of(gmeta, x0, kind)
        x = pipe.generate(3, 4, guidance=g, output="samples")
        scale = 1.0 if g is None else g
        want = np.clip(x0[3] + scale * (x0[:3] - x0[3]), -1, 1)
        assert np.abs(x - want).max() <= TOL, (kind, g)


# ---------------------------------------------------------------------------------
# img2img and inpainting
# ---------------------------------------------------------------------------------


class Spy:
    """Wraps a graph and records what the pipeline feeds it."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.meta = graph.meta
        self.path = graph.path
        self.backend = graph.backend
        self.max_batch = graph.max_batch
        self.calls: list[dict[str, np.ndarray]] = []
        self.loops: list[tuple[np.ndarray, dict[str, Any], list[dict[str, Any]]]] = []

    def run(self, feeds: Any) -> Any:
        self.calls.append({k: np.array(v) for k, v in feeds.items()})
        return self.graph.run(feeds)

    def run_loop(self, x: Any, fixed: Any, per_step: Any) -> Any:
        self.loops.append((np.array(x), dict(fixed), list(per_step)))
        return self.graph.run_loop(x, fixed, per_step)


@pytest.mark.parametrize("kind", ["denoiser", "step"])
def test_img2img_starts_at_the_strength_step_from_the_noised_image(
        kind: str, cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    init = oo.pixel_x0(cond_meta, rows=1, seed=9)[0].astype(np.float32)
    spy = Spy(oo.toy(cond_meta.for_graph(kind=kind), cond_x0, 0.0))
    pipe = Pipeline.from_graphs([spy])
    images = pipe.generate(3, 10, init_image=init, strength=0.3, seed=4)
    plan = sampling.SamplingPlan.create(cond_meta, 10, "trailing", 0.0, 0.3)
    assert plan.start == 7
    x_T, _ = noise.generation_noise(4, range(3), cond_meta.image_shape)
    first_x = sampling.initial_state(plan, x_T, init)
    if kind == "denoiser":
        assert [float(c["t"][0]) for c in spy.calls] == list(plan.timesteps[7:])
        np.testing.assert_allclose(spy.calls[0]["x"], first_x, atol=1e-6)
    else:
        (x, _, steps), = spy.loops
        assert [float(s["t"][0]) for s in steps] == list(plan.timesteps[7:])
        assert [float(s["a_prev"][0]) for s in steps] == pytest.approx(plan.a_prev[7:])
        np.testing.assert_allclose(x, first_x, atol=1e-6)
    np.testing.assert_array_equal(images, pixels(cond_x0[[0, 1, 2]]))  # the oracle still wins
    assert pipe.last_info is not None and pipe.last_info.steps == 3


def _mask(meta: ModelMeta) -> np.ndarray:
    m = np.zeros((meta.height, meta.width), np.float32)
    m[:, : meta.width // 2] = 1.0  # regenerate the left half, keep the right half
    return m


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["denoiser", "step"])
def test_inpainting_keeps_the_masked_out_pixels_exactly(
        kind: str, eta: float, cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    init_u8 = pixels(oo.pixel_x0(cond_meta, rows=1, seed=5))[0]  # (H, W, C) uint8
    pipe = pipe_of(cond_meta, cond_x0, kind)
    m = _mask(cond_meta)
    for steps in (1, 3, 8):
        images = pipe.generate(3, steps, eta=eta, init_image=init_u8, mask=m, seed=steps)
        assert pipe.last_path == ("step-blend" if kind == "step" else "denoiser")
        keep = m == 0
        for i in range(3):
            np.testing.assert_array_equal(images[i][keep], init_u8[keep])
            np.testing.assert_array_equal(images[i][~keep], pixels(cond_x0[[i]])[0][~keep])


# ---------------------------------------------------------------------------------
# Determinism: batch splits, seeds, threads
# ---------------------------------------------------------------------------------


def _toy_pipes(meta: ModelMeta, x0: np.ndarray) -> dict[str, Pipeline]:
    return {
        "denoiser": pipe_of(meta, x0, "denoiser", bias=0.3),
        "step": pipe_of(meta, x0, "step", bias=0.3),
        "sampler": pipe_of(meta, x0, "sampler", bias=0.3, steps=4, spacing="trailing", eta=1.0),
        "sampler-uint8": pipe_of(meta, x0, "sampler", bias=0.3, steps=4, spacing="trailing",
                                 eta=1.0, fmt="uint8"),
    }


@pytest.mark.parametrize("path", ["denoiser", "step", "sampler", "sampler-uint8"])
def test_batch_split_does_not_change_images(path: str, cond_meta: ModelMeta,
                                            cond_x0: np.ndarray) -> None:
    pipe = _toy_pipes(cond_meta, cond_x0)[path]
    runs = [pipe.generate(7, 4, eta=1.0, seed=11, batch_size=b) for b in (1, 3, 16)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)
    assert len(np.unique(runs[0].reshape(7, -1), axis=0)) == 7
    # image i does not depend on how many images were asked for
    np.testing.assert_array_equal(pipe.generate(3, 4, eta=1.0, seed=11), runs[0][:3])


def test_seed_changes_images_and_same_seed_repeats(cond_meta: ModelMeta,
                                                  cond_x0: np.ndarray) -> None:
    for pipe in _toy_pipes(cond_meta, cond_x0).values():
        a = pipe.generate(4, 4, eta=1.0, seed=0)
        assert not np.array_equal(a, pipe.generate(4, 4, eta=1.0, seed=1))
        np.testing.assert_array_equal(a, pipe.generate(4, 4, eta=1.0, seed=0))


def test_paths_agree_with_each_other(cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    pipes = _toy_pipes(cond_meta, cond_x0)
    ref = pipes["denoiser"].generate(6, 4, eta=1.0, seed=2, output="samples")
    for name in ("step", "sampler"):
        assert np.abs(pipes[name].generate(6, 4, eta=1.0, seed=2,
                output="samples") - ref).max() <= 1e-4


def _threads_vs_serial(pipe: Pipeline, **kw: Any) -> None:
    serial = [pipe.generate(5, 4, seed=s, **kw) for s in range(8)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(s: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[s] = pipe.generate(5, 4, seed=s, batch_size=2, **kw)
                np.testing.assert_array_equal(results[s], serial[s])
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for s in range(8):
        np.testing.assert_array_equal(results[s], serial[s])


@pytest.mark.parametrize("path", ["denoiser", "step", "sampler"])
def test_eight_threads_give_the_serial_images(path: str, cond_meta: ModelMeta,
                                              cond_x0: np.ndarray) -> None:
    _threads_vs_serial(_toy_pipes(cond_meta, cond_x0)[path], eta=1.0)


def test_max_batch_of_a_graph_splits_the_work(cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    spy = Spy(oo.toy(cond_meta, cond_x0, 0.3))
    spy.max_batch = 2
    pipe = Pipeline.from_graphs([spy])
    done: list[tuple[int, int]] = []
    images = pipe.generate(5, 2, seed=3, progress=lambda d, t: done.append((d, t)))
    assert max(len(c["x"]) for c in spy.calls) == 2
    assert done == [(2, 5), (4, 5), (5, 5)]
    np.testing.assert_array_equal(images, pipe_of(cond_meta, cond_x0, "denoiser", 0.3).generate(
        5, 2, seed=3))


# ---------------------------------------------------------------------------------
# ONNX Runtime (CPU) with hand-made ONNX oracles
# ---------------------------------------------------------------------------------


FUSED = ((1, "trailing"), (3, "leading"), (7, "linspace"))


@pytest.fixture(scope="module")
def ort_artifacts(tmp_path_factory: pytest.TempPathFactory, cond_meta: ModelMeta,
                  cond_x0: np.ndarray) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort")
    out = {}
    for name, kw in {
        "denoiser": dict(step=False),
        "step": dict(step=True),
        "toy": dict(step=True, bias_x=0.3, samplers=((4, "trailing", 1.0, "float"),)),
    }.items():
        folder = root / name
        folder.mkdir()
        out[name] = oo.write_artifact(folder, cond_meta, cond_x0, **kw)  # type: ignore[arg-type]
    folder = root / "samplers"  # fused samplers only: one spacing per step count
    folder.mkdir()
    samplers = tuple((steps, sp, e, "float") for steps, sp in FUSED for e in (0.0, 1.0))
    oo.write_artifact(folder, cond_meta, cond_x0, step=False, denoiser=False,
                      samplers=(*samplers, (4, "trailing", 0.0, "uint8")))
    out["samplers"] = folder / "model.sampler-4.onnx"
    return out


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["denoiser", "step"])
def test_ort_oracle_exact(kind: str, eta: float, ort_artifacts: dict[str, Path],
                          cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    pipe = Pipeline.load(ort_artifacts[kind], backend="ort-cpu")
    assert pipe.backend == "ort-cpu"
    want = cond_x0[np.arange(4) % 3]
    for spacing in SPACINGS:
        for steps in (1, 2, 3, 5, 8, 20):
            x = pipe.generate(4, steps, eta=eta, spacing=spacing, seed=steps, output="samples")
            assert pipe.last_path == kind
            assert np.abs(x - want).max() <= float_tol(cond_meta, steps, spacing, kind)
            np.testing.assert_array_equal(
                pipe.generate(4, steps, eta=eta, spacing=spacing, seed=steps), pixels(want))


def test_ort_fused_samplers_exact(ort_artifacts: dict[str, Path], cond_meta: ModelMeta,
                                  cond_x0: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = Pipeline.load(ort_artifacts["samplers"], backend="ort-cpu")
    want = cond_x0[np.arange(4) % 3]
    for steps, spacing in FUSED:
        for eta in (0.0, 1.0):
            x = pipe.generate(4, steps, eta=eta, spacing=spacing, output="samples")
            assert pipe.last_info is not None
            assert pipe.last_info.path == "sampler"
            assert f"sampler-{steps}" in pipe.last_info.graph
            assert np.abs(x - want).max() <= float_tol(cond_meta, steps, spacing, "sampler")
    images = pipe.generate(4, 4, spacing="trailing")
    assert pipe.last_info is not None and pipe.last_info.graph.endswith("sampler-4.onnx")
    np.testing.assert_array_equal(images, pixels(want))
    with pytest.raises(ValueError) as e:
        pipe.generate(4, 5)
    msg = str(e.value)
    assert "no graph of model.sampler-4.onnx can run steps=5, spacing='trailing', eta=0" in msg
    assert "model.sampler-7.onnx (sampler, steps=7, spacing=linspace, eta=0, output float)" in msg
    assert "export the denoiser or step graph" in msg
    with pytest.raises(ValueError, match="can run steps=3, spacing='trailing'"):
        pipe.generate(4, 3, spacing="trailing")  # sampler-3 is leading


def test_ort_matches_numpy_on_every_path(ort_artifacts: dict[str, Path], cond_meta: ModelMeta,
                                         cond_x0: np.ndarray) -> None:
    pipe = Pipeline.load(ort_artifacts["toy"], backend="ort-cpu")
    numpy_pipes = _toy_pipes(cond_meta, cond_x0)
    x = pipe.generate(6, 4, eta=1.0, seed=7, spacing="trailing", output="samples")
    assert pipe.last_path == "sampler"
    np.testing.assert_allclose(
        x, numpy_pipes["sampler"].generate(6, 4, eta=1.0, seed=7, output="samples"), atol=1e-5)
    x = pipe.generate(6, 5, eta=1.0, seed=7, output="samples")
    assert pipe.last_path == "step"
    np.testing.assert_allclose(
        x, numpy_pipes["step"].generate(6, 5, eta=1.0, seed=7, output="samples"), atol=1e-5)
    m = _mask(cond_meta)
    init = oo.pixel_x0(cond_meta, rows=1, seed=5)[0].astype(np.float32)
    x = pipe.generate(3, 5, eta=1.0, seed=7, init_image=init, mask=m, output="samples")
    assert pipe.last_path == "step-blend"
    np.testing.assert_allclose(
        x, numpy_pipes["step"].generate(3, 5, eta=1.0, seed=7, init_image=init, mask=m,
                                        output="samples"),
        atol=1e-5)


def test_ort_threads_and_batch_splits(ort_artifacts: dict[str, Path]) -> None:
    pipe = Pipeline.load(ort_artifacts["toy"], backend="ort-cpu")
    _threads_vs_serial(pipe, eta=1.0)  # the fused sampler-4 (eta 1)
    _threads_vs_serial(pipe, eta=0.5)  # the step graph
    runs = [pipe.generate(7, 5, eta=1.0, seed=1, batch_size=b) for b in (1, 3, 16)]
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


# ---------------------------------------------------------------------------------
# Parity with the PyTorch reference sampler (train/reference.py)
# ---------------------------------------------------------------------------------


def test_same_images_as_the_pytorch_reference(cond_meta: ModelMeta) -> None:
    torch = pytest.importorskip("torch")
    from fewstep.train import reference

    x0 = oo.pixel_x0(cond_meta, rows=4) * 0.5  # row 3 = the null label
    ac = torch.from_numpy(cond_meta.schedule.alphas_cumprod())
    table = torch.from_numpy(x0)

    class TorchToy(torch.nn.Module):
        def forward(self, x: Any, t: Any, labels: Any = None) -> Any:
            a = ac[t.round().long()].reshape(-1, 1, 1, 1)
            x64 = x.double()
            rows = table[labels]
            eps = ddim.eps_from_x0(x64, rows, a)
            out = ddim.target_for(cond_meta.prediction_type, rows, eps, a).float()
            return out + x * 0.3

    model = TorchToy()
    gmeta = cond_meta.for_graph(guidance=True)
    init = oo.pixel_x0(cond_meta, rows=1, seed=8)[0].astype(np.float32)
    m = _mask(cond_meta)[None]
    cases: list[dict[str, Any]] = [
        dict(eta=0.0), dict(eta=1.0, labels=[2, 1, 0, 2, 1]), dict(eta=0.5, spacing="leading"),
        dict(eta=1.0, init=init, strength=0.6), dict(eta=1.0, init=init, mask=m),
        dict(eta=0.0, guidance=2.5), dict(eta=1.0, guidance=0.0, labels=1),
    ]
    for case in cases:
        guided = case.get("guidance") is not None
        meta = gmeta if guided else cond_meta
        ref = reference.sample(model, meta, 5, 6, seed=3, batch_size=2, **case)
        kw = {k: v for k, v in case.items() if k != "init"}
        kw["init_image"] = case.get("init")
        for kind in ("denoiser", "step"):
            pipe = Pipeline.from_graphs([oo.toy(meta.for_graph(kind=kind), x0, 0.3)])
            x = pipe.generate(5, 6, seed=3, **kw, output="samples")
            tol = 1e-5 if kind == "denoiser" else 2e-4  # fused: coefficients in float32
            assert np.abs(x - ref).max() <= tol, (kind, case, np.abs(x - ref).max())


# ---------------------------------------------------------------------------------
# Bad arguments: one line naming the value, the expectation and the fix
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=0), "n=0 must be a whole number >= 1"),
        (dict(n=2.5), "n=2.5 must be a whole number"),
        (dict(steps=0), "steps=0 must be a whole number >= 1; pass 1 <= steps <= 1000"),
        (dict(steps=-1), "steps=-1 must be a whole number >= 1"),
        (dict(steps=1200), "steps=1200 exceeds num_train_timesteps=1000 recorded in <denoiser>; "
                           "pass steps <= 1000"),
        (dict(steps=2.5), "steps=2.5 must be a whole number"),
        (dict(eta=-0.1), "eta=-0.1 is outside [0, 1]"),
        (dict(eta=1.5), "eta=1.5 is outside [0, 1]"),
        (dict(labels=3), "label 3 is outside the model's classes 0..2"),
        (dict(labels="sky"), "label 'sky' is not a class of this model; use one of class0"),
        (dict(labels=[0, 1]), "2 labels given for n=4 images"),
        (dict(guidance=2.0), "guidance=2.0 needs a graph exported with --guidance; re-export: "
                             "fewstep export"),
        (dict(guidance=-1.0), "guidance=-1.0 must be a number in [0, 50]"),
        (dict(spacing="middle"), "spacing='middle' is not supported; use one of leading"),
        (dict(strength=0), "strength=0 must be in (0, 1]"),
        (dict(strength=0.5), "strength=0.5 needs an init image"),
        (dict(mask=np.ones((8, 8))), "mask given without init_image"),
        (dict(batch_size=0), "batch_size=0 must be a whole number >= 1"),
        (dict(seed=-1), "seed=-1 is outside 0..2**64-1"),
        (dict(init_image=np.zeros((2, 4, 4), np.float32)),
         "init_image of shape (2, 4, 4) (float32) is not one or more images of this model's 3 "
         "channels"),
        (dict(init_image=np.zeros((5, 4, 4, 2), np.uint8)),
         "init_image of shape (5, 4, 4, 2) (uint8) is not one or more images"),
        (dict(init_image=np.zeros((3, 8, 8), np.float32), mask=np.ones((2, 3, 4, 4))),
         "mask of shape (2, 3, 4, 4) (float64) is not one or more masks"),
        (dict(init_image=np.zeros((2, 3, 8, 8), np.float32)), "2 init images for n=4"),
        (dict(init_image=np.zeros((3, 8, 8), np.float32), mask=np.ones((2, 8, 8))),
         "2 masks for n=4"),
        (dict(init_image=np.zeros((3, 8, 8), np.float32), mask=np.full((8, 8), 2.0)),
         "mask values must be in [0, 1]"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs: dict[str, Any], message: str,
                                                 cond_meta: ModelMeta,
                                                 cond_x0: np.ndarray) -> None:
    pipe = pipe_of(cond_meta, cond_x0, "denoiser")
    args = dict(n=4, steps=4)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipe.generate(**args)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert pipe.last_info is None  # nothing ran


def test_labels_on_an_unconditional_model() -> None:
    meta = oo.make_meta("v_prediction")
    pipe = pipe_of(meta, oo.pixel_x0(meta), "denoiser")
    with pytest.raises(ValueError, match="this model is unconditional; drop the labels"):
        pipe.generate(2, 2, labels=[0, 1])
    with pytest.raises(ValueError, match="needs a conditional model with null conditioning; "
                                         "it has no conditioning"):
        pipe.generate(2, 2, guidance=3.0)


def test_unknown_backend_lists_the_valid_ones(ort_artifacts: dict[str, Path]) -> None:
    with pytest.raises(ValueError) as e:
        Pipeline.load(ort_artifacts["denoiser"], backend="cuda")
    msg = str(e.value)
    assert "backend='cuda' is unknown; use one of auto, ort, ort-cpu, ort-cuda" in msg
    assert "oracle" in msg and "tensorrt" in msg


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist; pass --model PATH"):
        Pipeline.load(tmp_path / "nope.onnx")


def test_default_model_when_none_is_shipped() -> None:
    from fewstep.runtime import pipeline

    try:
        path = pipeline.default_model_path()
    except ArtifactError as e:
        assert "ships no default model" in str(e) and "--model" in str(e)
        with pytest.raises(ArtifactError, match="ships no default model"):
            Pipeline.load()
    else:
        assert path.name == "landscapes.onnx" and path.is_file()


def test_distilled_model_warns_once_for_other_step_counts(cond_x0: np.ndarray) -> None:
    meta = oo.make_meta("v_prediction", num_classes=3, distilled_steps=(4,),
                        distilled_spacing="trailing")
    pipe = pipe_of(meta, cond_x0, "denoiser")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(1, 4)
        pipe.generate(1, 8)
        pipe.generate(1, 8)
    messages = [str(w.message) for w in caught]
    assert messages == ["model was distilled for 4 steps; 8 steps may look worse"]


# ---------------------------------------------------------------------------------
# NaN / Inf
# ---------------------------------------------------------------------------------


class Poisoned(Spy):
    """Returns NaN from its ``bad``-th call on (run) or in its loop result (run_loop)."""

    def __init__(self, graph: Graph, bad: int) -> None:
        super().__init__(graph)
        self.bad = bad

    def run(self, feeds: Any) -> Any:
        out = np.array(super().run(feeds))
        if len(self.calls) > self.bad and out.dtype != np.uint8:
            out[0, 0, 0, 0] = np.nan
        return out

    def run_loop(self, x: Any, fixed: Any, per_step: Any) -> Any:
        # Steps at index >= bad (timesteps decrease) go bad, as a real overflow would,
        # and NaN/Inf in the input stays (as it would propagate).
        out = np.array(super().run_loop(x, fixed, per_step))
        t_bad = self.t_bad if hasattr(self, "t_bad") else np.inf
        if min(float(np.min(d["t"])) for d in per_step) <= t_bad or not np.all(np.isfinite(x)):
            out[-1, 0, 0, 0] = np.inf
        return out


@pytest.mark.parametrize("kind", ["denoiser", "step", "sampler"])
def test_nan_is_a_numerical_error_naming_the_step(kind: str, cond_meta: ModelMeta,
                                                  cond_x0: np.ndarray) -> None:
    if kind == "sampler":
        graph = sampler_of(cond_meta, cond_x0, 4, "trailing", 0.0)
    else:
        graph = oo.toy(cond_meta.for_graph(kind=kind), cond_x0, 0.0, path=f"model.{kind}.onnx")
    poisoned = Poisoned(graph, bad=0 if kind == "sampler" else 2)
    poisoned.t_bad = 499  # type: ignore[attr-defined]  # step 2 of 4 (trailing)
    pipe = Pipeline.from_graphs([poisoned])
    with pytest.raises(NumericalError) as e:
        pipe.generate(3, 4)
    msg = str(e.value)
    assert "--precision fp32" in msg and "fp16 overflow?" in msg
    if kind == "denoiser":
        assert "step 2 of 4 (t=499)" in msg
    elif kind == "step":
        # the loop ran on the device in one call; the rerun one step at a time names it
        assert "step 2 of 4 (t=499) produced NaN/Inf in model.step.onnx" in msg
    else:
        assert "sampler graph" in msg and "images 0..2" in msg


def test_uint8_sampler_nan_image_is_a_numerical_error_not_a_picture(
        cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    # Class 1's "clean image" is NaN: the uint8 sampler (graph contract, mirrored by the
    # oracle) outputs the nonfinite marker for those images, and generate refuses them.
    x0 = cond_x0.copy()
    x0[1, 0, 2, 3] = np.nan
    graph = sampler_of(cond_meta, x0, 4, "trailing", 0.0, fmt="uint8")
    pipe = Pipeline.from_graphs([graph])
    good = pipe.generate(2, 4, labels=[0, 2])
    assert good.dtype == np.uint8 and len(nonfinite_images(good)) == 0
    with pytest.raises(NumericalError, match=r"produced NaN/Inf for image\(s\) 1, 3 of"):
        pipe.generate(4, 4, labels=[0, 1, 2, 1])


def test_sampler_nan_is_located_through_the_step_graph(cond_meta: ModelMeta,
                                                       cond_x0: np.ndarray) -> None:
    x0 = cond_x0.copy()
    x0[1, 0, 2, 3] = np.nan
    sampler = sampler_of(cond_meta, x0, 4, "trailing", 0.0, fmt="uint8")
    step = oo.toy(cond_meta.for_graph(kind="step"), x0, 0.0, path="m.step.onnx")
    pipe = Pipeline.from_graphs([sampler, step])
    with pytest.raises(NumericalError) as e:
        pipe.generate(2, 4, labels=[0, 1])
    msg = str(e.value)
    assert "image(s) 1 of this call" in msg
    assert "rerun through m.step.onnx: step 0 of 4 (t=999) produced NaN/Inf" in msg


def test_nonfinite_marker_is_fixed_and_never_a_real_conversion() -> None:
    m = nonfinite_marker((8, 8, 3))
    assert m.dtype == np.uint8 and m.shape == (8, 8, 3)
    np.testing.assert_array_equal(m, nonfinite_marker((8, 8, 3)))
    assert len(np.unique(m)) > 64  # not a flat colour a model could plausibly produce
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 8, 8))
    x[3, 1, 1, 1] = np.inf
    out = to_uint8_nhwc_marked(x)
    assert list(nonfinite_images(out)) == [3]
    np.testing.assert_array_equal(out[[0, 1, 2, 4]], to_uint8_nhwc(x[[0, 1, 2, 4]]))


def test_inpainting_step_path_checks_every_step(cond_meta: ModelMeta,
                                                cond_x0: np.ndarray) -> None:
    graph = Poisoned(oo.toy(cond_meta.for_graph(kind="step"), cond_x0, 0.0, path="s.onnx"), 0)
    init = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(NumericalError, match=r"step 0 of 4 \(t=999\) produced NaN/Inf in s.onnx"):
        Pipeline.from_graphs([graph]).generate(2, 4, init_image=init, mask=_mask(cond_meta))


# ---------------------------------------------------------------------------------
# Graph choice, artifacts and siblings
# ---------------------------------------------------------------------------------


def test_samples_output_falls_back_from_a_uint8_sampler(cond_meta: ModelMeta,
                                                        cond_x0: np.ndarray) -> None:
    u8 = sampler_of(cond_meta, cond_x0, 4, "trailing", 0.0, fmt="uint8")
    only = Pipeline.from_graphs([u8])
    with pytest.raises(ValueError, match="with float output"):
        only.generate(2, 4, output="samples")
    both = Pipeline.from_graphs([u8, oo.toy(cond_meta, cond_x0, 0.0)])
    both.generate(2, 4)
    assert both.last_path == "sampler"
    both.generate(2, 4, output="samples")
    assert both.last_path == "denoiser"
    with pytest.raises(ValueError, match="img2img and inpainting need a step or denoiser"):
        only.generate(2, 4, init_image=np.zeros((3, 8, 8), np.float32), strength=0.5)


def test_a_sampler_runs_only_its_baked_loop(cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    fused = sampler_of(cond_meta, cond_x0, 4, "trailing", 0.0)
    pipe = Pipeline.from_graphs([fused, oo.toy(cond_meta, cond_x0, 0.0)])
    for kw, path in ((dict(steps=4), "sampler"), (dict(steps=4, spacing="leading"), "denoiser"),
                     (dict(steps=4, eta=0.5), "denoiser"), (dict(steps=5), "denoiser"),
                     (dict(steps=4, init_image=np.zeros((3, 8, 8), np.float32), strength=0.5),
                      "denoiser")):
        pipe.generate(2, **kw)
        assert pipe.last_path == path, kw


def test_guidance_picks_the_guidance_graph_only_when_asked(cond_meta: ModelMeta) -> None:
    x0 = oo.pixel_x0(cond_meta, rows=4) * 0.4
    plain = oo.toy(cond_meta, x0, 0.0, path="model.onnx")
    guided = oo.toy(cond_meta.for_graph(guidance=True), x0, 0.0, path="model-g.onnx")
    pipe = Pipeline.from_graphs([guided, plain])
    pipe.generate(2, 3)
    assert pipe.last_info is not None and pipe.last_info.graph == "model.onnx"
    pipe.generate(2, 3, guidance=2.0)
    assert pipe.last_info is not None and pipe.last_info.graph == "model-g.onnx"


def test_from_graphs_refuses_graphs_of_another_model(cond_meta: ModelMeta,
                                                     cond_x0: np.ndarray) -> None:
    other = oo.make_meta("v_prediction", num_classes=3, source_hash="sha256:other")
    with pytest.raises(ValueError, match="source_hash"):
        Pipeline.from_graphs([make_oracle(cond_meta, cond_x0),
                              make_oracle(other.for_graph(kind="step"), cond_x0)])


def test_load_ignores_siblings_of_another_model(tmp_path: Path, cond_meta: ModelMeta,
                                                cond_x0: np.ndarray) -> None:
    main = oo.write_artifact(tmp_path, cond_meta, cond_x0, step=False)
    other = oo.make_meta("v_prediction", num_classes=3, source_hash="sha256:other")
    oo.write(tmp_path / "model.step.onnx", other.for_graph(kind="step"), cond_x0)
    fp16 = cond_meta.for_graph(kind="sampler", steps=4, spacing="trailing", precision="fp16")
    oo.write(tmp_path / "model.sampler-4.onnx", fp16, cond_x0)
    (tmp_path / "model.sampler-8.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "model-other.onnx").write_bytes(b"not a sibling")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.load(main, backend="ort-cpu")
    text = "\n".join(str(w.message) for w in caught)
    assert "ignoring " + str(tmp_path / "model.step.onnx") + ": its source_hash" in text
    assert "model.sampler-4.onnx: its precision ('fp16' vs 'fp32')" in text
    assert "model.sampler-8.onnx" in text and "model-other" not in text
    assert [g["kind"] for g in pipe.describe()["graphs"]] == ["denoiser"]
    pipe.generate(2, 4)
    assert pipe.last_path == "denoiser"


def test_siblings_open_lazily_and_describe(ort_artifacts: dict[str, Path]) -> None:
    pipe = Pipeline.load(ort_artifacts["toy"], backend="ort-cpu", threads=1)
    d = pipe.describe()
    assert d["backend"] == "ort-cpu" and d["source"] == str(ort_artifacts["toy"])
    kinds = {Path(g["path"]).name: (g["kind"], g["loaded"]) for g in d["graphs"]}
    assert kinds == {"model.onnx": ("denoiser", True), "model.step.onnx": ("step", False),
                     "model.sampler-4-eta1.onnx": ("sampler", False)}
    assert d["model"]["num_classes"] == 3 and d["model"]["prediction_type"] == "v_prediction"
    sampler = next(g for g in d["graphs"] if g["kind"] == "sampler")
    assert (sampler["steps"], sampler["spacing"], sampler["eta"]) == (4, "trailing", 1.0)
    assert d["graphs"][0]["runtime"]["providers"] == ["CPUExecutionProvider"]
    pipe.generate(1, 6)
    assert {Path(g.path).name for g in pipe.graphs} == {"model.onnx", "model.step.onnx"}


def test_oracle_json_artifact(tmp_path: Path, cond_meta: ModelMeta) -> None:
    main = write_oracle_file(tmp_path / "bench.oracle.json", cond_meta, x0_seed=3)
    write_oracle_file(tmp_path / "bench.step.oracle.json", cond_meta.for_graph(kind="step"), 3)
    pipe = Pipeline.load(main)
    assert pipe.backend == "oracle"
    x = pipe.generate(3, 5, output="samples")
    assert pipe.last_path == "step"
    x0 = np.random.default_rng(3).uniform(-1, 1, (3, *cond_meta.image_shape))
    assert np.abs(x - x0).max() <= TOL


def test_save_grid(tmp_path: Path, cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    from PIL import Image

    pipe = pipe_of(cond_meta, cond_x0, "denoiser")
    images = pipe.generate(5, 2)
    out = pipe.save_grid(images, tmp_path / "grid.png", nrow=5, scale=2)
    with Image.open(out) as im:
        assert im.size == ((5 * 10 + 2) * 2, (8 + 4) * 2)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="does not exist; create it or pass another --out"):
        pipe.save_grid(images, tmp_path / "missing" / "grid.png")


def test_load_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is a folder, not a model file"):
        Pipeline.load(tmp_path)


def test_save_grid_writes_the_format_of_the_extension(tmp_path: Path) -> None:
    from PIL import Image

    from fewstep.runtime.images import grid_size

    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    h, w = grid_size(4, 8, 8, nrow=2)
    for ext, fmt in ((".png", "PNG"), (".jpg", "JPEG")):
        out = Pipeline.save_grid(imgs, tmp_path / f"g{ext}", nrow=2)
        with Image.open(out) as im:
            assert im.format == fmt and im.size == (w, h)


@pytest.mark.parametrize("kind", ["denoiser", "step", "sampler"])
def test_the_oracle_samples_any_shape_with_named_conditioning(kind: str) -> None:
    """A perfect denoiser of (16, 2) sequences conditioned on an observation vector:
    every graph kind returns its x0 through the whole pipeline, as float samples."""
    from fewstep.runtime.meta import CondSpec

    meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(num_train_timesteps=100),
                           sample_shape=(16, 2), images=False,
                           cond=(CondSpec("global_cond", "float32", (36,)),))
    x0 = np.random.default_rng(3).uniform(-1, 1, (16, 2))
    g = meta.for_graph(kind=kind, **({"steps": 4, "output_format": "float", "spacing": "trailing"}
                                     if kind == "sampler" else {}))
    pipe = Pipeline.from_graphs([make_oracle(g, x0)])
    obs = np.zeros((3, 36), np.float32)
    out = pipe.generate(3, 4, cond={"global_cond": obs})
    assert out.shape == (3, 16, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(x0, out.shape), atol=1e-4)
    with pytest.raises(ValueError, match="does not fit samples of shape"):
        make_oracle(g, np.zeros((3, 32, 32)))


# ---------------------------------------------------------------------------------
# Kept preparations (a repeated request skips its checks, graph choice and feeds)
# ---------------------------------------------------------------------------------


def test_a_repeated_request_reuses_its_feeds_and_gives_fresh_images(
        cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    spy = Spy(sampler_of(cond_meta, cond_x0, 4, "trailing", 0.0, bias=0.3))
    seen: list[dict[str, Any]] = []
    run = spy.run
    spy.run = lambda feeds: (seen.append(dict(feeds)), run(feeds))[1]  # type: ignore[method-assign]
    pipe = Pipeline.from_graphs([spy])
    a = pipe.generate(2, 4, seed=5, labels=1)
    b = pipe.generate(2, 4, seed=6, labels=1)
    c = pipe.generate(2, 4, seed=5, labels=2)
    # the label feed of the same request is the same (read-only) array; another label
    # is another preparation
    assert seen[0]["label"] is seen[1]["label"]
    assert not seen[0]["label"].flags.writeable
    np.testing.assert_array_equal(seen[2]["label"], [2, 2])
    # and every image is what a fresh pipeline gives: the seed is never kept
    fresh = pipe_of(cond_meta, cond_x0, "sampler", bias=0.3, steps=4, spacing="trailing",
                    eta=0.0)
    np.testing.assert_array_equal(a, fresh.generate(2, 4, seed=5, labels=1))
    np.testing.assert_array_equal(b, fresh.generate(2, 4, seed=6, labels=1))
    np.testing.assert_array_equal(c, fresh.generate(2, 4, seed=5, labels=2))
    assert not np.array_equal(a, b)


def test_arguments_equal_in_value_but_not_in_type_are_prepared_apart(
        cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    pipe = pipe_of(cond_meta, cond_x0, "denoiser", bias=0.3)
    pipe.generate(1, 2, eta=0, labels=1)
    # False == 0 and True == 1 (and hash alike), but neither is a valid eta, n or label
    for bad in ({"eta": False}, {"n": True}, {"labels": True}):
        with pytest.raises(ValueError):
            pipe.generate(**({"n": 1, "steps": 2, "eta": 0, "labels": 1} | bad))
    pipe.generate(1, 2, eta=0.0, labels=1)
    assert len(pipe._prepared) == 2


def test_a_backend_writing_into_a_kept_feed_fails_instead_of_changing_the_next_call(
        cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    spy = Spy(sampler_of(cond_meta, cond_x0, 4, "trailing", 0.0))

    def scribbles(feeds: Any) -> Any:
        feeds["label"][0] = 0
        return spy.graph.run(feeds)

    spy.run = scribbles  # type: ignore[method-assign]
    pipe = Pipeline.from_graphs([spy])
    with pytest.raises(ValueError, match="read-only"):
        pipe.generate(2, 4, labels=1)


def test_arrays_and_images_are_checked_anew_every_call(cond_meta: ModelMeta,
                                                       cond_x0: np.ndarray) -> None:
    pipe = pipe_of(cond_meta, cond_x0, "step", bias=0.3)
    labels = np.array([0, 1])
    a = pipe.generate(2, 4, labels=labels)
    labels[1] = 2  # the caller's array changed: so do the images
    b = pipe.generate(2, 4, labels=labels)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], b[1])
    assert not pipe._prepared
    with pytest.raises(ValueError, match="outside the model's classes"):
        pipe.generate(2, 4, labels=np.array([0, 7]))


def test_a_graph_that_fails_to_open_drops_the_kept_preparations(
        cond_meta: ModelMeta, cond_x0: np.ndarray) -> None:
    from fewstep.runtime.pipeline import _Entry

    step = oo.toy(cond_meta.for_graph(kind="step"), cond_x0, 0.3, path="<step>")
    sampler_meta = cond_meta.for_graph(kind="sampler", steps=4, spacing="trailing")

    def refuse() -> Graph:
        raise ArtifactError("this sampler cannot be opened")

    pipe = Pipeline([_Entry("<step>", step.meta, step),
                     _Entry("<sampler-4>", sampler_meta, None, refuse)], "oracle", "<step>")
    pipe.generate(1, 2)
    assert len(pipe._prepared) == 1
    with pytest.warns(UserWarning, match="cannot be opened"):
        out = pipe.generate(1, 4)  # tries the sampler first: it fails, the step graph runs
    assert pipe.last_path == "step"
    assert len(pipe._prepared) == 1  # only the request prepared after the failure
    np.testing.assert_array_equal(out, pipe.generate(1, 4))


def test_prefer_tries_that_graph_kind_first_and_falls_back(cond_meta: ModelMeta,
                                                           cond_x0: np.ndarray) -> None:
    graphs = [oo.toy(cond_meta.for_graph(kind=k), cond_x0, 0.3, path=f"<{k}>")
              for k in ("denoiser", "step")] + [
        sampler_of(cond_meta, cond_x0, 4, "trailing", 1.0, bias=0.3)]
    want = Pipeline.from_graphs(graphs).generate(3, 4, eta=1.0, seed=4, output="samples")
    assert Pipeline.from_graphs(graphs).last_path is None
    for prefer in ("sampler", "step", "denoiser"):
        pipe = Pipeline.from_graphs(graphs, prefer=prefer)
        got = pipe.generate(3, 4, eta=1.0, seed=4, output="samples")
        assert pipe.last_path == prefer
        assert np.abs(got - want).max() <= 1e-4
        # where the preferred kind cannot run (3 steps: no such sampler), the next does
        pipe.generate(1, 3, eta=1.0)
        assert pipe.last_path == ("step" if prefer == "sampler" else prefer)
    only_sampler = Pipeline.from_graphs(graphs[2:], prefer="step")
    only_sampler.generate(1, 4, eta=1.0)
    assert only_sampler.last_path == "sampler"
    with pytest.raises(ValueError, match="prefer='fused' is not supported"):
        Pipeline.from_graphs(graphs, prefer="fused")
