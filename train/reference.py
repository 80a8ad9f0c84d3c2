"""The PyTorch reference sampler: the same loop as the runtime, driven by the UNet.

Every backend is compared against this: same ``SamplingPlan``, same host noise
(numpy Philox by seed and image index), same labels and guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fewstep.runtime import images as imgs
from fewstep.runtime import noise as host_noise
from fewstep.runtime import sampling
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.sampling import SamplingPlan


def denoiser(
    model: torch.nn.Module,
    plan: SamplingPlan,
    labels: torch.Tensor | None,
    guidance: float | torch.Tensor | None,
    null_label: int,
) -> Any:
    """``denoise(x, i)`` for ``sampling.run_loop``: the UNet at step i, with CFG if asked."""

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(plan.timesteps[i]), device=x.device)
        if guidance is None:
            return model(x, t, labels)
        assert labels is not None
        out = model(
            torch.cat([x, x]), torch.cat([t, t]),
            torch.cat([labels, torch.full_like(labels, null_label)]),
        )
        cond, uncond = out.chunk(2)
        g = guidance if not isinstance(guidance, torch.Tensor) else guidance.reshape(-1, 1, 1, 1)
        return sampling.guided(cond, uncond, g)

    return denoise


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    meta: ModelMeta,
    n: int,
    steps: int,
    *,
    eta: float = 0.0,
    seed: int = 0,
    labels: Sequence[int | str] | int | str | None = None,
    guidance: float | None = None,
    spacing: str = sampling.DEFAULT_SPACING,
    init: NDArray[np.float32] | None = None,
    strength: float = 1.0,
    mask: NDArray[np.float32] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> NDArray[np.float32]:
    """Generate n images; returns the final samples (n, C, H, W) float32 in model range."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    plan = SamplingPlan.create(meta, steps, spacing, eta, strength if init is not None else 1.0)
    guidance = sampling.check_guidance(meta, guidance)
    all_labels = sampling.resolve_labels(meta, n, labels)
    model = model.to(device=device, dtype=dtype).eval()
    out = np.empty((n, *meta.image_shape), dtype=np.float32)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(n, lo + batch_size))
        x_T, step_noise = host_noise.generation_noise(
            seed, idx, meta.image_shape, plan.steps if plan.stochastic else 0
        )

        def dev(a: NDArray[Any] | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device=device, dtype=dtype)

        x_T_t = dev(x_T)
        assert x_T_t is not None
        lab = None
        if all_labels is not None:
            lab = torch.from_numpy(all_labels[lo : lo + len(idx)]).to(device)
        init_t = dev(None if init is None else np.broadcast_to(init, x_T.shape).copy())
        inpaint = None
        if mask is not None and init_t is not None:
            mask_t = dev(np.broadcast_to(mask, (len(idx), 1, *meta.image_shape[1:])).copy())
            assert mask_t is not None
            inpaint = (init_t, mask_t, x_T_t)
        x = sampling.initial_state(plan, x_T_t, init_t)
        fn = denoiser(model, plan, lab, guidance, meta.null_label)
        x = sampling.run_loop(plan, fn, x, dev(step_noise), inpaint)
        out[lo : lo + len(idx)] = x.float().cpu().numpy()
    return out


def sample_images(model: torch.nn.Module, meta: ModelMeta, n: int, steps: int,
                  **kwargs: Any) -> NDArray[np.uint8]:
    """Like ``sample`` but returns (n, H, W, C) uint8, as the runtime does."""
    return imgs.to_uint8_nhwc(sample(model, meta, n, steps, **kwargs))
