"""diffusers' own sampling loop as a baseline: what a diffusers user runs today.

* ``diffusers-eager`` (fp32, fp16): the loop of diffusers' DDIMPipeline —
  ``scheduler.set_timesteps(steps)``, then per timestep the model and
  ``scheduler.step(out, t, x, eta=0).prev_sample`` — with diffusers' DDIMScheduler built
  from the source's scheduler config (``DDIMScheduler.from_config``; a DDPMScheduler
  config too). Classifier-free guidance, when asked, by batch doubling as the pipelines
  do. The scheduler's tables stay on the CPU, as diffusers keeps them.
* ``diffusers-compile`` (CUDA only): the same loop with the model compiled as diffusers
  documents it (``torch.compile(unet, mode=..., fullgraph=True)``), once per batch size
  and precision and reused for every step count (the timestep is a tensor input); the
  scheduler's step stays eager. The whole-loop compile of fewstep's equivalent loop is
  ``torch-compile`` (``baselines.py``).

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
    """The loop of a diffusers scheduler, for ``TorchEagerPath``'s timing machinery."""

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason is not None:
            return reason
        if self.src.scheduler is None:
            return NO_SCHEDULER
        if self.work.eta != 0.0:
            return f"eta={self.work.eta}: the diffusers baseline runs deterministic DDIM only"
        return None

    def loop(self, steps: int, net: Any = None
             ) -> Callable[[Any, Any, dict[str, Any]], Any]:
        """diffusers' loop at ``steps`` around ``net`` (default: the eager model)."""
        from fewstep.train import reference

        sched = self.src.fresh_scheduler(steps)
        timesteps = [int(t) for t in sched.timesteps]
        floats = [float(t) for t in timesteps]
        model, g = self.model_obj if net is None else net, self.work.guidance
        null, nulls, finish = self.work.meta.null_label, self._nulls(), self._finish

        def loop(x: Any, labels: Any, cond: dict[str, Any]) -> Any:
            fn = reference.denoiser(model, floats, labels, g, null, cond, nulls)
            for i, t in enumerate(timesteps):
                x = sched.step(fn(x, i), t, x, eta=0.0).prev_sample
            return finish(x)

        return loop


class DiffusersEagerPath(_DiffusersLoop):
    path = "diffusers-eager"


class DiffusersCompilePath(_DiffusersLoop, TorchCompilePath):
    """diffusers' loop around the compiled model, under ``TorchCompilePath``'s timing."""

    path = "diffusers-compile"
    _net: Any = None
    _net_batch: int | None = None

    def _compile(self, steps: int, batch: int) -> Any:
        import torch

        if self._net is None or self._net_batch != batch:
            torch._dynamo.reset()  # one batch size compiled at a time: no recompile limits
            self._net = torch.compile(self.model_obj, mode=self.mode, fullgraph=True,
                                      dynamic=False)
            self._net_batch = batch
        return self.loop(steps, self._net)

    network_what = "the compiled model (CUDA graph replay)"

    def network_model(self, steps: int, batch: int) -> Any:
        self._compile(steps, batch)
        return self._net

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        return TorchEagerPath.network(self, steps, batch)

    def close(self) -> None:
        self._net = None
        super().close()
