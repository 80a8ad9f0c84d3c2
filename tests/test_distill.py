"""train/distill.py: nested grids, the distillation target (oracle and real teacher), two
rounds end to end with export, exact resume, and the CLI's usage errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import quiet_options, tiny_config  # noqa: E402

from fewstep.runtime import ddim  # noqa: E402
from fewstep.runtime.meta import ModelMeta, Schedule  # noqa: E402
from fewstep.train import checkpoint as ckpt_io  # noqa: E402
from fewstep.train import cli_distill  # noqa: E402
from fewstep.train.distill import (  # noqa: E402
    METRICS,
    STATE,
    DistillConfig,
    DistillOptions,
    RoundPlan,
    check_nesting,
    distill,
    distill_target,
    halvings,
    loss_weight,
    round_name,
    teacher_two_steps,
)
from fewstep.train.fit import train  # noqa: E402

COSINE = Schedule(beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional tiny v-prediction model (20 steps: machinery, not quality)."""
    out = tmp_path_factory.mktemp("teacher")
    return train(tiny_config(steps=20, batch_size=8), quiet_options(out))


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uncond")
    return train(tiny_config(steps=1, batch_size=2, conditional=False), quiet_options(out))


def config(**kw: object) -> DistillConfig:
    fields: dict = dict(from_steps=8, to_steps=2, steps_per_round=(3,), batch_size=4,
                        warmup_steps=1)
    fields.update(kw)
    return DistillConfig(**fields)


def options(out: Path, **kw: object) -> DistillOptions:
    fields: dict = dict(out=out, device="cpu", workers=0, log_every=1, progress=False)
    fields.update(kw)
    return DistillOptions(**fields)


# ---------------------------------------------------------------------------------
# The grids and the target
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64, 128])
def test_trailing_grids_nest_for_every_round(steps: int) -> None:
    check_nesting(COSINE, steps, "trailing")
    ts2 = ddim.timesteps(1000, 2 * steps, "trailing")
    assert np.array_equal(ts2[0::2], ddim.timesteps(1000, steps, "trailing"))
    plan = RoundPlan.create(COSINE, steps, "trailing")
    _, a_t, a_prev = COSINE.step_alphas(steps, "trailing")
    assert plan.a_t == tuple(a_t) and plan.a_next == tuple(a_prev)  # student's own pairs
    assert plan.a_next[-1] == 1.0 and all(m > a for m, a in zip(plan.a_mid, plan.a_t, strict=True))


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_grids_that_do_not_nest_are_refused(spacing: str) -> None:
    with pytest.raises(ValueError, match=f"spacing='{spacing}' does not nest for 4 steps.*"
                                         "use spacing 'trailing'"):
        check_nesting(COSINE, 4, spacing)


def test_halvings() -> None:
    assert halvings(64, 4) == (32, 16, 8, 4)
    assert halvings(64, 1) == (32, 16, 8, 4, 2, 1)
    with pytest.raises(ValueError, match=r"to_steps=3 is not reachable .* \(64, 32, 16, 8, 4, "
                                         r"2, 1\)"):
        halvings(64, 3)
    with pytest.raises(ValueError, match="to_steps=128 is not below from_steps=64"):
        halvings(64, 128)


class OracleNet(torch.nn.Module):
    """The exact network output for a known x0 per class (float64)."""

    def __init__(self, meta: ModelMeta, x0: np.ndarray) -> None:
        super().__init__()
        self.prediction_type = meta.prediction_type
        self.x0 = torch.from_numpy(x0)
        self.ac = torch.from_numpy(meta.schedule.alphas_cumprod())

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        a = self.ac[t.long()].reshape(-1, 1, 1, 1)
        x0 = self.x0[label]
        return ddim.target_for(self.prediction_type, x0, ddim.eps_from_x0(x, x0, a), a)


