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
