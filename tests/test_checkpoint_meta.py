"""train/checkpoint.py: a checkpoint whose ModelMeta disagrees with its own model is refused
on load (ArtifactError naming the file, both values and the fix), and by `fewstep export`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_config  # noqa: E402

from fewstep.runtime.errors import ArtifactError  # noqa: E402
from fewstep.runtime.meta import ModelMeta, Schedule  # noqa: E402
from fewstep.train import checkpoint as ckpt_io  # noqa: E402
from fewstep.train.unet import UNet, preset  # noqa: E402

SIZE, CLASSES = 32, 6


def make_checkpoint(path: Path) -> Path:
    """An untrained tiny UNet (32 px, 6 classes + null, v-prediction) saved as fewstep train
    would: much faster than training one."""
    config = preset("tiny", image_size=SIZE, num_classes=CLASSES)
    torch.manual_seed(0)
    ema = {k: v.detach().clone() for k, v in UNet(config).state_dict().items()}
    train_config = dataclasses.asdict(tiny_config(image_size=SIZE))
    meta = ModelMeta.build(
        prediction_type=train_config["prediction_type"],
        schedule=Schedule(beta_schedule=train_config["beta_schedule"],
                          num_train_timesteps=train_config["num_train_timesteps"]),
        channels=3, height=SIZE, width=SIZE, num_classes=CLASSES,
        class_names=tuple(f"c{i}" for i in range(CLASSES)),
        train_config=train_config, source_hash=ckpt_io.weights_hash(ema),
    )
    return ckpt_io.save(path, ckpt_io.Checkpoint(meta=meta, unet_config=config, ema=ema))


def doctor(src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> Path:
    """Load ``src`` raw, let ``edit(meta_dict, raw)`` change it, torch.save it to ``dst``."""
    raw = torch.load(src, weights_only=True)
    meta = json.loads(raw["meta"])
    edit(meta, raw)
    raw["meta"] = json.dumps(meta)
    torch.save(raw, dst)
    return dst


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "good.pt")


def small_image(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["sample_shape"] = [meta["sample_shape"][0], 16, 16]


def fewer_classes(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["num_classes"], meta["class_names"], meta["null_label"] = 3, ["a", "b", "c"], 3


def one_channel(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["sample_shape"] = [1, *meta["sample_shape"][1:]]


def epsilon_meta(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["prediction_type"], meta["graph"]["outputs"] = "epsilon", ["eps"]


def zero_snr_meta(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["schedule"]["rescale_zero_terminal_snr"] = True


def other_timesteps(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    meta["schedule"]["num_train_timesteps"] = 500


def label_rows_cut(meta: dict[str, Any], raw: dict[str, Any]) -> None:
    raw["ema"]["label_emb.weight"] = raw["ema"]["label_emb.weight"][:4].clone()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (small_image,
         "image size (height x width) '16x16' in the metadata vs '32x32' in the model"),
        (fewer_classes, "num_classes 3 in the metadata vs 6 in the model"),
        (one_channel, "channels 1 in the metadata vs 3 in the model"),
        (epsilon_meta,
         "prediction_type 'epsilon' in the metadata vs 'v_prediction' in its training settings"),
        (zero_snr_meta, "zero_terminal_snr True in the metadata vs False in its training settings"),
        (other_timesteps, "num_train_timesteps 500 in the metadata vs 1000 in its training"),
        (label_rows_cut, "num_classes 6 in the metadata needs 7 label embedding rows (the null "
                         "label included) vs 4 in the weights"),
    ],
)
def test_meta_that_disagrees_with_the_model_is_refused(good: Path, tmp_path: Path,
                                                       edit: Callable[..., None],
                                                       message: str) -> None:
    bad = doctor(good, tmp_path / "bad.pt", edit)
    with pytest.raises(ArtifactError) as e:
        ckpt_io.load(bad)
    text = str(e.value)
    assert text.startswith(f"{str(bad)!r}: its metadata disagrees with its model: ")
    assert message in text
    assert "re-save the checkpoint from training" in text and "\n" not in text


def test_every_disagreement_is_named_in_one_line(good: Path, tmp_path: Path) -> None:
    def both(meta: dict[str, Any], raw: dict[str, Any]) -> None:
        small_image(meta, raw)
        fewer_classes(meta, raw)

    with pytest.raises(ArtifactError, match=r"'16x16' in the metadata vs '32x32' in the model; "
                                            r"num_classes 3 in the metadata vs 6 in the model\."):
        ckpt_io.load(doctor(good, tmp_path / "bad.pt", both))


def test_consistent_checkpoint_loads(good: Path, tmp_path: Path) -> None:
    ck = ckpt_io.load(good)
    assert (ck.meta.height, ck.meta.num_classes, ck.unet_config.image_size) == (32, 6, 32)
    ck.build_model()
    # Metadata without training settings (another producer) is checked on the model only.
    bare = doctor(good, tmp_path / "bare.pt", lambda meta, raw: meta.update(train_config={}))
    assert ckpt_io.load(bare).meta.train_config == {}


@pytest.mark.parametrize("edit", [small_image, fewer_classes])
def test_export_of_a_doctored_checkpoint_is_one_line_exit_2_and_no_file(
    good: Path, tmp_path: Path, edit: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    from fewstep.runtime.cli import main

    bad = doctor(good, tmp_path / "doctored.pt", edit)
    out = tmp_path / "x.onnx"
    code = main(["export", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {str(bad)!r}: its metadata disagrees with its model")
    assert "re-save the checkpoint from training" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doctored.pt"]
