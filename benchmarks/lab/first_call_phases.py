"""Where a new process's first image goes on ort-cuda: phase by phase (lab script, GPU).

    python benchmarks/lab/first_call_phases.py --graph model.sampler-4.onnx [--repeats 3]
        [--out phases.json]

Every configuration runs in fresh processes (``--repeats``, interleaved), each timing
with ``perf_counter`` from the first line of the child:

  numpy          ``import numpy``
  onnxruntime    ``import onnxruntime``
  raw context    cuInit + the primary context of device 0 (cuda-python; configuration
                 ``raw-ctx`` only): the driver's own share of the first CUDA work
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
CONFIGS = ("direct", "tiny-first", "raw-ctx", "cuda-graph", "eager-load", "profile")
PHASES = ("numpy", "onnxruntime", "raw_context", "tiny_create", "tiny_run", "create",
          "run1", "run2", "steady")


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
    for r in runs[:2]:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        by_op: dict[str, float] = {}
        for e in events:
            if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and lo <= e["ts"] <= hi):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
        per_run.append(by_op)
    out: dict[str, Any] = {"session_initialization_ms": init / 1e3,
                           "model_run_ms": [r["dur"] / 1e3 for r in runs[:3]]}
    if len(per_run) == 2:
        ops = set(per_run[0]) | set(per_run[1])
        excess = {op: per_run[0].get(op, 0.0) - per_run[1].get(op, 0.0) for op in ops}
        out["run1_excess_ms_by_op"] = dict(sorted(excess.items(), key=lambda kv: -kv[1])[:10])
        out["run1_ms_by_op"] = dict(sorted(per_run[0].items(), key=lambda kv: -kv[1])[:10])
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        t[name] = now - mark
        mark = now

    import numpy as np

    lap("numpy")
    import onnxruntime as ort

    lap("onnxruntime")
    config = spec["config"]
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
        rows[config]["n"] = len(ok)
        rows[config]["wall_s"] = statistics.median(r["wall_s"] for r in ok)
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    head = "| config | n | " + " | ".join(PHASES) + " | process wall |"
    lines = [head, "|" + " --- |" * (len(PHASES) + 3)]
    for config, row in rows.items():
        cells = [f"{row[p] * 1e3:.0f}" if p in row else "" for p in PHASES]
        lines.append(f"| {config} | {row['n']:.0f} | " + " | ".join(cells)
                     + f" | {row['wall_s'] * 1e3:.0f} |")
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
