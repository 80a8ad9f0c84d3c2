"""ONNX Runtime backend options: validated ``OrtConfig`` and the provider options.

``make_config`` checks the options a user passes to ``backends.load`` for one of the
``ort-*`` backends and fills in the defaults (threads, IO binding, CUDA graphs, the
Jetson memory settings); ``providers_for`` turns a config into the session's
``providers=`` list (CUDA EP and TensorRT EP options, the TensorRT EP's batch profile
from the graph I/O contract). The module docstring of ``ort.py`` says what each does.

Session options (every ``ort-*`` backend; the defaults are ONNX Runtime's own, except
the optimisation level, which fewstep has always set to ``all``):

* ``graph_optimization_level``: ``disable``, ``basic``, ``extended`` or ``all``.
* ``execution_mode``: ``sequential`` or ``parallel`` (parallel runs independent nodes
  on several threads; it is a CPU-side scheduler, the CUDA EP still runs one stream).
* ``optimized_cache`` (``ort-cpu``, ``ort-cuda``): False (default), True (the folder
  ``default_cache_dir()``) or a folder: the graph as ONNX Runtime optimised it is saved
  there once and later sessions load it with optimisations off (``ort_cache.py``).
  Not for ``ort-tensorrt``: ONNX Runtime cannot save a graph with compiled nodes, and
  the TensorRT EP has its own engine cache.
* ``warmup_batch``: None (default) or a batch size: run the graph once on zeros at that
  batch size when it is opened, so buffers, cuDNN's algorithm choice and the CUDA graph
  are made at load time instead of in the first call.

``cuda_options`` passes CUDA EP options through as given; ``cudnn_conv_algo_search``
among them is checked (``EXHAUSTIVE``, ONNX Runtime's default, ``HEURISTIC`` or
``DEFAULT``), since ONNX Runtime's own message for a bad value names neither.

An ORT-CUDA variant graph (``graph.target == "ort-cuda"``) on ONNX Runtime >= 1.20 gets
the CUDA EP option ``fuse_conv_bias=1`` unless ``cuda_options`` names it
(``fuse_conv_bias_default``): cuDNN's frontend then runs each NHWC convolution and its
bias as one fused kernel. On the H200 it took the default model's fp16 4-step sampler
from 3.007 to 2.741 ms (−9 %) in the lever run and from 2.845 to 2.496 ms in the bench
(``benchmarks/results/latency-2026-12-01-h200-fusebias/``). The portable NCHW graphs do
not get it: there cuDNN's frontend failed to initialise (fp16) or gave wrong images
(fp32) in the same runs. If a session with the default fails, the graph warns once and
runs without it (``ort.py``).
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

SESSION_OPTIONS: Final = ("graph_optimization_level", "execution_mode", "warmup_batch")
OPTIONS: Final = {
    "ort-cpu": ("threads", "io_binding", *SESSION_OPTIONS, "optimized_cache"),
    "ort-cuda": ("device_id", "cuda_graph", "gpu_mem_limit", "threads", "io_binding",
                 "cuda_options", *SESSION_OPTIONS, "optimized_cache"),
    "ort-tensorrt": ("device_id", "fp16", "cache_dir", "workspace_size", "max_batch",
                     "opt_batch", "gpu_mem_limit", "threads", "io_binding", *SESSION_OPTIONS),
}
DEFAULT_TRT_MAX_BATCH: Final = 16
OPTIMIZATION_LEVELS: Final = ("disable", "basic", "extended", "all")
EXECUTION_MODES: Final = ("sequential", "parallel")
CUDNN_CONV_ALGO_SEARCH: Final = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
CACHE_ENV: Final = "FEWSTEP_CACHE_DIR"  # overrides the user cache folder
FUSE_CONV_BIAS_SINCE: Final = (1, 20)  # the CUDA EP option fuse_conv_bias (cuDNN frontend)


def default_cache_dir() -> str:
    """``$FEWSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``;
    the optimised graphs go to its ``ort-optimized`` sub-folder."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fewstep")
    return os.path.join(root, "ort-optimized")


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
    graph_optimization_level: str = "all"
    execution_mode: str = "sequential"
    optimized_cache: str = ""  # the cache folder, or "" for no cache
    warmup_batch: int | None = None


