"""The environment a result was measured in: device, driver, libraries, clocks as found.

``collect()`` never fails: a missing tool or library leaves its field None (or names the
import error). ``gpu_snapshot()`` reads the clocks, power and temperature through
``nvidia-smi`` — taken at the start and at the end of a run, because clocks move with
load and temperature and the suite leaves them as it finds them (no -lgc, -ac, -pl).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import socket
import sys
from pathlib import Path
from typing import Any, Final

from fewstep.runtime import jetson

GPU_QUERY: Final = ("name", "driver_version", "compute_cap", "pstate", "clocks.sm",
                    "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.draw",
                    "power.limit", "temperature.gpu", "memory.used", "memory.total",
                    "utilization.gpu")
REPO: Final = Path(__file__).resolve().parent.parent


def _run(argv: list[str], timeout: float = 10.0) -> str | None:
    return jetson.run_command(argv, timeout)


def gpu_snapshot(run: Any = _run) -> list[dict[str, str]] | None:
    """One dict per GPU from ``nvidia-smi --query-gpu`` (values as printed), or None."""
    text = run(["nvidia-smi", f"--query-gpu={','.join(GPU_QUERY)}",
                "--format=csv,noheader,nounits"])
    if not text:
        return None
    gpus = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) == len(GPU_QUERY):
            gpus.append(dict(zip(GPU_QUERY, values, strict=True)))
    return gpus or None


def _smi_cuda_version(run: Any = _run) -> str | None:
    text = run(["nvidia-smi"])
    m = re.search(r"CUDA Version:\s*([0-9.]+)", text or "")
    return m.group(1) if m else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _git() -> dict[str, Any]:
    head = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    if not head:
        return {"commit": None, "dirty": None}
    status = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": head.strip(), "dirty": bool(status and status.strip())}


def _fewstep_version() -> str:
    from fewstep.runtime import __version__

    if __version__ != "0+unknown":
        return __version__
    try:
        text = (REPO / "pyproject.toml").read_text()
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return f"{m.group(1)} (source tree)" if m else __version__
    except OSError:
        return __version__


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"version": None, "error": str(e)}
    info: dict[str, Any] = {"version": ort.__version__,
                            "providers": list(ort.get_available_providers()),
                            "device": ort.get_device()}
    build = getattr(ort, "get_build_info", None)
    if callable(build):
        with contextlib.suppress(Exception):
            info["build_info"] = str(build())
    return info


def _torch() -> dict[str, Any]:
    """torch's version and CUDA settings; details only if this run imported torch
    (importing it just to describe it would cost seconds on a CPU machine)."""
    if "torch" not in sys.modules:
        from importlib import metadata

        try:
            version: str | None = metadata.version("torch")
        except metadata.PackageNotFoundError:
            version = None
        return {"version": version, "imported": False}
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__, "imported": True, "cuda": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()),
        "threads": torch.get_num_threads(),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_total_mib=props.total_memory // 2**20,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _tensorrt() -> dict[str, Any] | None:
    try:
        from fewstep.runtime.backends.tensorrt_engine import import_tensorrt

        trt, lean = import_tensorrt()
    except Exception as e:
        return {"version": None, "error": f"{type(e).__name__}: {e}"}
    return {"version": str(getattr(trt, "__version__", "unknown")), "lean": lean}


def collect(run_id: str, command: str, gpus_start: Any = None) -> dict[str, Any]:
    """Everything that decides what a number means, as JSON-ready values.

    ``gpus_start``: the ``gpu_snapshot()`` taken when the run began (else taken now).
    """
    from fewstep.runtime import backends

    board = jetson.detect()
    env: dict[str, Any] = {
        "run_id": run_id,
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity") else None},
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "onnx": _version("onnx"),
        "matplotlib": _version("matplotlib"),
        "onnxruntime": _onnxruntime(),
        "torch": _torch(),
        "tensorrt": _tensorrt(),
        "backends": backends.availability(),
        "fewstep": {"version": _fewstep_version(), **_git()},
        "nvidia_smi_cuda_version": _smi_cuda_version(),
        "gpus_start": gpus_start if gpus_start is not None else gpu_snapshot(),
        "gpus_end": None,
        "jetson": None if board is None else board.to_dict(),
        "env_vars": {k: os.environ[k] for k in (
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "ORT_TENSORRT_FP16_ENABLE",
            "TORCHINDUCTOR_CACHE_DIR", "PYTORCH_CUDA_ALLOC_CONF") if k in os.environ},
    }
    return env


def gpu_line(env: dict[str, Any]) -> str:
    """One line naming the device of a run, for report headers and summaries."""
    gpus = env.get("gpus_start") or []
    if gpus:
        g = gpus[0]
        return (f"{g.get('name')} (driver {g.get('driver_version')}, CUDA "
                f"{env.get('nvidia_smi_cuda_version')}, sm {g.get('compute_cap')})")
    if env.get("jetson"):
        return str(env["jetson"].get("model"))
    cpu = env.get("cpu") or {}
    return f"CPU only: {cpu.get('model')} ({cpu.get('usable_cores')} cores)"
