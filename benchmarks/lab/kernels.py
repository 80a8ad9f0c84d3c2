"""Where one generation's GPU time goes: device kernels per generation, their time, by kind.

    python benchmarks/lab/kernels.py --model model.onnx --checkpoint CKPT --out kernels.json

Runs the same generation (batch 1, 4 steps by default, the model's guidance and spacing,
host noise in, uint8 image out) through fewstep's fused sampler graph on ONNX Runtime's
CUDA EP (with and without CUDA graphs), the PyTorch eager loop (fp32) and torch.compile of
the whole loop (reduce-overhead fp16 and fp32; default mode fp16, which has no CUDA
graphs), and for each:

* wall p50 of ``--iters`` calls outside the profiler (each call returns host memory, so it
  has synchronised);
* under ``torch.profiler`` (CUDA activity only, CUPTI), ``--profiled`` calls: device
  activities per generation (kernels, memcpy, memset), the sum of their durations
  ("busy"), and busy / wall;
* the kernels grouped by kind (convolution, matrix product, normalisation, softmax,
  elementwise/fused, copy, memset, other) and the top kernels by time.

The question it answers: "why is ONNX Runtime slower than torch.compile here":
how many kernels each launches for the same work, and how long they take. CUPTI reports
the kernels inside CUDA graph replays too; if a row shows none, the profiler could not
see into the graph and only its wall time counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import clitools
from fewstep.runtime.fileio import check_writable_target, write_text

KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("memcpy", re.compile(r"memcpy", re.I)),
    ("memset", re.compile(r"memset", re.I)),
    ("convolution", re.compile(r"conv|implicit|xmma|cudnn|fprop|winograd|sm\d+_.*(nhwc|nchw)",
                               re.I)),
    ("matrix product", re.compile(r"gemm|gemv|cublas|cutlass|matmul|mm_", re.I)),
    ("normalisation", re.compile(r"norm|welford|red_fused|per_fused", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("elementwise / fused", re.compile(r"elementwise|unary|binary|poi_fused|triton_poi|"
                                       r"sigmoid|silu|quickgelu|add|mul|expand|transpose|"
                                       r"concat|gather|slice|cast|clip|round", re.I)),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profile_calls(call: Callable[[int], Any], n: int) -> list[tuple[str, float]]:
    """(name, duration µs) of every device activity during ``n`` calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            call(i)
        torch.cuda.synchronize()
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, float(e.time_range.elapsed_us())))
    return out


def wall_ms(call: Callable[[int], Any], iters: int, warmup: int) -> list[float]:
    for i in range(warmup):
        call(i)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def summarize(name: str, wall: list[float], acts: list[tuple[str, float]], n: int,
              top: int = 12) -> dict[str, Any]:
    p50 = float(np.median(wall))
    busy_us = sum(d for _, d in acts) / n
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for k, d in acts:
        by_kind[kind_of(k)][0] += 1 / n
        by_kind[kind_of(k)][1] += d / n
        by_name[k][0] += 1 / n
        by_name[k][1] += d / n
    tops = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "path": name,
        "wall_p50_ms": p50,
        "wall_p10_ms": float(np.percentile(wall, 10)),
        "wall_p90_ms": float(np.percentile(wall, 90)),
        "device_activities_per_generation": len(acts) / n,
        "device_busy_ms_per_generation": busy_us / 1000.0,
        "busy_over_wall": (busy_us / 1000.0) / p50 if p50 > 0 else None,
        "mean_activity_us": busy_us / (len(acts) / n) if acts else None,
        "by_kind": {k: {"per_generation": round(v[0], 2), "us_per_generation": round(v[1], 1)}
                    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
        "top_kernels": [{"name": k[:160], "per_generation": round(v[0], 2),
                         "us_per_generation": round(v[1], 1)} for k, v in tops],
    }


