"""Where a new process's first image goes on ort-cuda: phase by phase (lab script, GPU).

    python benchmarks/lab/first_call_phases.py --graph model.sampler-4.onnx [--repeats 3]
        [--out phases.json]

Every configuration runs in fresh processes (``--repeats``, interleaved), each timing
with ``perf_counter`` from the first line of the child:

  numpy          ``import numpy``
  onnxruntime    ``import onnxruntime``
  raw context    cuInit + the primary context of device 0 (cuda-python in ``raw-ctx``,
                 libcuda through ctypes in ``cudnn-first``): the driver's share
  cudnn load     ``cudnn-first``: cuDNN's libraries dlopened (``nvidia.cudnn``'s lib)
  overlap wait   ``overlap``: waiting for the thread (context + cuDNN) after the imports
  tiny create    an InferenceSession of a one-Identity graph on the CUDA EP (``tiny-*``
                 configurations): CUDA context, the EP, its allocator and handles
  tiny run       that graph's first run
  create         the InferenceSession of ``--graph`` (``fewstep sample``'s options: CUDA
                 EP, cuDNN HEURISTIC search, no fused bias, optimisation level all)
  run 1, run 2   its first and second run on host arrays (``cuda-graph``: bound inputs,
                 the first run does a regular run, the capture and a replay)
  steady         median of 20 more runs

``profile``: ONNX Runtime's session profiler on; the report splits run 1's node time by
operator type and subtracts run 2's, which is what each operator type's first use costs
(cuDNN engine choice, kernel loading), and gives the profiler's session-initialisation
time.

Configurations and the predictions written before the first run (one H200; the bench's
``Pipeline.load`` + first ``generate`` with these options was 1.46-1.76 s):

=========== ================================================ ==================================
config      what                                             prediction
=========== ================================================ ==================================
direct      create + run 1 + run 2, nothing first            create 0.4-0.8 s, run 1 0.4-0.9 s
tiny-first  the tiny session first, then ``direct``          tiny create 0.3-0.6 s (context,
                                                             handles); create -that much
raw-ctx     cuda-python's context first, then ``direct``     raw context 0.15-0.4 s
cuda-graph  ``direct`` with the CUDA graph (bound I/O)       run 1 +20..+80 ms (capture)
eager-load  ``direct`` with CUDA_MODULE_LOADING=EAGER        create +0.5..+3 s: lazy loading
                                                             matters
profile     ``direct`` with the session profiler             run 1's excess in Conv/NhwcConv
=========== ================================================ ==================================

Second round (2026-12-01, 13:35 UTC), predictions written before its run:

============ =============================================== ==================================
config       what                                            prediction
============ =============================================== ==================================
profile      per node of the costliest op (NhwcConv): how    each node pays its own first use
             many of the sampler's 172 convolutions pay a    (ORT's CUDA Conv keeps its cuDNN
             first-use cost over 1 ms                        choice per node): >= 150 of 172
                                                             over 1 ms, median 4-7 ms
direct with  ``--graph`` the fused step graph (43            run 1 0.2-0.35 s, against
a step graph convolutions: one step of the same network)     0.9-1.15 s for the sampler
cudnn-first  libcuda's context (ctypes) and cuDNN's          cudnn load 0.1-0.4 s; run 1
             libraries dlopened before ``create``            -that much
overlap      the same two in a thread started first, while   to run 1 -0.2..-0.45 s against
             numpy and onnxruntime import                    ``direct``
============ =============================================== ==================================

Measured (``benchmarks/results/first-image-2026-12-01-h200-onecall/``): every one of the
sampler's 172 convolutions paid 2.4-2.5 ms at run 1 (per node, as predicted; the median
was below the 4-7 ms predicted); the step graph's run 1 was 0.61 s (predicted 0.2-0.35 s:
about 0.45 s of run 1 is paid once whatever the graph) against 0.99 s; cudnn-first loaded
the libraries in 21 ms and saved nothing at run 1; overlap took 244 ms off "to run 1".

Third round, predictions written before its run:

=============== ============================================ ==================================
config          what                                         prediction
=============== ============================================ ==================================
overlap-handles ``overlap``'s thread, then cudnnCreate and   run 1 -0.1..-0.3 s against
                cublasCreate through ctypes, not joined:     ``overlap`` (the once-per-process
                it runs on while the session is created      share of run 1 moves into create)
=============== ============================================ ==================================
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULT = "PHASES "
CONFIGS = ("direct", "tiny-first", "raw-ctx", "cuda-graph", "eager-load", "profile",
           "cudnn-first", "overlap", "overlap-handles")
PHASES = ("numpy", "onnxruntime", "raw_context", "cudnn_load", "overlap_wait", "tiny_create",
          "tiny_run", "create", "run1", "run2", "steady")
LATER = ("run2", "steady")  # not in "to run 1": the child's time to its first result


# ---------------------------------------------------------------------------------
# The child: standard library only until it starts timing
# ---------------------------------------------------------------------------------


def _tiny_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _raw_context() -> None:
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]
    err, = driver.cuInit(0)
    assert int(err) == 0, err
    err, dev = driver.cuDeviceGet(0)
    assert int(err) == 0, err
    err, _ctx = driver.cuDevicePrimaryCtxRetain(dev)
    assert int(err) == 0, err


def _driver_context() -> None:
    """cuInit + the primary context of device 0 through libcuda itself (ctypes: nothing to
    import; ``fewstep.runtime.cuda_start``'s), which the runtime API, and so ONNX Runtime,
    then finds ready."""
    from fewstep.runtime import cuda_start

    if not cuda_start._retain_primary(0):
        raise RuntimeError("cuInit / cuDevicePrimaryCtxRetain through libcuda failed")


CUDNN_ORDER = ("libcudnn_graph", "libcudnn_ops", "libcudnn_heuristic", "libcudnn_cnn",
               "libcudnn_engines_precompiled", "libcudnn_engines_runtime_compiled",
               "libcudnn_adv", "libcudnn.")


def _cudnn_libraries() -> list[str]:
    """cuDNN 9's libraries from the nvidia-cudnn wheel, in dependency order: libcudnn
    dlopens the rest (engines, heuristics) only at its first convolution."""
    return _nvidia_libs("cudnn", CUDNN_ORDER)


def _load_cudnn() -> int:
    import ctypes

    libs = _cudnn_libraries()
    for lib in libs:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    return len(libs)


def _nvidia_libs(package: str, prefixes: tuple[str, ...]) -> list[str]:
    import importlib.util

    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ImportError:
        return []
    dirs = [Path(d) / "lib" for d in (spec.submodule_search_locations or [])] if spec else []
    found = [p for d in dirs for p in d.glob("lib*.so.*")]
    return [str(p) for prefix in prefixes for p in sorted(found) if p.name.startswith(prefix)]


def _handles() -> dict[str, float]:
    """cudnnCreate and cublasCreate_v2 through ctypes on the wheels' libraries: their
    one-time initialisation, which ONNX Runtime's first run otherwise pays."""
    import ctypes

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    _load_cudnn()
    cudnn = ctypes.CDLL("libcudnn.so.9", mode=ctypes.RTLD_GLOBAL)
    handle = ctypes.c_void_p()
    code = cudnn.cudnnCreate(ctypes.byref(handle))
    if code != 0:
        raise RuntimeError(f"cudnnCreate failed: {code}")
    seconds["cudnn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    libs = _nvidia_libs("cublas", ("libcublasLt", "libcublas."))
    for lib in libs:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    if libs:
        cublas = ctypes.CDLL(Path(libs[-1]).name, mode=ctypes.RTLD_GLOBAL)
        code = cublas.cublasCreate_v2(ctypes.byref(ctypes.c_void_p()))
        if code != 0:
            raise RuntimeError(f"cublasCreate_v2 failed: {code}")
    seconds["cublas"] = time.perf_counter() - t0
    return seconds


def _feeds(session: Any, np: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
             "tensor(float16)": np.float16}
    feeds = {}
    for arg in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in arg.shape]
        dtype = types[arg.type]
        if arg.name == "x":
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif arg.name == "guidance":
            feeds[arg.name] = np.full(shape, 2.0, dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype)
    return feeds


def _profile_split(path: str) -> dict[str, Any]:
    events = json.loads(Path(path).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                  key=lambda e: e["ts"])
    init = sum(e["dur"] for e in events
               if e.get("cat") == "Session" and e["name"] == "session_initialization")
    per_run: list[dict[str, float]] = []
    per_node: list[dict[str, tuple[str, float]]] = []
    for r in runs[:2]:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        by_op: dict[str, float] = {}
        nodes: dict[str, tuple[str, float]] = {}
        for e in events:
            if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and lo <= e["ts"] <= hi):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
                nodes[e["name"]] = (op, e["dur"] / 1e3)
        per_run.append(by_op)
        per_node.append(nodes)
    out: dict[str, Any] = {"session_initialization_ms": init / 1e3,
                           "model_run_ms": [r["dur"] / 1e3 for r in runs[:3]]}
    if len(per_run) == 2:
        ops = set(per_run[0]) | set(per_run[1])
        excess = {op: per_run[0].get(op, 0.0) - per_run[1].get(op, 0.0) for op in ops}
        out["run1_excess_ms_by_op"] = dict(sorted(excess.items(), key=lambda kv: -kv[1])[:10])
        out["run1_ms_by_op"] = dict(sorted(per_run[0].items(), key=lambda kv: -kv[1])[:10])
        # per node of the costliest op type: does every node pay its own first use (a
        # per-kernel choice: the node count matters) or only the first of each shape
        # (a process-wide cache: it does not)?
        top = max(excess, key=lambda op: excess[op])
        first, second = per_node
        extra = sorted(ms - second.get(name, ("", 0.0))[1]
                       for name, (op, ms) in first.items() if op == top)
        if extra:
            out["run1_excess_per_node"] = {
                "op": top, "nodes": len(extra),
                "median_ms": statistics.median(extra),
                "over_1ms": sum(x > 1.0 for x in extra),
                "over_0.1ms": sum(x > 0.1 for x in extra),
                "quartiles_ms": [extra[len(extra) // 4], extra[len(extra) // 2],
                                 extra[3 * len(extra) // 4], extra[-1]],
            }
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        t[name] = now - mark
        mark = now

    config = spec["config"]
    background = None
    handles: dict[str, Any] = {}
    if config == "overlap":  # context and cuDNN in a thread while the imports run
        import threading

        background = threading.Thread(target=lambda: (_driver_context(), _load_cudnn()))
        background.start()
    if config == "overlap-handles":  # and cuDNN's and cuBLAS's handles, kept to create
        import threading

        def warm() -> None:
            try:
                _driver_context()
                handles.update(_handles())
            except Exception as e:  # reported in the record, the run goes on
                handles["error"] = f"{type(e).__name__}: {e}"[:300]

        background = threading.Thread(target=warm)
        background.start()
    import numpy as np

    lap("numpy")
    import onnxruntime as ort

    lap("onnxruntime")
    if config == "cudnn-first":
        _driver_context()
        lap("raw_context")
        t["cudnn_libraries"] = _load_cudnn()
        lap("cudnn_load")
    if background is not None and config == "overlap":
        background.join()
        lap("overlap_wait")
    options = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "fuse_conv_bias": "0"}
    if config == "raw-ctx":
        _raw_context()
        lap("raw_context")
    if config == "tiny-first":
        tiny_bytes = _tiny_model()
        mark = time.perf_counter()  # building the bytes is not the session
        tiny = ort.InferenceSession(tiny_bytes, providers=[("CUDAExecutionProvider", options)])
        lap("tiny_create")
        tiny.run(None, {"x": np.ones((1, 4), np.float32)})
        lap("tiny_run")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if config == "profile":
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(spec["tmp"]) / f"ortprof-{os.getpid()}")
    if config == "cuda-graph":
        options["enable_cuda_graph"] = "1"
    session = ort.InferenceSession(spec["graph"], sess_options=so,
                                   providers=[("CUDAExecutionProvider", options),
                                              "CPUExecutionProvider"])
    lap("create")
    feeds = _feeds(session, np)
    mark = time.perf_counter()
    if config == "cuda-graph":
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
        binding = session.io_binding()
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        binding.bind_output(session.get_outputs()[0].name, "cuda", 0)

        def call() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        def call() -> None:
            session.run(None, feeds)
    call()
    lap("run1")
    call()
    lap("run2")
    steady = []
    for _ in range(20):
        s = time.perf_counter()
        call()
        steady.append(time.perf_counter() - s)
    t["steady"] = statistics.median(steady)
    result: dict[str, Any] = {"config": config, "seconds": t,
                              "providers": session.get_providers()}
    if background is not None:
        background.join()
        result["background"] = handles
    if config == "profile":
        result["profile"] = _profile_split(session.end_profiling())
    return result


# ---------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------


def spawn(config: str, graph: Path, tmp: Path, timeout: float = 180.0) -> dict[str, Any]:
    env = dict(os.environ)
    if config == "eager-load":
        env["CUDA_MODULE_LOADING"] = "EAGER"
    spec = json.dumps({"config": config, "graph": str(graph), "tmp": str(tmp)})
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True,
                          text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            rec: dict[str, Any] = json.loads(line[len(RESULT):])
            rec["wall_s"] = wall
            return rec
    tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return {"config": config, "error": tail[:300], "wall_s": wall}


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for config in CONFIGS:
        ok = [r for r in records if r["config"] == config and "seconds" in r]
        if not ok:
            continue
        rows[config] = {p: statistics.median(r["seconds"][p] for r in ok)
                        for p in PHASES if all(p in r["seconds"] for r in ok)}
        rows[config]["to_run1"] = statistics.median(
            sum(v for k, v in r["seconds"].items() if k in PHASES and k not in LATER)
            for r in ok)
        rows[config]["n"] = len(ok)
        rows[config]["wall_s"] = statistics.median(r["wall_s"] for r in ok)
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    head = "| config | n | " + " | ".join(PHASES) + " | to run 1 | process wall |"
    lines = [head, "|" + " --- |" * (len(PHASES) + 4)]
    for config, row in rows.items():
        cells = [f"{row[p] * 1e3:.0f}" if p in row else "" for p in PHASES]
        lines.append(f"| {config} | {row['n']:.0f} | " + " | ".join(cells)
                     + f" | {row['to_run1'] * 1e3:.0f} | {row['wall_s'] * 1e3:.0f} |")
    return "\n".join(lines) + "\n(milliseconds; medians of n fresh processes)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/lab/first_call_phases.py",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", type=Path, help="an ONNX graph (a fused sampler graph)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        os._exit(0)  # no teardown: nothing measured comes after
    if args.graph is None or not args.graph.is_file():
        p.error("--graph must name an ONNX file")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    import tempfile

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        spawn("direct", args.graph, Path(tmp))  # unrecorded: warms the OS file cache
        for _ in range(args.repeats):
            for config in args.configs:
                rec = spawn(config, args.graph, Path(tmp))
                if "error" in rec:
                    print(f"{config}: {rec['error']}", file=sys.stderr)
                records.append(rec)
    rows = summarize(records)
    if args.out is not None:
        args.out.write_text(json.dumps({"graph": str(args.graph), "rows": rows,
                                        "records": records}, indent=2) + "\n")
    profiles = [r["profile"] for r in records if "profile" in r]
    if profiles:
        print("profile (first process):", json.dumps(profiles[0], indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
