"""What the training and the distillation loops share: device choice, per-step seeds,
the indexed dataset and its collate, the EMA update, CPU copies of weights, the
divergence error and the Ctrl-C handler."""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np
import torch

from fewstep.runtime.errors import NumericalError

from .data import ImageSource


class TrainingDiverged(NumericalError, FloatingPointError):
    """The loss or the weights became NaN/Inf; the last good checkpoint was kept.

    A ``NumericalError`` (``fewstep train`` reports it in one line, exit code 1) and,
    as before, a ``FloatingPointError``.
    """


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA GPU is visible to torch; pass --device cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device='mps' but MPS is not available; pass --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """Seed of torch's generator for the UNet's dropout in one micro-batch of one rank."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + micro * 15_485_863) % (2**63)


class Indexed(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Global sample index → (image, label) (the distillation loop's data)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source.image(int(i))
        return torch.from_numpy(np.ascontiguousarray(image)), int(label)


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(
            list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay
        )
        for e, p in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(p)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in unwrap(model).state_dict().items()}


class StopOnInterrupt:
    """First Ctrl-C (or SIGTERM, e.g. a cluster's preemption notice): finish the current
    step, save, stop. A second one: stop at once (the last saved checkpoint stays)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Any) -> None:
        self.requested = False
        self._log = log
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self._log(f"\n{name}: saving after this step (again to stop without saving)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
