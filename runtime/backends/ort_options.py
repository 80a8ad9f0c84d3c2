"""ONNX Runtime backend options: validated ``OrtConfig`` and the provider options.

``make_config`` checks the options a user passes to ``backends.load`` for one of the
``ort-*`` backends and fills in the defaults (threads, IO binding, CUDA graphs, the
Jetson memory settings); ``providers_for`` turns a config into the session's
``providers=`` list (CUDA EP and TensorRT EP options, the TensorRT EP's batch profile
from the graph I/O contract). The module docstring of ``ort.py`` says what each does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import jetson
from ..checks import whole_number
from ..meta import ModelMeta

OPTIONS: Final = {
    "ort-cpu": ("threads", "io_binding"),
    "ort-cuda": ("device_id", "cuda_graph", "gpu_mem_limit", "threads", "io_binding",
                 "cuda_options"),
    "ort-tensorrt": ("device_id", "fp16", "cache_dir", "workspace_size", "max_batch",
                     "opt_batch", "gpu_mem_limit", "threads", "io_binding"),
}
DEFAULT_TRT_MAX_BATCH: Final = 16


@dataclass(frozen=True)
class OrtConfig:
    """Resolved options of one graph (see the module docstring)."""

    backend: str
    threads: int | None = None
    io_binding: bool = False
    device_id: int = 0
    cuda_graph: bool = False
    gpu_mem_limit: int | None = None
    fp16: bool = False
    cache_dir: str = ""
    workspace_size: int | None = None
    max_batch: int | None = None
    opt_batch: int | None = None
    jetson: bool = False
    cuda_options: tuple[tuple[str, str], ...] = ()  # more CUDA EP options, as given


def _int_option(name: str, value: Any, low: int = 0) -> int:
    return whole_number(name, value, low)


def _bool_option(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def make_config(name: str, path: str, options: Mapping[str, Any],
                on_jetson: bool | None = None) -> OrtConfig:
    """Validate ``options`` for backend ``name`` and fill in the defaults."""
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(
            f"option(s) {', '.join(unknown)} not supported by backend {name!r}; "
            f"use {', '.join(OPTIONS[name])}"
        )
    o = dict(options)
    on_jetson = jetson.is_jetson() if on_jetson is None else on_jetson
    gpu = name != "ort-cpu"
    threads = o.get("threads")
    if threads is None and not gpu:
        threads = os.cpu_count() or 1
    limit = o.get("gpu_mem_limit")
    if limit is None and gpu and on_jetson:
        total = jetson.physical_memory_bytes()
        limit = total // 2 if total else None
    max_batch = opt_batch = None
    cache_dir = ""
    if name == "ort-tensorrt":
        max_batch = _int_option("max_batch", o.get("max_batch", DEFAULT_TRT_MAX_BATCH), 1)
        opt_batch = _int_option("opt_batch", o.get("opt_batch", max_batch), 1)
        if opt_batch > max_batch:
            raise ValueError(f"opt_batch={opt_batch} exceeds max_batch={max_batch}; "
                             "pass opt_batch <= max_batch")
        cache_dir = str(o.get("cache_dir") or Path(path).parent / ".fewstep-cache" / "ort-trt")
    extra = o.get("cuda_options") or {}
    if not isinstance(extra, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (str, int)) for k, v in extra.items()
    ):
        raise ValueError(f"cuda_options={extra!r} must map CUDA EP option names to values, "
                         "e.g. {'prefer_nhwc': '1'}")
    return OrtConfig(
        cuda_options=tuple(sorted((k, str(v)) for k, v in extra.items())),
        backend=name,
        threads=None if threads is None else _int_option("threads", threads, 1),
        io_binding=_bool_option("io_binding", o.get("io_binding", gpu)),
        device_id=_int_option("device_id", o.get("device_id", 0)),
        cuda_graph=name == "ort-cuda" and _bool_option("cuda_graph", o.get("cuda_graph", True)),
        gpu_mem_limit=None if limit is None else _int_option("gpu_mem_limit", limit, 1),
        fp16=_bool_option("fp16", o.get("fp16", False)),
        cache_dir=cache_dir,
        workspace_size=(None if o.get("workspace_size") is None
                        else _int_option("workspace_size", o["workspace_size"], 1)),
        max_batch=max_batch,
        opt_batch=opt_batch,
        jetson=on_jetson,
    )


def cuda_provider_options(config: OrtConfig, cuda_graph: bool) -> dict[str, str]:
    """CUDAExecutionProvider options (documented names; all values as strings)."""
    opts = {"device_id": str(config.device_id)}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    if config.jetson:
        opts["arena_extend_strategy"] = "kSameAsRequested"
        opts["cudnn_conv_algo_search"] = "HEURISTIC"
    if config.gpu_mem_limit is not None:
        opts["gpu_mem_limit"] = str(config.gpu_mem_limit)
    opts.update(dict(config.cuda_options))  # e.g. prefer_nhwc, cudnn_conv_algo_search
    return opts


def _profile(meta: ModelMeta, batch: int) -> str:
    return ",".join(f"{n}:" + "x".join(map(str, shape))
                    for n, shape in meta.io.shapes(batch).items())


def tensorrt_provider_options(meta: ModelMeta, config: OrtConfig) -> dict[str, str]:
    """TensorrtExecutionProvider options: caches, workspace, fp16, batch profile."""
    assert config.max_batch is not None and config.opt_batch is not None
    opts = {
        "device_id": str(config.device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": config.cache_dir,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": config.cache_dir,
        # Explicit profile for every (dynamic-batch) input: min 1, opt, max.
        "trt_profile_min_shapes": _profile(meta, 1),
        "trt_profile_opt_shapes": _profile(meta, config.opt_batch),
        "trt_profile_max_shapes": _profile(meta, config.max_batch),
    }
    if config.fp16 and meta.graph.precision == "fp32":
        opts["trt_fp16_enable"] = "1"
    if config.workspace_size is not None:
        opts["trt_max_workspace_size"] = str(config.workspace_size)
    return opts


def providers_for(meta: ModelMeta, config: OrtConfig,
                  cuda_graph: bool) -> list[tuple[str, dict[str, str]]]:
    """The ``providers=`` list of the InferenceSession, in priority order."""
    cpu: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})
    if config.backend == "ort-cpu":
        return [cpu]
    cuda = ("CUDAExecutionProvider", cuda_provider_options(config, cuda_graph))
    if config.backend == "ort-cuda":
        return [cuda, cpu]
    return [("TensorrtExecutionProvider", tensorrt_provider_options(meta, config)), cuda, cpu]
