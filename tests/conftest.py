"""Shared fixtures: tiny trained checkpoints are made once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


TINY_SIZE = 16


def tiny_config(**overrides: object):  # type: ignore[no-untyped-def]
    """A TrainConfig for fast CPU tests: the tiny preset at 16 px."""
    from fewstep.train.fit import TrainConfig

    fields: dict = dict(data="landscapes", image_size=TINY_SIZE, preset="tiny", steps=150,
                        batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.95, seed=0)
    fields.update(overrides)
    return TrainConfig(**fields)


def quiet_options(out, **overrides: object):  # type: ignore[no-untyped-def]
    from fewstep.train.fit import RunOptions

    fields: dict = dict(out=out, device="cpu", workers=0, checkpoint_every=10_000,
                        sample_every=10_000, sample_steps=4, log_every=10, progress=False)
    fields.update(overrides)
    return RunOptions(**fields)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A class-conditional tiny model trained for 150 steps (shared by the session)."""
    pytest.importorskip("torch")
    from fewstep.train.fit import train

    out = tmp_path_factory.mktemp("tiny")
    return train(tiny_config(), quiet_options(out))


def _export_tiny(checkpoint, tmp_path_factory, name, variants=()):  # type: ignore[no-untyped-def]
    pytest.importorskip("onnx")
    from fewstep.export import onnx_export
    from fewstep.train import checkpoint as ckpt_io

    ck = ckpt_io.load(checkpoint)
    folder = tmp_path_factory.mktemp(name)
    options = onnx_export.ExportOptions(guidance=True, fused=("step", "sampler"),
                                        sampler_steps=(2,), variants=variants)
    onnx_export.export_to_folder(ck.build_model(), ck.meta, folder, "model", options)
    return folder / "model.onnx"


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    """fp32 export of the tiny model: denoiser + guidance, step graph, 2-step sampler."""
    return _export_tiny(tiny_checkpoint, tmp_path_factory, "tiny_onnx")


@pytest.fixture(scope="session")
def tiny_variant(tiny_checkpoint, tmp_path_factory):  # type: ignore[no-untyped-def]
    """``tiny_artifact``'s export with the ORT-CUDA variant beside it (no gate: this may be
    a CPU machine); shared by the variant's tests, which copy it before changing it."""
    return _export_tiny(tiny_checkpoint, tmp_path_factory, "tiny_variant", ("ort-cuda",))
