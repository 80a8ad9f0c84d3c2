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


def call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
         labels: torch.Tensor | None, cond: dict[str, torch.Tensor] | None = None
         ) -> torch.Tensor:
    """The network on (x, t): fewstep's UNet as ``model(x, t, labels)``, an adapted module
    (``fewstep.export.graphs.Adapted``) with its conditioning dict, labels as ``label``."""
    from fewstep.export.graphs import Adapted

    # a torch.compile'd model wraps the module it compiled (``_orig_mod``)
    if isinstance(getattr(model, "_orig_mod", model), Adapted):
        args = dict(cond or {})
        if labels is not None:
            args["label"] = labels
        out: torch.Tensor = model(x, t, args)
        return out
    result: torch.Tensor = model(x, t, labels)
    return result


def denoiser(
    model: torch.nn.Module,
    timesteps: Sequence[float],
    labels: torch.Tensor | None,
    guidance: float | torch.Tensor | None,
    null_label: int | None,
    cond: dict[str, torch.Tensor] | None = None,
    nulls: dict[str, float] | None = None,
) -> Any:
    """``denoise(x, i)`` for ``sampling.run_loop``: the network at ``timesteps[i]`` (a
    plan's), with CFG if asked (the unconditional half gets ``null_label`` and each input's
    ``nulls`` value)."""

    def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(timesteps[i]), device=x.device)
        if guidance is None:
            return call(model, x, t, labels, cond)
        lab = None
        if labels is not None:
            assert null_label is not None
            lab = torch.cat([labels, torch.full_like(labels, null_label)])
        both = {k: torch.cat([v, torch.full_like(v, (nulls or {}).get(k, 0.0))])
                for k, v in (cond or {}).items()}
        out = call(model, torch.cat([x, x]), torch.cat([t, t]), lab, both)
        c, uncond = out.chunk(2)
        ones = (1,) * (x.ndim - 1)
        g = guidance if not isinstance(guidance, torch.Tensor) else guidance.reshape(-1, *ones)
        return sampling.guided(c, uncond, g)

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
    cond: dict[str, NDArray[Any]] | None = None,
    latents: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Generate n samples; returns the final samples (n, *sample_shape) float32 in model
    range. ``cond``: {name: (n, ...)} for the model's conditioning inputs; ``latents``:
    x_T (n, *sample_shape) instead of the seed's noise."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    plan = SamplingPlan.create(meta, steps, spacing, eta, strength if init is not None else 1.0)
    guidance = sampling.check_guidance(meta, guidance)
    all_labels = sampling.resolve_labels(meta, n, labels)
    model = model.to(device=device, dtype=dtype).eval()
    out = np.empty((n, *meta.sample_shape), dtype=np.float32)
    for lo in range(0, n, batch_size):
        idx = range(lo, min(n, lo + batch_size))
        x_T, step_noise = host_noise.generation_noise(
            seed, idx, meta.sample_shape, plan.steps if plan.stochastic else 0
        )
        if latents is not None:
            x_T = np.ascontiguousarray(latents[lo : lo + len(idx)], dtype=np.float32)

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
        part = {k: torch.from_numpy(np.ascontiguousarray(v[lo : lo + len(idx)])).to(device)
                for k, v in (cond or {}).items()}
        part = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()}
        fn = denoiser(model, plan.timesteps, lab, guidance, meta.null_label, part,
                      {c.name: c.null or 0.0 for c in meta.cond})
        x = sampling.run_loop(plan, fn, x, dev(step_noise), inpaint)
        out[lo : lo + len(idx)] = x.float().cpu().numpy()
    return out


def sample_images(model: torch.nn.Module, meta: ModelMeta, n: int, steps: int,
                  **kwargs: Any) -> NDArray[np.uint8]:
    """Like ``sample`` but returns (n, H, W, C) uint8, as the runtime does."""
    return imgs.to_uint8_nhwc(sample(model, meta, n, steps, **kwargs))
