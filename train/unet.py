"""A compact DDPM-style UNet denoiser that exports to ONNX without custom ops.

Residual blocks with GroupNorm and SiLU, self-attention at low resolution, a
sinusoidal time embedding and an optional class embedding whose extra index
``num_classes`` is the "null" class used for classifier-free guidance.

Export-friendly by construction: static channel/spatial sizes in every reshape (only
the batch is dynamic), nearest-neighbour upsampling written as expand+reshape (no
Resize op), attention as MatMul/Softmax, and fp32 "islands" (GroupNorm statistics,
softmax, the time embedding's sinusoids) so that a ``.half()`` copy of the model is the
fp16 graph we export.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def _whole(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a whole number in {low}..{high}")


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
        for name, low, high in _INT_LIMITS:
            _whole(name, getattr(self, name), low, high)
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) > MAX_LEVELS:
                raise ValueError(f"{name}={value!r} must be a list of at most {MAX_LEVELS} "
                                 "whole numbers")
        if not self.channel_mults:
            raise ValueError("channel_mults=() needs at least one resolution level")
        for m in self.channel_mults:
            _whole("channel_mults entry", m, 1, MAX_MULT)
        for r in self.attention_resolutions:
            _whole("attention_resolutions entry", r, 1, MAX_IMAGE_SIZE)
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


PRESETS: dict[str, UNetConfig] = {
    # CI and tests: well under 0.5 M parameters, trains in seconds on a CPU.
    "tiny": UNetConfig(
        base_channels=24, channel_mults=(1, 2), blocks_per_level=1,
        attention_resolutions=(16,), head_channels=24, groups=8,
    ),
    # The shipped default model: a few MB of fp32 weights.
    "small": UNetConfig(
        base_channels=40, channel_mults=(1, 2, 2), blocks_per_level=1,
        attention_resolutions=(8,), head_channels=40, groups=8,
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


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (an fp16 island).

    Written as a layer norm over the last axis of (B, groups, C/groups·H·W) with static
    sizes: the exported graph has no Shape ops (only the batch is left to -1) and one
    LayerNormalization node, a single kernel on ONNX Runtime's CUDA EP (its
    InstanceNormalization takes several), which TensorRT also supports natively.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        g, n = self.num_groups, (x.shape[1] // self.num_groups) * h * w
        y = F.layer_norm(x.float().reshape(-1, g, n), (n,), eps=self.eps)
        y = y.reshape(-1, c, h, w)
        if self.affine:
            y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps → (B, dim), computed in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = GroupNorm32(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor | None, proj: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``proj``: ``temb(emb) + conv1.bias`` precomputed, (B, C) or (1, C) (an export's
        table lookup, see ``UNet.block_tables``); conv1 then runs without its bias."""
        if proj is None:
            assert emb is not None
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.temb(emb)[:, :, None, None]
        else:
            h = F.conv2d(F.silu(self.norm1(x)), self.conv1.weight, None, padding=1)
            h = h + proj[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions; softmax in float32."""

    def __init__(self, channels: int, size: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.channels, self.size = channels, size
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, n, heads = self.channels, self.size * self.size, self.heads
        d = c // heads
        qkv = self.qkv(self.norm(x)).reshape(-1, 3, heads, d, n)  # (B, 3, heads, d, N)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, N)
        scores = torch.matmul(q.transpose(-1, -2), k) * (1.0 / math.sqrt(d))  # (B, heads, N, N)
        weights = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = torch.matmul(v, weights.transpose(-1, -2))  # (B, heads, d, N)
        return x + self.proj(out.reshape(-1, c, self.size, self.size))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (expand + reshape, no Resize op), then a 3x3 conv."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.channels, self.size = channels, size
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.channels, self.size
        x = x[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2).reshape(-1, c, 2 * s, 2 * s)
        return self.conv(x)


class UNet(nn.Module):
    """ε/v/x0 predictor: forward(x (B,C,H,W), t (B,) float, label (B,) int64 | None)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, temb = cfg.base_channels, cfg.base_channels * 4
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.image_channels, ch, 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb, cfg.groups, cfg.dropout)

        def attn(c: int, size: int) -> nn.Module:
            if size in cfg.attention_resolutions:
                return Attention(c, size, cfg.head_channels, cfg.groups)
            return nn.Identity()

        self.down = nn.ModuleList()
        skips, size, cur = [ch], cfg.image_size, ch
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.blocks_per_level):
                self.down.append(nn.ModuleList([block(cur, ch * mult), attn(ch * mult, size)]))
                cur = ch * mult
                skips.append(cur)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                size //= 2
        self.mid = nn.ModuleList(
            [block(cur, cur), Attention(cur, size, cfg.head_channels, cfg.groups), block(cur, cur)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.blocks_per_level + 1):
                cin = cur + skips.pop()
                self.up.append(nn.ModuleList([block(cin, ch * mult), attn(ch * mult, size)]))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur, size))
                size *= 2
        self.norm_out = GroupNorm32(cfg.groups, cur)
        self.conv_out = nn.Conv2d(cur, cfg.image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def resblocks(self) -> list[ResBlock]:
        """The residual blocks in the order ``forward`` calls them."""
        down = [layer[0] for layer in self.down if not isinstance(layer, Downsample)]
        up = [layer[0] for layer in self.up if not isinstance(layer, Upsample)]
        return [*down, self.mid[0], self.mid[2], *up]  # type: ignore[list-item]

    @torch.no_grad()
    def block_tables(self, t: float) -> list[torch.Tensor]:
        """Per residual block, ``temb(emb) + conv1.bias`` at timestep ``t`` for every label.

        Row k of a table is what the block adds after its first convolution for label k
        (the null label included); an unconditional model has one row. A graph with a fixed
        timestep (the fused sampler) then looks the row up instead of recomputing the time
        embedding, the label embedding and one matrix product per block at every step.
        Computed in the model's dtype, as ``forward`` would.
        """
        p = next(self.parameters())
        tt = torch.full((1,), float(t), device=p.device)
        emb = self.time_mlp(timestep_embedding(tt, self.config.base_channels).to(p.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb.weight  # (K + 1, temb)
        return [b.temb(emb) + b.conv1.bias for b in self.resblocks()]  # type: ignore[operator]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | None, label: torch.Tensor | None = None,
        block_proj: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``block_proj``: rows of ``block_tables`` for this batch, one per residual block
        (then ``t`` and ``label`` are not used)."""
        emb = None
        if block_proj is None:
            assert t is not None
            emb = timestep_embedding(t, self.config.base_channels).to(x.dtype)
            emb = self.time_mlp(emb)
            if self.label_emb is not None:
                if label is None:
                    raise ValueError("this model is class-conditional: pass label (B,) int64")
                emb = emb + self.label_emb(label)
        projs = iter(block_proj or [])

        def res(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = block(h, emb, next(projs, None))
            return out

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, att = layer  # type: ignore[misc]
                h = att(res(block, h))
            hs.append(h)
        h = res(self.mid[2], self.mid[1](res(self.mid[0], h)))
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, att = layer  # type: ignore[misc]
                h = att(res(block, torch.cat([h, hs.pop()], dim=1)))
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
