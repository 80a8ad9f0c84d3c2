"""train/: the tiny model learns, checkpoints round-trip, resume is exact, folders train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import quiet_options, tiny_config  # noqa: E402

from fewstep.runtime.errors import ArtifactError  # noqa: E402
from fewstep.train import checkpoint as ckpt_io  # noqa: E402
from fewstep.train.fit import CHECKPOINT, METRICS, train  # noqa: E402
from fewstep.train.unet import PRESETS, UNet, count_parameters  # noqa: E402


class Evil:
    """A class a checkpoint must never need to unpickle."""


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / METRICS).read_text().splitlines()]


def test_tiny_preset_is_under_half_a_million_parameters() -> None:
    assert count_parameters(UNet(PRESETS["tiny"])) < 500_000


def test_loss_falls_and_outputs_are_written(tiny_checkpoint: Path) -> None:
    folder = tiny_checkpoint.parent
    curve = losses(folder)
    assert len(curve) == 15
    assert np.mean(curve[-3:]) < 0.6 * np.mean(curve[:2]), curve
    assert (folder / "samples" / "step_0000150.png").is_file()


def test_checkpoint_round_trip_with_weights_only(tiny_checkpoint: Path) -> None:
    raw = torch.load(tiny_checkpoint, weights_only=True)
    assert raw["format"] == "fewstep-checkpoint" and raw["step"] == 150
    ck = ckpt_io.load(tiny_checkpoint)
    assert ck.meta.num_classes == 6 and ck.meta.height == 16
    assert ck.meta.source_hash == ckpt_io.weights_hash(ck.ema)
    model = ck.build_model()
    x, t, lab = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), torch.tensor([0, 6])
    out = model(x, t, lab)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    config = tiny_config(steps=12, batch_size=4, cfg_dropout=0.3)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(config, quiet_options(whole, log_every=1))
    train(config, quiet_options(resumed, log_every=1, stop_after=5))
    assert ckpt_io.load(resumed / CHECKPOINT).step == 5
    assert len(losses(resumed)) == 5
    train(config, quiet_options(resumed, log_every=1, resume=True))
    assert losses(resumed) == losses(whole)
    a, b = ckpt_io.load(whole / CHECKPOINT), ckpt_io.load(resumed / CHECKPOINT)
    assert a.step == b.step == 12
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    assert a.meta.source_hash == b.meta.source_hash


def test_refuses_to_overwrite_without_resume_or_force(tmp_path: Path) -> None:
    train(tiny_config(steps=2, batch_size=2), quiet_options(tmp_path))
    with pytest.raises(ValueError, match="exists; pass --resume to continue it or --force"):
        train(tiny_config(steps=2, batch_size=2), quiet_options(tmp_path))
    with pytest.raises(ValueError, match=r"cannot resume .*\(lr: checkpoint 0.002 vs now 0.001\)"):
        train(tiny_config(steps=4, batch_size=2, lr=1e-3), quiet_options(tmp_path, resume=True))


def test_folder_of_pngs_trains(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / cls / f"{i}.png")
    out = train(tiny_config(data=str(tmp_path / "data"), steps=3, batch_size=4),
                quiet_options(tmp_path / "run"))
    ck = ckpt_io.load(out)
    assert ck.meta.class_names == ("cats", "dogs") and ck.meta.num_classes == 2


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="is not a readable PyTorch checkpoint"):
        ckpt_io.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ArtifactError, match="not a fewstep checkpoint"):
        ckpt_io.load(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "fewstep-checkpoint", "obj": Evil()}, pickled)
    with pytest.raises(ArtifactError, match="needs pickle to load"):
        ckpt_io.load(pickled)


# -- divergence: one line, exit code 1, the last good checkpoint kept -------------------


def nan_eps_from(monkeypatch: pytest.MonkeyPatch, first_index: int) -> None:
    """Samples from global index ``first_index`` on get NaN noise: the loss of the step
    that first uses them is NaN (deterministic, no training instability needed)."""
    from fewstep.train import fit

    real = fit.sample_draws

    def draws(seed: int, index: int, t_max: int, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        t, u, eps = real(seed, index, t_max, shape)
        return t, u, eps * np.nan if index >= first_index else eps

    monkeypatch.setattr(fit, "sample_draws", draws)


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewstep.runtime.errors import NumericalError
    from fewstep.train.fit import TrainingDiverged

    nan_eps_from(monkeypatch, 6)  # batch 2: step 4 is the first with NaN noise
    with pytest.raises(TrainingDiverged) as e:
        train(tiny_config(steps=8, batch_size=2),
              quiet_options(tmp_path, checkpoint_every=2, log_every=1))
    assert isinstance(e.value, NumericalError) and isinstance(e.value, FloatingPointError)
    assert str(e.value).startswith(
        "training diverged: the loss became nan at step 4; the last good checkpoint (step 2) "
        f"stays at {str(tmp_path / CHECKPOINT)!r}"
    )
    assert "lower --lr (now 0.002)" in str(e.value) and "--grad-clip" in str(e.value)
    ck = ckpt_io.load(tmp_path / CHECKPOINT)
    assert ck.step == 2
    assert all(torch.isfinite(v).all() for v in ck.ema.values())
    assert ck.model is not None and all(torch.isfinite(v).all() for v in ck.model.values())
    assert [json.loads(ln)["step"] for ln in (tmp_path / METRICS).read_text().splitlines()] \
        == [1, 2, 3]


def test_nan_loss_between_log_points_is_caught_before_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fewstep.train.fit import TrainingDiverged

    nan_eps_from(monkeypatch, 6)  # step 4; nothing logs before step 50
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 4; the last good "
                                               r"checkpoint \(step 3\)"):
        train(tiny_config(steps=8, batch_size=2),
              quiet_options(tmp_path, checkpoint_every=3, log_every=50))
    assert ckpt_io.load(tmp_path / CHECKPOINT).step == 3


def test_nonfinite_weights_are_never_saved(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fewstep.train import fit

    real = fit.Trainer._train_step

    def poisoned(self, model, optim, batches, step):  # type: ignore[no-untyped-def]
        total = real(self, model, optim, batches, step)
        if step == 1:  # the loss of step 2 is finite, the weights after it are not
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return total

    monkeypatch.setattr(fit.Trainer, "_train_step", poisoned)
    with pytest.raises(fit.TrainingDiverged, match=r"the weights became NaN/Inf at step 2; no "
                                                   r"checkpoint was written"):
        train(tiny_config(steps=4, batch_size=2), quiet_options(tmp_path, checkpoint_every=2))
    assert not (tmp_path / CHECKPOINT).exists()


def cli_train(out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--image-size", "16", "--batch-size", "2",
            "--device", "cpu", "--workers", "0", "--no-progress", "--sample-steps", "2",
            "--out", str(out), *extra]


def test_cli_reports_divergence_in_one_line_with_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fewstep.runtime.cli import main

    nan_eps_from(monkeypatch, 6)
    code = main(cli_train(tmp_path, "--steps", "8", "--checkpoint-every", "2"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: the loss became nan at step 4; the last "
                           "good checkpoint (step 2) stays at")
    assert "lower --lr" in last and "--grad-clip" in last
    assert ckpt_io.load(tmp_path / CHECKPOINT).step == 2


# -- zero terminal SNR ------------------------------------------------------------------


def test_zero_terminal_snr_is_trained_and_recorded_in_the_schedule(tmp_path: Path) -> None:
    from fewstep.runtime import ddim
    from fewstep.train.fit import Trainer

    config = tiny_config(steps=2, batch_size=2, zero_terminal_snr=True)
    trainer = Trainer(config, quiet_options(tmp_path))
    assert float(trainer.alphas_cumprod[-1]) == 0.0
    trainer.run()
    meta = ckpt_io.load(tmp_path / CHECKPOINT).meta
    assert meta.schedule.rescale_zero_terminal_snr is True
    assert meta.train_config["zero_terminal_snr"] is True
    ac = meta.schedule.alphas_cumprod()
    assert ac[-1] == 0.0
    expected = ddim.alphas_cumprod(config.beta_schedule, config.num_train_timesteps,
                                   rescale_zero_snr=True)
    assert ac.tolist() == expected.tolist()


def test_cli_zero_terminal_snr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.runtime.cli import main

    assert main(cli_train(tmp_path / "a", "--steps", "2", "--zero-terminal-snr")) == 0
    assert ckpt_io.load(tmp_path / "a" / CHECKPOINT).meta.schedule.rescale_zero_terminal_snr
    capsys.readouterr()
    code = main(cli_train(tmp_path / "b", "--steps", "2", "--zero-terminal-snr",
                          "--prediction", "epsilon"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "error: zero_terminal_snr=True with prediction_type='epsilon': an epsilon model cannot "
        "recover x0 at zero SNR; pass --prediction v_prediction (or sample), or leave out "
        "--zero-terminal-snr"
    ]
    assert not (tmp_path / "b" / CHECKPOINT).exists()


def test_resume_of_a_checkpoint_from_before_zero_terminal_snr(tmp_path: Path) -> None:
    config = tiny_config(steps=3, batch_size=2)
    train(config, quiet_options(tmp_path, stop_after=1))
    path = tmp_path / CHECKPOINT
    raw = torch.load(path, weights_only=True)
    meta = json.loads(raw["meta"])
    del meta["train_config"]["zero_terminal_snr"]  # as written by an older fewstep
    raw["meta"] = json.dumps(meta)
    torch.save(raw, path)
    train(config, quiet_options(tmp_path, resume=True))
    assert ckpt_io.load(path).step == 3


def test_cli_progress_in_a_log_is_a_few_plain_lines(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Progress left on (the default) while stderr is not a terminal, as in a log file:
    # no carriage-return bar, no escape sequences, a handful of lines.
    from fewstep.runtime.cli import main

    argv = [a for a in cli_train(tmp_path / "a", "--steps", "30") if a != "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert 1 <= len(err.splitlines()) <= 12, err
