"""Training configuration without PyTorch: the UNet presets and TrainConfig.

Kept free of torch so that ``fewstep train --help`` (which lists the presets and the
defaults) works where torch is not installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fewstep.runtime import checks, ddim

# Sane limits for a UNet config (what a checkpoint may ask fewstep to build).
MAX_IMAGE_SIZE = 2048
MAX_LEVELS = 8
MAX_MULT = 16
MAX_WIDTH = 4096  # channels at the widest level
MAX_PARAMETERS = 1_000_000_000
_INT_LIMITS = (("image_channels", 1, 64), ("image_size", 1, MAX_IMAGE_SIZE),
               ("base_channels", 1, 1024), ("blocks_per_level", 1, 16),
               ("head_channels", 1, MAX_WIDTH), ("num_classes", 0, 100_000),
               ("groups", 1, 1024))


def _whole(name: str, value: object, low: int, high: int) -> int:
    if not checks.is_whole_number(value) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a whole number in {low}..{high}")
    return int(value)


def estimated_parameters(c: UNetConfig) -> int:
    """About how many parameters ``UNet(c)`` has (the 3x3 convolutions dominate), computed
    from the config alone, before anything is allocated."""
    total = 0
    for m in c.channel_mults:
        w = c.base_channels * m
        total += (2 * c.blocks_per_level + 1) * 2 * 9 * w * w * 2  # down + up, 2 convs a block
    return total + (c.num_classes + 1) * c.base_channels * 4


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 3
    image_size: int = 32
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 32
    num_classes: int = 0
    dropout: float = 0.0
    groups: int = 16

    def __post_init__(self) -> None:
        # Checked before anything is allocated: a config read from a checkpoint is data.
        # Stored as ints (numpy integers too): a checkpoint holds plain Python values.
        for name, low, high in _INT_LIMITS:
            object.__setattr__(self, name, _whole(name, getattr(self, name), low, high))
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) > MAX_LEVELS:
                raise ValueError(f"{name}={value!r} must be a list of at most {MAX_LEVELS} "
                                 "whole numbers")
        if not self.channel_mults:
            raise ValueError("channel_mults=() needs at least one resolution level")
        object.__setattr__(self, "channel_mults", tuple(
            _whole("channel_mults entry", m, 1, MAX_MULT) for m in self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(
            _whole("attention_resolutions entry", r, 1, MAX_IMAGE_SIZE)
            for r in self.attention_resolutions))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
                0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        widest = self.base_channels * max(self.channel_mults)
        if widest > MAX_WIDTH:
            raise ValueError(f"base_channels x channel_mults = {widest} channels, more than "
                             f"{MAX_WIDTH}; use a smaller network")
        estimate = estimated_parameters(self)
        if estimate > MAX_PARAMETERS:
            raise ValueError(f"this UNet config has about {estimate / 1e6:,.0f} M parameters, "
                             f"more than {MAX_PARAMETERS / 1e6:,.0f} M; use a smaller network")
        levels = len(self.channel_mults)
        if self.image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by {2 ** (levels - 1)} "
                f"for {levels} resolution levels"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups:
                raise ValueError(
                    f"channels {self.base_channels * m} not divisible by groups={self.groups}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """A config from a checkpoint: a ValueError for unknown keys or bad values."""
        if not isinstance(d, dict):
            raise ValueError(f"unet_config is a {type(d).__name__}, not a dict")
        d = dict(d)
        unknown = sorted(map(str, set(d) - {f.name for f in dataclasses.fields(cls)}))
        if unknown:
            raise ValueError(f"unet_config has unknown keys {unknown[:5]}")
        for key in ("channel_mults", "attention_resolutions"):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise ValueError(f"{key}={d[key]!r} is not a list")
                d[key] = tuple(d[key])
        return cls(**d)


# Every preset has an even number of channels per GroupNorm group at every level: ONNX
# Runtime's fused CUDA GroupNorm kernel (the ORT-CUDA graph variant, export/ort_cuda.py)
# handles two channels per thread and refuses odd counts. Changing `groups` leaves the
# parameter count and FLOPs as they are.
PRESETS: dict[str, UNetConfig] = {
    # CI and tests: well under 0.5 M parameters, trains in seconds on a CPU.
    "tiny": UNetConfig(
        base_channels=24, channel_mults=(1, 2), blocks_per_level=1,
        attention_resolutions=(16,), head_channels=24, groups=4,
    ),
    # The shipped default model: a few MB of fp32 weights.
    "small": UNetConfig(
        base_channels=40, channel_mults=(1, 2, 2), blocks_per_level=1,
        attention_resolutions=(8,), head_channels=40, groups=4,
    ),
    # DDPM's CIFAR-10 shape (about 35 M parameters at 32 px).
    "base": UNetConfig(
        base_channels=128, channel_mults=(1, 2, 2, 2), blocks_per_level=2,
        attention_resolutions=(16,), head_channels=64, groups=32, dropout=0.1,
    ),
}


def preset(name: str, **overrides: Any) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown; use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (recorded in the checkpoint)."""

    data: str = "landscapes"
    image_size: int = 32
    preset: str = "small"
    conditional: bool = True
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    # Rescale the betas to zero SNR at t = T-1 (Lin et al. 2024): recorded in the
    # checkpoint's ModelMeta.schedule, so export and the runtime sample the same schedule.
    zero_terminal_snr: bool = False
    steps: int = 10_000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        checks.choice("prediction_type", self.prediction_type, ddim.PREDICTION_TYPES)
        checks.choice("beta_schedule", self.beta_schedule, ddim.BETA_SCHEDULES)
        for name in ("steps", "batch_size", "grad_accum", "image_size", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr={self.lr} must be in (0, 1); try 3e-4")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "zero_terminal_snr=True with prediction_type='epsilon': an epsilon model "
                "cannot recover x0 at zero SNR; pass --prediction v_prediction (or sample), "
                "or leave out --zero-terminal-snr"
            )
        if self.zero_terminal_snr and self.num_train_timesteps < 2:
            raise ValueError(
                f"zero_terminal_snr=True needs num_train_timesteps >= 2, got "
                f"{self.num_train_timesteps}; pass --timesteps 2 or more"
            )

    def result_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint (all but ``steps``)."""
        d = dataclasses.asdict(self)
        d.pop("steps")
        return d
