"""The torch modules that become fewstep's ONNX graphs.

``DenoiserGraph`` wraps the UNet (precision casts, classifier-free guidance inside);
``StepGraph`` adds one ``ddim.step``; ``SamplerGraph`` traces ``sampling.run_loop`` for
a fixed plan. The DDIM math is the runtime's own code, traced — not a second copy.
Graph inputs and outputs are float32 (int64 labels) whatever the internal precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewstep.runtime import ddim, images, sampling
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.sampling import SamplingPlan


class DenoiserGraph(nn.Module):
    """forward(x, t, [label], [guidance]) → the network output, float32."""

    def __init__(self, unet: nn.Module, meta: ModelMeta, guidance: bool, fp16: bool) -> None:
        super().__init__()
        # A copy for fp16: halving in place would round the caller's fp32 weights.
        self.unet = copy.deepcopy(unet).half() if fp16 else unet.float()
        self.dtype = torch.float16 if fp16 else torch.float32
        self.conditional = meta.conditional
        self.guidance = guidance
        self.null_label = meta.null_label
        self.image_shape = meta.image_shape

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        label: torch.Tensor | None,
        guidance: torch.Tensor | None,
        shared_t: bool = False,
    ) -> torch.Tensor:
        """The UNet on x (B, C, H, W) at t, CFG-combined when guided.

        t is (B,), or (1,) with ``shared_t`` (one constant timestep for the batch).
        """
        if self.guidance:
            assert label is not None and guidance is not None
            x = torch.cat([x, x])
            t = t if shared_t else torch.cat([t, t])
            label = torch.cat([label, torch.full_like(label, self.null_label)])
        out: torch.Tensor = self.unet(x.to(self.dtype), t, label).float()
        if self.guidance:
            assert guidance is not None
            pair = out.reshape(2, -1, *self.image_shape)  # (2, B, C, H, W); no chunk guards
            guided: torch.Tensor = sampling.guided(pair[0], pair[1], guidance.reshape(-1, 1, 1, 1))
            return guided
        return out

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        label: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.denoise(x, t, label, guidance)


class StepGraph(nn.Module):
    """forward(x, t, a_t, a_prev, eta, noise, [label], [guidance]) → x_prev."""

    def __init__(self, denoiser: DenoiserGraph, meta: ModelMeta) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.prediction_type = meta.prediction_type
        self.clip = meta.schedule.clip_sample_range

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        a_t: torch.Tensor,
        a_prev: torch.Tensor,
        eta: torch.Tensor,
        noise: torch.Tensor,
        label: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.denoiser.denoise(x, t, label, guidance)

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(-1, 1, 1, 1)

        x_prev: torch.Tensor = ddim.step(
            out, x, col(a_t), col(a_prev), prediction_type=self.prediction_type,
            eta=col(eta), noise=noise, clip_sample_range=self.clip,
        )
        return x_prev


class SamplerGraph(nn.Module):
    """forward(x_T, [label], [guidance], [noise (B, S, C, H, W)]) → image or x0.

    The plan's timesteps and ᾱ values are Python numbers, so they become constants and
    the per-step time embedding is folded away at export.
    """

    def __init__(self, denoiser: DenoiserGraph, plan: SamplingPlan, uint8: bool) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.plan = plan
        self.uint8 = uint8

    def forward(
        self,
        x: torch.Tensor,
        label: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = self.plan

        def denoise(x_i: torch.Tensor, i: int) -> torch.Tensor:
            t = torch.tensor([float(plan.timesteps[i])], dtype=torch.float32, device=x_i.device)
            return self.denoiser.denoise(x_i, t, label, guidance, shared_t=True)

        x0: torch.Tensor = sampling.run_loop(plan, denoise, x, noise)
        if not self.uint8:
            return x0
        pixels: torch.Tensor = images.to_pixel_values(x0)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1)
