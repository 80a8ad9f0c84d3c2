"""The torch modules that become fewstep's ONNX graphs.

``DenoiserGraph`` wraps the UNet (precision casts, classifier-free guidance inside);
``StepGraph`` adds one ``ddim.step``; ``SamplerGraph`` traces ``sampling.run_loop`` for
a fixed plan. The DDIM math is the runtime's own code, traced — not a second copy.
Graph inputs and outputs are float32 (int64 labels) whatever the internal precision.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fewstep.runtime import checks, ddim, images, sampling
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.sampling import SamplingPlan

# Export precision → the dtype the UNet's weights and activations are cast to. The UNet
# keeps its own fp32 islands (GroupNorm statistics, softmax, the time embedding's
# sinusoids) whatever this dtype is, so fp16 and bf16 graphs have the same islands.
GRAPH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}


class DenoiserGraph(nn.Module):
    """forward(x, t, [label], [guidance]) → the network output, float32.

    ``precision`` (fp32, fp16 or bf16) is the dtype of the UNet inside; graph inputs and
    outputs stay float32.
    """

    def __init__(self, unet: nn.Module, meta: ModelMeta, guidance: bool, *,
                 precision: str = "fp32") -> None:
        super().__init__()
        checks.choice("precision", precision, tuple(GRAPH_DTYPES))
        # A copy: folding and casting in place would change the caller's weights.
        model = copy.deepcopy(unet).float()
        fold_attention_norms(model)
        self.precision = precision
        self.dtype = GRAPH_DTYPES[precision]
        self.unet = model.to(self.dtype)
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
        tables: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet on x (B, C, H, W) at t, CFG-combined when guided.

        t is (B,), or (1,) with ``shared_t`` (one constant timestep for the batch).
        ``tables``: the UNet's ``block_tables`` at that constant t (then t is not used):
        one row lookup per residual block replaces the time/label embedding.
        """
        if self.guidance:
            assert label is not None and guidance is not None
            x = torch.cat([x, x])
            t = t if shared_t else torch.cat([t, t])
            label = torch.cat([label, torch.full_like(label, self.null_label)])
        if tables is None:
            out: torch.Tensor = self.unet(x.to(self.dtype), t, label).float()
        else:
            if self.conditional:
                assert label is not None
                proj = [tab.index_select(0, label) for tab in tables]
            else:
                proj = tables
            assert all(p.dtype == self.dtype for p in proj)
            out = self.unet(x.to(self.dtype), None, None, block_proj=proj).float()
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

    The plan's timesteps and ᾱ values are Python numbers, so they become constants. For
    the fewstep UNet the time and label embeddings are precomputed per step: each
    residual block looks its row up in a (labels, channels) table (conv1's bias folded
    in) instead of running the embedding MLP and one matrix product per block per step.

    A uint8 output replaces an image that has any NaN/Inf value by
    ``images.nonfinite_marker`` (a fixed pattern the runtime recognises and reports),
    never by a silently black or saturated picture.
    """

    def __init__(self, denoiser: DenoiserGraph, plan: SamplingPlan, uint8: bool) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.plan = plan
        self.uint8 = uint8
        self.n_tables = 0
        block_tables = getattr(denoiser.unet, "block_tables", None)  # the fewstep UNet's
        if block_tables is not None:
            for i in range(plan.start, plan.steps):
                tables: list[torch.Tensor] = block_tables(float(plan.timesteps[i]))
                self.n_tables = len(tables)
                for b, tab in enumerate(tables):
                    self.register_buffer(f"table_{i}_{b}", tab.detach().clone(), persistent=False)
        c, h, w = denoiser.image_shape
        marker = torch.from_numpy(images.nonfinite_marker((h, w, c)).astype(np.float32))
        self.register_buffer("marker", marker, persistent=False)  # (H, W, C)

    def _tables(self, i: int) -> list[torch.Tensor] | None:
        if not self.n_tables:
            return None
        return [getattr(self, f"table_{i}_{b}") for b in range(self.n_tables)]

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
            return self.denoiser.denoise(x_i, t, label, guidance, shared_t=True,
                                         tables=self._tables(i))

        x0: torch.Tensor = sampling.run_loop(plan, denoise, x, noise)
        if not self.uint8:
            return x0
        pixels: torch.Tensor = images.to_pixel_values(x0).permute(0, 2, 3, 1)  # (B, H, W, C)
        finite = torch.isfinite(x0).flatten(1).all(dim=1)  # (B,)
        marker: torch.Tensor = self.marker  # type: ignore[assignment]
        pixels = torch.where(finite[:, None, None, None], pixels, marker)
        return pixels.to(torch.uint8)


def fold_attention_norms(model: nn.Module) -> None:
    """Fold each attention block's GroupNorm affine into its qkv 1x1 convolution, in place.

    qkv(γ·n + β) = (W·diag γ) n + (W β + b): exact algebra (done in float64), two fewer
    elementwise kernels per attention block per step on ONNX Runtime.
    """
    from fewstep.train.unet import Attention

    for m in model.modules():
        if not isinstance(m, Attention) or not m.norm.affine:
            continue
        qkv_b, norm_w, norm_b = m.qkv.bias, m.norm.weight, m.norm.bias
        assert qkv_b is not None and norm_w is not None and norm_b is not None
        with torch.no_grad():
            w = m.qkv.weight.double()  # (3C, C, 1, 1)
            g, b = norm_w.double(), norm_b.double()
            bias = qkv_b.double() + w[:, :, 0, 0] @ b
            m.qkv.weight.copy_((w * g[None, :, None, None]).to(m.qkv.weight.dtype))
            qkv_b.copy_(bias.to(qkv_b.dtype))
        m.norm.affine = False
        m.norm.weight = None  # type: ignore[assignment]
        m.norm.bias = None  # type: ignore[assignment]
