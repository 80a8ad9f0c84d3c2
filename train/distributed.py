"""Several processes, one training run: the torchrun environment, the process group
and the ``fewstep train --gpus N`` launcher.

``torchrun --nproc-per-node N -m fewstep.train ...`` starts N copies of the training
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in their environment; ``fewstep train --gpus N ...`` runs torchrun's
launcher in-process (``--standalone``: one host, a free port) with the same arguments.
Each process then

* joins the process group: NCCL when it trains on ``cuda:LOCAL_RANK``, gloo on the
  CPU; plus a small gloo group for control messages (stop flags, barriers, the logged
  loss), so they never wait on the GPU stream;
* trains with DistributedDataParallel (``fit.Trainer``; what is identical across ranks
  and world sizes is written there);
* leaves the group on every exit path, errors and Ctrl-C included.

A rank that fails does not leave the others hanging: under torchrun the agent stops
the remaining workers as soon as one exits with an error and reports the first
failure; without an agent every collective times out after ``FEWSTEP_DIST_TIMEOUT_S``
seconds (default 600). NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, and
PyTorch's symmetric memory and NVSHMEM likewise) unless the environment sets it: the
launcher's workers inherit these variables, and each process sets them before NCCL
creates its communicator.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FEWSTEP_DIST_TIMEOUT_S"
NVLS_ENV = "NCCL_NVLS_ENABLE"
# NVLink multicast off: NCCL's NVLS, PyTorch's symmetric memory, NVSHMEM.
MULTICAST_OFF = {NVLS_ENV: "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the variables of ``MULTICAST_OFF`` that the environment does not set."""
    env = os.environ if environ is None else environ
    for name, value in MULTICAST_OFF.items():
        env.setdefault(name, value)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a run started by torchrun."""

    rank: int
    world_size: int
    local_rank: int


def from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun placement of this process, or None when torchrun did not start it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = env.get(name, "0")
        if not text.strip().isdigit():
            raise ValueError(f"environment variable {name}={text!r} is not a whole number; "
                             "start several processes with torchrun or fewstep train --gpus N")
        values[name] = int(text)
    launch = Launch(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"RANK={launch.rank} does not fit WORLD_SIZE={launch.world_size}")
    return launch


def timeout_s(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds > 0")
    return value


def device_for(requested: str, local_rank: int) -> torch.device:
    """The device of one process of a multi-process run: ``cuda:LOCAL_RANK`` or ``cpu``."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise ValueError(
            f"--device {requested} with several processes: each process uses cuda:LOCAL_RANK; "
            "pass --device cuda (or auto), or --device cpu to train on CPU processes (gloo)"
        )
    if not torch.cuda.is_available():
        if requested == "auto":
            return torch.device("cpu")
        raise ValueError("--device cuda but no CUDA GPU is visible to torch; pass --device cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA GPU(s) are visible; "
                         "start at most that many processes per host")
    return torch.device("cuda", local_rank)


class Comm:
    """The few collectives the training loop needs; every method is a no-op alone."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world_size={self.world_size})"

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (the same float on every rank)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return float(t.item()) / self.world_size

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (picklable objects; tests, checks)."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out


SINGLE = Comm()
_current: Comm = SINGLE


def current() -> Comm:
    """The Comm of the process group this process is in (``SINGLE`` outside one)."""
    return _current


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device,
                  timeout: float | None = None) -> Iterator[Comm]:
    """Join the run's process group for the body of the ``with``; always leave it."""
    global _current
    multicast_off()  # NCCL reads it when it creates the communicator
    wait = datetime.timedelta(seconds=timeout if timeout is not None else timeout_s())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=launch.rank, world_size=launch.world_size,
        timeout=wait, device_id=device if cuda else None,
    )
    try:
        control = dist.new_group(backend="gloo", timeout=wait) if cuda else dist.group.WORLD
        _current = Comm(launch.rank, launch.world_size, control)
        yield _current
        _current.barrier()  # nobody leaves while another rank still needs it
    finally:
        _current = SINGLE
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def strip_gpus(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--gpus N`` / ``--gpus=N`` (the workers must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str], device: str = "auto") -> int:
    """Run ``python -m fewstep.train ARGV`` in ``nproc`` processes through torchrun.

    Returns the exit code of the first process that failed (0 when all succeeded, 130
    after Ctrl-C: every worker saves a checkpoint first, see fit.py).
    """
    if nproc < 2:
        raise ValueError(f"--gpus {nproc}: launching needs at least 2 processes")
    if device not in ("cpu", "auto", "cuda"):
        raise ValueError(f"--gpus {nproc} with --device {device}: each process uses "
                         "cuda:LOCAL_RANK; pass --device cuda (or cpu for CPU processes)")
    if device != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < nproc:
            fix = (f"pass --gpus {count}" if count > 1 else "train on one device without "
                   "--gpus, or add --device cpu to start CPU processes (gloo)")
            raise ValueError(f"--gpus {nproc} but {count} CUDA GPU(s) are visible to torch; "
                             f"{fix}")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    multicast_off()  # the workers inherit it
    args = torchrun.parse_args(["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
                                "--module", "fewstep.train", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if 0 < failure.exitcode < 256 else 1
        print(f"error: the training process of rank {rank} failed first (exit code "
              f"{failure.exitcode}); the other processes were stopped", file=sys.stderr)
        return code
    except SignalException as e:
        print(f"stopped by {e.sigval.name}", file=sys.stderr)
        return 130
    return 0
