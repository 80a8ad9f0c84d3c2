"""The PyTorch model the torch baselines and the fp32 reference run: where it comes from.

Three sources, one object:

* a ``fewstep train`` checkpoint (``--source model.pt``): its EMA weights;
* a diffusers folder (``--source FOLDER``, a pipeline folder or a model folder with its
  ``scheduler_config.json`` beside ``--scheduler-config``): the UNet2DModel/UNet1DModel, and
  its scheduler, rebuilt by diffusers as a ``DDIMScheduler`` (a DDPMScheduler config too:
  DDIM sampling of a DDPM-trained model), for the ``diffusers-eager`` and
  ``diffusers-compile`` baselines, which run diffusers' own loop;
* any ``torch.nn.Module`` from Python (``TorchSource.from_module``), with the ``call`` it
  was exported with and, optionally, a diffusers scheduler for those two baselines.

The model is fp32 on the CPU, in eval mode; every path copies it to its device and dtype.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta

NO_SOURCE = ("no --source given: the torch baselines and the PyTorch fp32 reference need "
             "the model's weights (a fewstep checkpoint or a diffusers folder)")
NO_SCHEDULER = ("no diffusers scheduler: pass a diffusers folder as --source (or "
                "TorchSource.from_module(..., scheduler=...))")

class TorchSource:
    """The source model (fp32, on the CPU), its ModelMeta, and whether torch can run here.

    ``reason`` is None when the baselines can run, else why not (one line). ``scheduler``
    is a diffusers scheduler (a DDIMScheduler) or None. ``kind``: ``checkpoint``,
    ``diffusers``, ``module`` or ``none``.
    """

    def __init__(self, source: Path | None, threads: int | None = None,
                 sample_shape: tuple[int, ...] | None = None,
                 scheduler_config: Path | None = None) -> None:
        self.reason: str | None = None
        self.model: Any = None
        self.meta: ModelMeta | None = None
        self.scheduler: Any = None
        self.path = source
        self.kind = "none"
        self.cuda = False
        if source is None:
            self.reason = NO_SOURCE
            return
        torch = self._torch(threads)
        if torch is None:
            return
        from fewstep.export import api

        # ArtifactError/ValueError: a usage error, reported by the CLI in one line
        if source.is_dir():
            self.model, self.meta, sched = api.load_diffusers(source, scheduler_config,
                                                              sample_shape)
            self.scheduler = ddim_scheduler(sched.config)
            self.kind = "diffusers"
        else:
            self.model, self.meta = api.load_source(source, scheduler_config)
            self.kind = "checkpoint"
        self.model = self.model.float().eval()

    @classmethod
    def from_module(cls, module: Any, meta: ModelMeta, call: Any = None,
                    scheduler: Any = None, name: str = "module",
                    threads: int | None = None) -> TorchSource:
        """A source from Python: ``module`` with the ``call`` it was exported with (as
        ``fewstep.export.export_module``: ``call(x, t, cond)``, default ``module(x, t,
        **cond)``), the ``meta`` of its artifact (``Artifact.open(path).meta``), and
        optionally a diffusers scheduler (or its config mapping) for the diffusers loop."""
        self = cls(None)
        self.reason, self.path, self.kind = None, Path(name), "module"
        torch = self._torch(threads)
        if torch is None:
            return self
        from fewstep.export.api import weights_hash
        from fewstep.export.graphs import Adapted

        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if call is None:
            def call(x: Any, t: Any, c: dict[str, Any]) -> Any:
                return module(x, t, **c)
        self.model = Adapted(module, call).float().eval()
        self.meta = meta
        if weights_hash(module) != meta.source_hash:
            raise ArtifactError(f"{name} is not the module this artifact was exported from "
                                "(its weights hash differs from the artifact's source_hash)")
        if scheduler is not None:
            config = getattr(scheduler, "config", scheduler)
            self.scheduler = ddim_scheduler(dict(config))
        return self

    def _torch(self, threads: int | None) -> Any:
        try:
            import torch
        except ImportError as e:
            self.reason = f"torch is not importable ({e}); pip install 'fewstep[train]'"
            return None
        if threads is not None:
            torch.set_num_threads(threads)
        self.cuda = bool(torch.cuda.is_available())
        return torch

    def check_matches(self, art: Any) -> None:
        """Raise ArtifactError unless the artifact ``art`` was exported from this source."""
        if self.meta is None:
            return
        if self.meta.source_hash != art.meta.source_hash:
            raise ArtifactError(
                f"--source {self.path} is not the source of {art.path.name} (source_hash "
                f"{self.meta.source_hash[:19]}... vs {art.meta.source_hash[:19]}...); pass "
                "the checkpoint or diffusers folder the artifact was exported from"
            )

    def fresh_scheduler(self, steps: int) -> Any:
        """A copy of the diffusers scheduler with ``set_timesteps(steps)`` done."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(steps)
        return sched


def ddim_scheduler(config: Any) -> Any:
    """diffusers' DDIMScheduler from a DDIMScheduler or DDPMScheduler config, as a user
    samples a DDPM-trained model with DDIM (``DDIMScheduler.from_config``)."""
    try:
        import diffusers
    except ImportError as e:
        raise ArtifactError(f"diffusers is not importable ({e}); pip install "
                            "'fewstep[export]'") from None
    return diffusers.DDIMScheduler.from_config(dict(config))
