"""The torch modules that become fewstep's ONNX graphs.

``DenoiserGraph`` wraps the network — fewstep's UNet, or any module adapted by
``Adapted`` — (precision casts, classifier-free guidance inside);
``StepGraph`` adds one ``ddim.step``; ``SamplerGraph`` traces ``sampling.run_loop`` for
a fixed plan. The DDIM math is the runtime's own code, traced — not a second copy.
Graph inputs and outputs are float32 (int64 labels) whatever the internal precision.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterator

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


Cond = dict[str, torch.Tensor]
Call = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class Adapted(nn.Module):
    """Any denoiser: ``module`` (it holds the weights) and ``call(x, t, cond)``, which maps
    fewstep's arguments onto it — x (B, *sample_shape) float32, t (B,) float32 timesteps,
    cond {name: (B, ...)} with ``label`` (B,) int64 for a model with classes — and returns
    the network output, shaped like x. E.g. for a diffusers UNet2DModel:
    ``Adapted(unet, lambda x, t, cond: unet(x, t).sample)``.

    ``call`` may close over ``module`` itself, so graphs use the module in place (never a
    copy); ``cast`` changes its precision for an export and restores it after.
    """

    def __init__(self, module: nn.Module, call: Call) -> None:
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.call(x, t, cond)

    def __deepcopy__(self, memo: dict[int, object]) -> Adapted:
        """A copy whose ``call`` runs the copied module: a function's closure is copied
        with the same memo, so a ``lambda`` over the module refers to the copy (moving
        the copy to another device or dtype leaves the original as it was)."""
        module = copy.deepcopy(self.module, memo)
        call = self.call
        if isinstance(call, types.FunctionType) and call.__closure__:
            cells = tuple(types.CellType(copy.deepcopy(c.cell_contents, memo))
                          for c in call.__closure__)
            call = types.FunctionType(call.__code__, call.__globals__, call.__name__,
                                      call.__defaults__, cells)
        elif not isinstance(call, types.FunctionType):
            call = copy.deepcopy(call, memo)
        return Adapted(module, call).train(self.training)


@contextlib.contextmanager
def cast(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``model``'s parameters and buffers in ``dtype`` inside the block; restored exactly
    (from a copy of the state) after it."""
    if dtype == torch.float32:
        yield
        return
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(dtype)
    try:
        yield
    finally:
        model.float()
        model.load_state_dict(saved)