def _round_inputs(steps: int, b: int = 3) -> tuple[RoundPlan, dict, torch.Tensor]:
    plan = RoundPlan.create(COSINE, steps, "trailing")
    i = torch.arange(steps).repeat_interleave(b)  # every student step, b examples each
    table = {k: torch.tensor(getattr(plan, k), dtype=torch.float64)[i].reshape(-1, 1, 1, 1)
             for k in ("a_t", "a_mid", "a_next")}
    table["t"] = torch.tensor(plan.t)[i]
    table["t_mid"] = torch.tensor(plan.t_mid)[i]
    return plan, table, i


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 4, 64])
def test_oracle_teacher_target_is_x0(prediction_type: str, steps: int) -> None:
    meta = ModelMeta.build(prediction_type=prediction_type, schedule=COSINE, channels=3,
                           height=4, width=4, num_classes=2)
    rng = np.random.default_rng(steps)
    x0_classes = rng.uniform(-0.9, 0.9, (2, 3, 4, 4))
    oracle = OracleNet(meta, x0_classes)
    _, tab, i = _round_inputs(steps)
    labels = i % 2
    x0 = torch.from_numpy(x0_classes)[labels]
    z_t = ddim.q_sample(x0, torch.from_numpy(rng.standard_normal(x0.shape)), tab["a_t"])
    z_next = teacher_two_steps(lambda x, t: oracle(x, t, labels), z_t, tab["t"], tab["t_mid"],
                               tab["a_t"], tab["a_mid"], tab["a_next"], prediction_type, 1.0)
    x_tilde = distill_target(z_t, z_next, tab["a_t"], tab["a_next"])
    torch.testing.assert_close(x_tilde, x0, atol=1e-7, rtol=0)


def test_one_student_step_to_the_target_lands_on_the_teachers_two(teacher: Path) -> None:
    ck = ckpt_io.load(teacher)
    net, meta = ck.build_model().double(), ck.meta
    for steps in (1, 2, 8):
        _, tab, i = _round_inputs(steps, b=2)
        labels = i % meta.num_classes
        gen = torch.Generator().manual_seed(steps)
        z_t = torch.randn((len(i), 3, 16, 16), generator=gen, dtype=torch.float64)
        with torch.no_grad():
            z_next = teacher_two_steps(
                lambda x, t, lab=labels: net(x, t.double(), lab), z_t, tab["t"], tab["t_mid"],
                tab["a_t"], tab["a_mid"], tab["a_next"], meta.prediction_type,
                meta.schedule.clip_sample_range)
        assert float((z_next - z_t).abs().max()) > 1e-3  # the teacher did move
        x_tilde = distill_target(z_t, z_next, tab["a_t"], tab["a_next"])
        # The ideal student output: v (or eps, x0) of (x̃, z_t) at a_t.
        eps = ddim.eps_from_x0(z_t, x_tilde, tab["a_t"])
        out = ddim.target_for(meta.prediction_type, x_tilde, eps, tab["a_t"])
        landed = ddim.step(out, z_t, tab["a_t"], tab["a_next"],
                           prediction_type=meta.prediction_type, clip_sample_range=None)
        torch.testing.assert_close(landed, z_next, atol=1e-9, rtol=0)
        # With the model's clipping the landing is exact wherever |x̃| <= clip range.
        clipped = ddim.step(out, z_t, tab["a_t"], tab["a_next"],
                            prediction_type=meta.prediction_type, clip_sample_range=1.0)
        inside = (x_tilde.abs() <= 1.0).expand_as(z_next)
        torch.testing.assert_close(clipped[inside], z_next[inside], atol=1e-9, rtol=0)


def test_loss_weights() -> None:
    a = np.array([2.4e-9, 0.3, 0.5, 0.9, 0.9999])
    snr = a / (1 - a)
    np.testing.assert_allclose(loss_weight(a), np.maximum(snr, 1.0))
    np.testing.assert_allclose(loss_weight(a, "snr+1"), snr + 1)
    assert torch.allclose(loss_weight(torch.tensor(a)), torch.tensor(np.maximum(snr, 1.0)))


