"""Checkpoints: weights (raw and EMA), optimizer state and ModelMeta in one file.

Everything in a checkpoint loads with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts, no pickled classes. A file that needs pickle is
refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.runtime.checks import whole_number
from fewstep.runtime.errors import ArtifactError, inert
from fewstep.runtime.fileio import atomic_path
from fewstep.runtime.meta import ModelMeta

from .unet import PRESETS, UNet, UNetConfig

# The UNet fields a preset fixes (image size, channels and classes come from the data).
ARCHITECTURE = ("base_channels", "channel_mults", "blocks_per_level",
                "attention_resolutions", "head_channels", "groups")

FORMAT = "fewstep-checkpoint"
VERSION = 1


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


@dataclass
class Checkpoint:
    meta: ModelMeta
    unet_config: UNetConfig
    ema: dict[str, torch.Tensor]
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    step: int = 0
    extra: dict[str, Any] | None = None

    def build_model(self, which: str = "ema") -> UNet:
        """A UNet in eval mode carrying the EMA (default) or the raw weights."""
        model = UNet(self.unet_config)
        state = self.ema if which == "ema" else self.model
        if state is None:
            raise ArtifactError(f"checkpoint has no {which!r} weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise ArtifactError(
                f"checkpoint weights do not fit its own UNet config ({first}); the file is damaged"
            ) from None
        return model.eval()


def save(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "meta": ckpt.meta.to_json(),
        "unet_config": ckpt.unet_config.to_dict(),
        "ema": ckpt.ema,
        "step": ckpt.step,
    }
    if ckpt.model is not None:
        payload["model"] = ckpt.model
    if ckpt.optimizer is not None:
        payload["optimizer"] = ckpt.optimizer
    if ckpt.extra:
        payload["extra"] = ckpt.extra
    # Through a Python file: a full disk is an OSError naming the errno (torch's own
    # writer, given a path, turns it into a RuntimeError without one).
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"checkpoint {str(p)!r} does not exist or is not a file")
    if not zipfile.is_zipfile(p):
        raise ArtifactError(
            f"{str(p)!r} is not a readable PyTorch checkpoint (not a torch.save zip archive); "
            "pass a .pt file written by fewstep train"
        )
    try:
        raw = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        first = next((ln.strip() for ln in lines if "GLOBAL" in ln or "global" in ln),
                     lines[0] if lines else "").split(". Please")[0][:200]
        raise ArtifactError(
            f"{str(p)!r} needs pickle to load ({first}); fewstep loads checkpoints with "
            "weights_only=True and refuses code in data files. Re-save it with fewstep train"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ArtifactError(
            f"{str(p)!r} is not a readable PyTorch checkpoint ({first}); "
            "pass a .pt file written by fewstep train"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(
            f"{str(p)!r} is a PyTorch file but not a fewstep checkpoint "
            "(no 'format': 'fewstep-checkpoint' entry); pass a .pt file written by fewstep train"
        )
    if raw.get("version") != VERSION:
        raise ArtifactError(
            f"{str(p)!r} has checkpoint version {raw.get('version')!r}; this fewstep reads "
            f"version {VERSION}: upgrade fewstep"
        )
    try:
        meta = ModelMeta.from_json(raw["meta"], source=str(p))
        config = UNetConfig.from_dict(raw["unet_config"])
        ema = raw["ema"]
        step = whole_number("step", raw.get("step", 0), 0)
        for key in ("ema", "model", "optimizer", "extra"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise ValueError(f"{key!r} is a {type(raw[key]).__name__}, not a dict")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{str(p)!r}: damaged checkpoint ({type(e).__name__}: "
                            f"{inert(e)}); pass a checkpoint written by fewstep train"
                            ) from None
    check_consistent(p, meta, config, ema)
    return Checkpoint(
        meta=meta,
        unet_config=config,
        ema=ema,
        model=raw.get("model"),
        optimizer=raw.get("optimizer"),
        step=step,
        extra=raw.get("extra"),
    )


def check_consistent(path: str | os.PathLike[str], meta: ModelMeta, config: UNetConfig,
                     ema: object) -> None:
    """Refuse a checkpoint whose ModelMeta disagrees with its own UNet config or weights.

    Compared: channels, height/width vs image_size, num_classes vs the UNet's classes
    and the label embedding's rows (num_classes + 1, the null label last), the preset
    the training settings name vs the network's widths, depth, attention and groups, and
    the prediction type and schedule the training settings recorded. Raises one
    ``ArtifactError`` naming every disagreement.
    """
    found: list[str] = []

    def differ(what: str, in_meta: object, in_model: object) -> None:
        if in_meta != in_model:
            found.append(f"{what} {in_meta!r} in the metadata vs {in_model!r} in the model")

    differ("channels", meta.channels, config.image_channels)
    differ("image size (height x width)", f"{meta.height}x{meta.width}",
           f"{config.image_size}x{config.image_size}")
    differ("num_classes", meta.num_classes, config.num_classes)
    table = ema.get("label_emb.weight") if isinstance(ema, dict) else None
    rows = table.shape[0] if isinstance(table, torch.Tensor) and table.dim() == 2 else 0
    if meta.num_classes == config.num_classes and rows != (
        meta.num_classes + 1 if meta.num_classes else 0
    ):
        found.append(f"num_classes {meta.num_classes} in the metadata needs "
                     f"{meta.num_classes + 1 if meta.num_classes else 'no'} label embedding "
                     f"rows (the null label included) vs {rows} in the weights")
    # What training recorded (train_config), where it recorded it.
    tc = meta.train_config
    named = tc.get("preset")
    if named is not None:
        if not isinstance(named, str) or named not in PRESETS:
            found.append(f"preset {named!r} in its training settings is not one of "
                         f"{', '.join(PRESETS)}")
        else:
            want = PRESETS[named]
            for field in ARCHITECTURE:
                if getattr(want, field) != getattr(config, field):
                    found.append(f"preset {named!r} in the metadata has {field}="
                                 f"{getattr(want, field)!r} vs {getattr(config, field)!r} "
                                 "in the model")
    s = meta.schedule
    for key, value in (("prediction_type", meta.prediction_type),
                       ("beta_schedule", s.beta_schedule),
                       ("num_train_timesteps", s.num_train_timesteps),
                       ("zero_terminal_snr", s.rescale_zero_terminal_snr)):
        if key in tc and tc[key] != value:
            found.append(f"{key} {value!r} in the metadata vs {tc[key]!r} in its training "
                         "settings")
    if found:
        raise ArtifactError(
            f"{str(path)!r}: its metadata disagrees with its model: {'; '.join(found)}. The "
            "file was edited or damaged: re-save the checkpoint from training (the run's "
            "own checkpoint.pt, or fewstep train --resume)"
        )