class DenoiserGraph(nn.Module):
    """forward(x, t, [label], [cond...], [guidance]) → the network output, float32.

    ``precision`` (fp32, fp16 or bf16) is the dtype of the network inside; graph inputs
    and outputs stay float32. fewstep's UNet is copied, folded and cast here; an
    ``Adapted`` module is used as it is (cast it with ``cast`` around the export).
    """

    def __init__(self, unet: nn.Module, meta: ModelMeta, guidance: bool, *,
                 precision: str = "fp32") -> None:
        super().__init__()
        checks.choice("precision", precision, tuple(GRAPH_DTYPES))
        self.precision = precision
        self.dtype = GRAPH_DTYPES[precision]
        if isinstance(unet, Adapted):
            self.unet: nn.Module = unet
        else:
            # A copy: folding and casting in place would change the caller's weights.
            model = copy.deepcopy(unet).float()
            fold_attention_norms(model)
            self.unet = model.to(self.dtype)
        self.adapted = isinstance(unet, Adapted)
        self.conditional = meta.conditional
        self.guidance = guidance
        self.null_label = meta.null_label if meta.null_label is not None else 0
        self.sample_shape = meta.sample_shape
        self.cond_names = tuple(c.name for c in meta.cond)
        self.nulls = {c.name: (c.null or 0.0) for c in meta.cond}

    def ones(self) -> tuple[int, ...]:
        """Trailing singleton dims that broadcast a (B,) vector over a sample."""
        return (1,) * len(self.sample_shape)

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        label: torch.Tensor | None,
        guidance: torch.Tensor | None,
        shared_t: bool = False,
        tables: list[torch.Tensor] | None = None,
        cond: Cond | None = None,
    ) -> torch.Tensor:
        """The network on x (B, *sample_shape) at t, CFG-combined when guided.

        t is (B,), or (1,) with ``shared_t`` (one constant timestep for the batch: an
        adapted module still gets it as (B,)). ``tables``: fewstep's UNet's
        ``block_tables`` at that constant t (then t is not used): one row lookup per
        residual block replaces the time/label embedding.
        """
        cond = dict(cond or {})
        if self.guidance:
            assert guidance is not None
            x = torch.cat([x, x])
            t = t if shared_t else torch.cat([t, t])
            if label is not None:
                label = torch.cat([label, torch.full_like(label, self.null_label)])
            cond = {k: torch.cat([v, torch.full_like(v, self.nulls[k])])
                    for k, v in cond.items()}
        if self.adapted:
            if shared_t:
                t = t.expand(x.shape[0])
            args = {k: (v.to(self.dtype) if v.is_floating_point() else v)
                    for k, v in cond.items()}
            if label is not None:
                args["label"] = label
            out: torch.Tensor = self.unet(x.to(self.dtype), t.to(self.dtype), args).float()
        elif tables is None:
            out = self.unet(x.to(self.dtype), t, label).float()
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
            pair = out.reshape(2, -1, *self.sample_shape)  # (2, B, ...); no chunk guards
            guided: torch.Tensor = sampling.guided(pair[0], pair[1],
                                                   guidance.reshape(-1, *self.ones()))
            return guided
        return out

    def split(self, args: tuple[torch.Tensor, ...]) -> tuple[
            torch.Tensor | None, Cond, torch.Tensor | None]:
        """(label, cond, guidance) from the graph's trailing inputs, in graph order."""
        rest = list(args)
        label = rest.pop(0) if self.conditional else None
        cond = {name: rest.pop(0) for name in self.cond_names}
        guidance = rest.pop(0) if self.guidance else None
        return label, cond, guidance

    def forward(self, x: torch.Tensor, t: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        label, cond, guidance = self.split(args)
        return self.denoise(x, t, label, guidance, cond=cond)


class StepGraph(nn.Module):
    """forward(x, t, a_t, a_prev, eta, noise, [label], [cond...], [guidance]) → x_prev."""

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
        *args: torch.Tensor,
    ) -> torch.Tensor:
        label, cond, guidance = self.denoiser.split(args)
        out = self.denoiser.denoise(x, t, label, guidance, cond=cond)

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(-1, *self.denoiser.ones())

        x_prev: torch.Tensor = ddim.step(
            out, x, col(a_t), col(a_prev), prediction_type=self.prediction_type,
            eta=col(eta), noise=noise, clip_sample_range=self.clip,
        )
        return x_prev


class SamplerGraph(nn.Module):
    """forward(x_T, [label], [cond...], [guidance], [noise (B, S, ...)]) → image or x0.

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
        if uint8:
            c, h, w = denoiser.sample_shape
            marker = torch.from_numpy(images.nonfinite_marker((h, w, c)).astype(np.float32))
            self.register_buffer("marker", marker, persistent=False)  # (H, W, C)

    def _tables(self, i: int) -> list[torch.Tensor] | None:
        if not self.n_tables:
            return None
        return [getattr(self, f"table_{i}_{b}") for b in range(self.n_tables)]

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        noise = args[-1] if plan.stochastic else None
        label, cond, guidance = self.denoiser.split(args[:-1] if plan.stochastic else args)

        def denoise(x_i: torch.Tensor, i: int) -> torch.Tensor:
            t = torch.tensor([float(plan.timesteps[i])], dtype=torch.float32, device=x_i.device)
            return self.denoiser.denoise(x_i, t, label, guidance, shared_t=True,
                                         tables=self._tables(i), cond=cond)

        x0: torch.Tensor = sampling.run_loop(plan, denoise, x, noise)
        if not self.uint8:
            return x0
        pixels: torch.Tensor = images.to_pixel_values(x0).permute(0, 2, 3, 1)  # (B, H, W, C)
        # (B,): every value of a sample finite. Counted with a float sum (exact below 2**24
        # values a sample) rather than all(): ONNX Runtime's symbolic shape inference,
        # which its graph optimizer (the ORT-CUDA variant) runs, has no ReduceMin rule.
        flags = torch.isfinite(x0).flatten(1).to(torch.float32)
        finite = flags.sum(dim=1) == float(flags.shape[1])
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