# ---------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------


def test_two_rounds_write_distilled_checkpoints_that_export(
        teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    paths = distill(teacher, config(from_steps=4, to_steps=1, steps_per_round=(3, 2)),
                    options(out))
    assert [p.name for p in paths] == ["round_002.pt", "round_001.pt"]
    assert not list(out.glob("*.partial.pt"))
    base = ckpt_io.load(teacher)
    state = json.loads((out / STATE).read_text())
    assert [(r["from"], r["to"], r["steps"]) for r in state["rounds"]] == [(4, 2, 3), (2, 1, 2)]
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [(r["to"], r["step"]) for r in rows] == [(2, 1), (2, 2), (2, 3), (1, 1), (1, 2)]
    for path, n in zip(paths, (2, 1), strict=True):
        raw = torch.load(path, weights_only=True)  # a plain, pickle-free checkpoint
        assert raw["format"] == "fewstep-checkpoint"
        ck = ckpt_io.load(path)
        m = ck.meta
        assert m.distilled_steps == (n,) and m.distilled_spacing == "trailing"
        assert m.source_hash == ckpt_io.weights_hash(ck.ema) != base.meta.source_hash
        d = m.train_config["distill"]
        assert d["teacher_source_hash"] == base.meta.source_hash and d["complete"] is True
        assert [r["to"] for r in d["rounds"]] == [2, 1][: 1 + (n == 1)]
        assert d["teacher_guidance"] == 1.0 and d["sample_guidance"] is None
        assert d["cfg_dropout"] == base.meta.train_config["cfg_dropout"]
        assert m.train_config["preset"] == "tiny"  # the teacher's training record is kept
        assert m.prediction_type == base.meta.prediction_type
        x = ck.build_model()(torch.randn(2, 3, 16, 16), torch.tensor([999.0, 499.0]),
                             torch.tensor([0, 6]))
        assert torch.isfinite(x).all()
    # The 1-step student exports a 1-step sampler by default (export's CLI reads the meta).
    from fewstep.export import cli as export_cli
    from fewstep.runtime import artifact
    from fewstep.runtime.pipeline import Pipeline

    onnx_out = tmp_path / "onnx" / "student.onnx"
    onnx_out.parent.mkdir()
    assert export_cli.main([str(paths[1]), "--out", str(onnx_out), "--fused", "sampler",
                            "--no-check"]) == 0
    sampler = artifact.read_onnx_meta(onnx_out.parent / "student.sampler-1.onnx")
    assert sampler.graph.kind == "sampler" and sampler.graph.steps == 1
    assert sampler.graph.spacing == "trailing" and sampler.distilled_steps == (1,)
    pipe = Pipeline.load(onnx_out, backend="ort-cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe.generate(2, 1)
        first = pipe.last_info
        pipe.generate(1, 4)
    assert images.shape == (2, 16, 16, 3)
    assert first is not None and first.path == "sampler"  # the fused 1-step graph
    assert pipe.last_info is not None and pipe.last_info.path == "denoiser"
    assert [str(w.message) for w in caught] == [
        "model was distilled for 1 step; 4 steps may look worse"]
    capsys.readouterr()


def test_resume_continues_the_round_exactly(teacher: Path, tmp_path: Path) -> None:
    cfg = config(steps_per_round=(3, 4))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    distill(teacher, cfg, options(whole))
    # Stop inside round 2 (after 3 + 2 global steps), then resume it.
    assert [p.name for p in distill(teacher, cfg, options(parts, stop_after=5))] == [
        "round_004.pt"]
    partial = ckpt_io.load(parts / round_name(2, partial=True))
    assert partial.step == 2 and partial.meta.train_config["distill"]["complete"] is False
    distill(teacher, cfg, options(parts, resume=True))
    assert not (parts / round_name(2, partial=True)).exists()
    losses = [(r["to"], r["step"], r["loss"]) for r in map(
        json.loads, (parts / METRICS).read_text().splitlines())]
    assert losses == [(r["to"], r["step"], r["loss"]) for r in map(
        json.loads, (whole / METRICS).read_text().splitlines())]
    for name in ("round_004.pt", "round_002.pt"):
        a, b = ckpt_io.load(whole / name), ckpt_io.load(parts / name)
        assert a.meta.source_hash == b.meta.source_hash
        for k in a.ema:
            assert torch.equal(a.ema[k], b.ema[k]), k
    # Nothing left to do; a changed config is refused with the difference named.
    assert len(distill(teacher, cfg, options(parts, resume=True))) == 2
    with pytest.raises(ValueError, match=r"other settings \(lr: saved 0.0002 vs now 0.001\)"):
        distill(teacher, config(steps_per_round=(3, 4), lr=1e-3), options(parts, resume=True))
    with pytest.raises(ValueError, match=r"already holds a distillation.*--resume.*--force"):
        distill(teacher, cfg, options(parts))


def test_guided_teacher_is_recorded_and_stop_at_round(teacher: Path, tmp_path: Path) -> None:
    paths = distill(teacher, config(teacher_guidance=2.0, steps_per_round=(1,)),
                    options(tmp_path, stop_at_round=4))
    assert [p.name for p in paths] == ["round_004.pt"]
    d = ckpt_io.load(paths[0]).meta.train_config["distill"]
    assert d["teacher_guidance"] == 2.0 and d["sample_guidance"] == 1.0
    # Students of a guided teacher cannot be guided again.
    with pytest.raises(ValueError, match="guided with 2: its outputs are guided already"):
        distill(paths[0], DistillConfig(to_steps=2, teacher_guidance=3.0),
                options(tmp_path / "again"))


def test_a_distilled_checkpoint_goes_on_as_a_teacher(teacher: Path, tmp_path: Path) -> None:
    first = distill(teacher, config(to_steps=4, steps_per_round=(1,)), options(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"was distilled for 4 steps; .* --from-steps 4, not 8"):
        distill(first[-1], config(), options(tmp_path / "b"))
    second = distill(first[-1], config(from_steps=None, steps_per_round=(1,)),
                     options(tmp_path / "b"))  # from_steps: the checkpoint's 4
    d = ckpt_io.load(second[-1]).meta.train_config["distill"]
    assert [(r["from"], r["to"]) for r in d["rounds"]] == [(8, 4), (4, 2)]
    assert d["teacher_source_hash"] == ckpt_io.load(teacher).meta.source_hash


# ---------------------------------------------------------------------------------
# CLI usage errors: one line, exit 2, no traceback
# ---------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli_distill.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--from-steps", "64", "--to-steps", "3"],
     "error: to_steps=3 is not reachable from from_steps=64 by halving (64, 32, 16, 8, 4, 2, 1)"),
    (["--from-steps", "64", "--to-steps", "128"],
     "error: to_steps=128 is not below from_steps=64"),
    (["--to-steps", "2", "--steps-per-round", "1", "2"],
     "error: 2 values for steps_per_round but 5 rounds (64 -> 32 -> 16 -> 8 -> 4 -> 2)"),
    (["--spacing", "linspace"], "error: spacing='linspace' does not nest for 32 steps"),
    (["--from-steps", "2000", "--to-steps", "1000"],
     "error: from_steps=2000 exceeds num_train_timesteps=1000"),
    (["--teacher-guidance", "99"], "argument --teacher-guidance: 99.0 must be in [0, 50]"),
])
def test_cli_usage_errors(teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          extra: list[str], message: str) -> None:
    code, err = run_cli([str(teacher), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_cli_refuses_guidance_for_an_unconditional_teacher(
        unconditional: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([str(unconditional), "--out", str(tmp_path / "o"),
                         "--teacher-guidance", "2"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: teacher_guidance=2 needs a class-conditional teacher; {str(unconditional)!r} "
        "has no classes: drop --teacher-guidance")


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