def paths(model: Path, checkpoint: Path, steps: int, batch: int, modes: list[str],
          cuda_options: list[dict[str, str]], torch_paths: bool = True,
          ) -> list[tuple[str, Any]]:
    """(name, BenchPath) for every path this script profiles, built from the bench suite's
    own classes so that the work is exactly what `fewstep bench` times. ``cuda_options``:
    one more fewstep row (CUDA graphs on) per dict of CUDA EP options."""
    from fewstep.benchmarks import baselines as bl
    from fewstep.benchmarks.paths import FewstepPath, Workload, open_model
    from fewstep.runtime.sampling import default_spacing

    art = open_model(model)
    meta = art.meta
    src = bl.TorchSource(checkpoint)
    src.check_matches(art)
    if not src.cuda:
        raise ValueError("torch sees no CUDA GPU: this profile needs one")
    g = 2.0 if meta.conditional and art.meta.graph.guidance else None  # fewstep bench's default
    work = Workload(meta, default_spacing(meta), g)
    name = f"fewstep ort-cuda sampler {art.label} ({art.path.name})"
    out: list[tuple[str, Any]] = [
        (f"{name}, CUDA graph", FewstepPath(art, "ort-cuda", "sampler", work, {})),
        (f"{name}, no CUDA graph",
         FewstepPath(art, "ort-cuda", "sampler", work, {"cuda_graph": False})),
    ]
    for opts in cuda_options:
        said = " ".join(f"{k}={v}" for k, v in opts.items())
        out.append((f"{name}, CUDA graph, {said}",
                    FewstepPath(art, "ort-cuda", "sampler", work, {"cuda_options": opts})))
    if not torch_paths:
        return out
    out.append(("torch eager fp32", bl.TorchEagerPath(src, work, "fp32")))
    for mode in modes:
        for prec in ("fp16", "fp32") if mode == "reduce-overhead" else ("fp16",):
            out.append((f"torch.compile {mode} {prec}",
                        bl.TorchCompilePath(src, work, prec, mode, [steps], [batch])))
    return out


def run(model: Path, checkpoint: Path, steps: int, batch: int, iters: int, profiled: int,
        modes: list[str], cuda_options: list[dict[str, str]] | None = None,
        torch_paths: bool = True) -> list[dict[str, Any]]:
    rows = []
    for name, path in paths(model, checkpoint, steps, batch, modes, cuda_options or [],
                            torch_paths):
        why = path.unavailable() or path.supports(steps, batch)
        if why:
            rows.append({"path": name, "error": why})
            continue
        try:
            path.load(steps, batch)
            call = path.call(steps, batch)
            t0 = time.perf_counter()
            call(0)  # first call: compilation / graph capture, outside every number
            first_s = time.perf_counter() - t0
            wall = wall_ms(call, iters, warmup=10)
            acts = profile_calls(call, profiled)
            row = summarize(name, wall, acts, profiled)
            row["first_call_s"] = first_s
        except Exception as e:  # a path that fails is a row, not the end of the run
            row = {"path": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        finally:
            path.close()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}),
              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'path':<64} {'wall p50':>9} {'acts/gen':>9} {'busy ms':>8} {'busy/wall':>9} "
             f"{'µs/act':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<64} error: {r['error'][:70]}")
            continue
        lines.append(
            f"{r['path']:<64} {r['wall_p50_ms']:>9.3f} "
            f"{r['device_activities_per_generation']:>9.1f} "
            f"{r['device_busy_ms_per_generation']:>8.3f} {r['busy_over_wall'] or 0:>9.2f} "
            f"{r['mean_activity_us'] or 0:>7.2f}")
    for r in rows:
        if "by_kind" in r:
            kinds = ", ".join(f"{k} {v['per_generation']:g}×/{v['us_per_generation']:g} µs"
                              for k, v in r["by_kind"].items())
            lines.append(f"  {r['path']}: {kinds}")
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, required=True,
                   help="exported model.onnx with a fused sampler graph for --steps")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the checkpoint the model was exported from (torch paths)")
    p.add_argument("--steps", type=clitools.positive_int, default=4)
    p.add_argument("--batch", type=clitools.positive_int, default=1)
    p.add_argument("--iters", type=clitools.positive_int, default=200,
                   help="timed calls per path (wall p50)")
    p.add_argument("--profiled", type=clitools.positive_int, default=20,
                   help="calls per path under the profiler")
    p.add_argument("--modes", nargs="*", default=["reduce-overhead", "default"],
                   choices=["reduce-overhead", "default", "max-autotune"],
                   help="torch.compile modes to profile")
    p.add_argument("--cuda-options", action="append", default=[], metavar="K=V[,K=V]",
                   type=clitools.key_values,
                   help="one more fewstep row with these CUDA EP options (repeatable), e.g. "
                        "fuse_conv_bias=1")
    p.add_argument("--no-torch", action="store_true",
                   help="profile fewstep's rows only (no eager loop, no torch.compile)")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    return p


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    from fewstep.benchmarks.envinfo import collect

    rows = run(args.model, args.checkpoint, args.steps, args.batch, args.iters,
               args.profiled, list(args.modes), args.cuda_options, not args.no_torch)
    env = collect("kernels", " ".join(sys.argv))
    write_text(out, json.dumps({"environment": env, "steps": args.steps, "batch": args.batch,
                                "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/lab/kernels.py"))