def _int_option(name: str, value: Any, low: int = 0) -> int:
    return whole_number(name, value, low)


def _bool_option(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}; pass one "
                         "of those")
    return str(value)


def _cache_option(value: Any) -> str:
    if value is False or value is None:
        return ""
    if value is True:
        return default_cache_dir()
    if isinstance(value, (str, os.PathLike)) and str(value) and "\x00" not in str(value):
        return os.fspath(value)
    raise ValueError(f"optimized_cache={value!r} must be True, False or a folder path")


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
    if "cudnn_conv_algo_search" in extra:
        _choice("cuda_options['cudnn_conv_algo_search']", extra["cudnn_conv_algo_search"],
                CUDNN_CONV_ALGO_SEARCH)
    warmup = o.get("warmup_batch")
    if warmup is not None:
        warmup = _int_option("warmup_batch", warmup, 1)
        if max_batch is not None and warmup > max_batch:
            raise ValueError(f"warmup_batch={warmup} exceeds max_batch={max_batch}; pass "
                             "warmup_batch <= max_batch")
    return OrtConfig(
        graph_optimization_level=_choice("graph_optimization_level",
                                         o.get("graph_optimization_level", "all"),
                                         OPTIMIZATION_LEVELS),
        execution_mode=_choice("execution_mode", o.get("execution_mode", "sequential"),
                               EXECUTION_MODES),
        optimized_cache=_cache_option(o.get("optimized_cache", False)),
        warmup_batch=warmup,
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


def fuse_conv_bias_default(meta: ModelMeta, config: OrtConfig,
                           ort_version: tuple[int, ...]) -> bool:
    """Whether fewstep turns on the CUDA EP's ``fuse_conv_bias`` for this graph: an
    ORT-CUDA variant graph on ``ort-cuda``, ONNX Runtime >= 1.20, and ``cuda_options``
    does not say otherwise (see the module docstring)."""
    return (config.backend == "ort-cuda" and meta.graph.target == "ort-cuda"
            and ort_version >= FUSE_CONV_BIAS_SINCE
            and "fuse_conv_bias" not in dict(config.cuda_options))


def quick_start_options(ort_version: tuple[int, ...]) -> dict[str, str]:
    """CUDA EP options for a process that makes a few images and exits (``fewstep sample``
    by default): cuDNN picks convolution algorithms from its heuristics instead of timing
    every one at the first call, and a variant graph runs without the fused convolution +
    bias (whose engines would be searched too). On the H200, with the fp16 variant,
    `Pipeline.load` + first `generate` went from 11.1 s (the library's defaults, fused bias
    included) to 1.99 s, each later image 5 % slower
    (``benchmarks/results/first-image-2026-12-01-h200-quickstart/``, lever ``quick-start``)."""
    opts = {"cudnn_conv_algo_search": "HEURISTIC"}
    if ort_version >= FUSE_CONV_BIAS_SINCE:
        opts["fuse_conv_bias"] = "0"
    return opts


def cuda_provider_options(config: OrtConfig, cuda_graph: bool,
                          fuse_conv_bias: bool = False) -> dict[str, str]:
    """CUDAExecutionProvider options (documented names; all values as strings)."""
    opts = {"device_id": str(config.device_id)}
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    if fuse_conv_bias:
        opts["fuse_conv_bias"] = "1"
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


def providers_for(meta: ModelMeta, config: OrtConfig, cuda_graph: bool,
                  fuse_conv_bias: bool = False) -> list[tuple[str, dict[str, str]]]:
    """The ``providers=`` list of the InferenceSession, in priority order."""
    cpu: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})
    if config.backend == "ort-cpu":
        return [cpu]
    cuda = ("CUDAExecutionProvider", cuda_provider_options(config, cuda_graph, fuse_conv_bias))
    if config.backend == "ort-cuda":
        return [cuda, cpu]
    return [("TensorrtExecutionProvider", tensorrt_provider_options(meta, config)), cuda, cpu]
