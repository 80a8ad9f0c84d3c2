"""diffusers' own sampling loop as a baseline: what a diffusers user runs today.

* ``diffusers-eager`` (fp32, fp16): the loop of diffusers' DDIMPipeline —
  ``scheduler.set_timesteps(steps)``, then per timestep the model and
  ``scheduler.step(out, t, x, eta=0).prev_sample`` — with diffusers' DDIMScheduler built
  from the source's scheduler config (``DDIMScheduler.from_config``; a DDPMScheduler
  config too). Classifier-free guidance, when asked, by batch doubling as the pipelines
  do. The scheduler's tables stay on the CPU, as diffusers keeps them.
* ``diffusers-compile`` (CUDA only): the same loop, whole, as one
  ``torch.compile(fullgraph=True, dynamic=False)`` function per (steps, batch); the
  scheduler's ``alphas_cumprod``/``final_alpha_cumprod`` are moved to the GPU first, as
  CUDA graphs need every input on the device.

Both return what every path returns (uint8 NHWC images of an image model, float32
samples of any other), so their max-error/PSNR against the fp32 reference (fewstep's
loop in PyTorch) is a check of the two loops' agreement as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .baselines import TorchCompilePath, TorchEagerPath
from .torch_source import NO_SCHEDULER


class _DiffusersLoop(TorchEagerPath):
    """The loop of a diffusers scheduler, for ``TorchEagerPath``'s and
    ``TorchCompilePath``'s timing machinery."""

    tables_on_device = False

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is not None:
            return reason
        if self.src.scheduler is None:
            return NO_SCHEDULER
        if self.work.eta != 0.0:
            return f"eta={self.work.eta}: the diffusers baseline runs deterministic DDIM only"
        return None

    def loop(self, steps: int) -> Callable[[Any, Any, dict[str, Any]], Any]:
        from fewstep.train import reference

        sched = self.src.fresh_scheduler(steps)
        if self.tables_on_device:
            sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
            sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(self.device)
        timesteps = [int(t) for t in sched.timesteps]
        model, g = self.model_obj, self.work.guidance
        null, nulls, finish = self.work.meta.null_label, self._nulls(), self._finish

        def loop(x: Any, labels: Any, cond: dict[str, Any]) -> Any:
            fn = reference.denoiser(model, [float(t) for t in timesteps], labels, g, null,
                                    cond, nulls)
            for i, t in enumerate(timesteps):
                x = sched.step(fn(x, i), t, x, eta=0.0).prev_sample
            return finish(x)

        return loop


class DiffusersEagerPath(_DiffusersLoop):
    path = "diffusers-eager"


class DiffusersCompilePath(_DiffusersLoop, TorchCompilePath):
    """``_DiffusersLoop``'s loop under ``TorchCompilePath``'s compile and timing."""

    path = "diffusers-compile"
    tables_on_device = True
