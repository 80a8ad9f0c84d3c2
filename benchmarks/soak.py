"""Soak run: many generations with one Pipeline, watching the process's memory.

    python -m fewstep.benchmarks.soak --model model.onnx --generations 10000 --out soak.json

Each generation uses a new seed. Resident memory (VmRSS) is sampled every
``--sample-every`` generations after a warm-up; the run fails (exit 1) when it grows
by more than ``--max-growth-mib`` from the first sample after warm-up to the end, or
when any generation raises. The JSON result records the RSS series, the timings and
the environment.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import __version__, clitools
from fewstep.runtime.fileio import check_writable_target, write_text


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def soak(model: str | None, generations: int, n: int, steps: int, backend: str,
         warmup: int, sample_every: int, max_growth_mib: float,
         progress: bool = True) -> dict[str, Any]:
    from fewstep.runtime import Pipeline

    pipe = Pipeline.load(model, backend=backend)
    series: list[tuple[int, float]] = []
    times: list[float] = []
    started = time.perf_counter()
    for i in range(generations):
        t0 = time.perf_counter()
        images = pipe.generate(n, steps, seed=i)
        times.append(time.perf_counter() - t0)
        if images.shape[0] != n or images.dtype != np.uint8:
            raise RuntimeError(f"generation {i} returned {images.dtype} {images.shape}")
        done = i + 1
        if done >= warmup and (done - warmup) % sample_every == 0:
            series.append((done, rss_mib()))
            if progress:
                print(f"  {done}/{generations} generations, RSS {series[-1][1]:.1f} MiB",
                      file=sys.stderr)
    if not series or series[-1][0] != generations:
        series.append((generations, rss_mib()))
    growth = series[-1][1] - series[0][1]
    ms = np.array(times[warmup:] or times) * 1000
    return {
        "model": pipe.source,
        "backend": pipe.backend,
        "graph_path": pipe.last_info.path if pipe.last_info else None,
        "generations": generations,
        "images_per_generation": n,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "ms_per_generation": {"p50": float(np.median(ms)), "p99": float(np.percentile(ms, 99)),
                              "max": float(ms.max())},
        "rss_mib_after_warmup": series[0][1],
        "rss_mib_end": series[-1][1],
        "rss_growth_mib": growth,
        "peak_rss_mib": peak_rss_mib(),
        "max_growth_mib": max_growth_mib,
        "passed": growth <= max_growth_mib,
        "rss_series": series,
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "processor": platform.processor(), "fewstep": __version__,
                        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", default=None, help="model.onnx (default: the shipped model)")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--generations", type=clitools.positive_int, default=10_000)
    p.add_argument("--n", type=clitools.positive_int, default=1, help="images per generation")
    p.add_argument("--steps", type=clitools.positive_int, default=2)
    p.add_argument("--warmup", type=clitools.positive_int, default=100)
    p.add_argument("--sample-every", type=clitools.positive_int, default=500)
    p.add_argument("--max-growth-mib", type=float, default=16.0)
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    return p


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    if args.warmup >= args.generations:
        raise ValueError(f"--warmup {args.warmup} must be below --generations "
                         f"{args.generations}")
    result = soak(args.model, args.generations, args.n, args.steps, args.backend,
                  args.warmup, args.sample_every, args.max_growth_mib)
    write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"{result['generations']} generations in {result['seconds']:.1f} s "
          f"({result['ms_per_generation']['p50']:.2f} ms p50); RSS "
          f"{result['rss_mib_after_warmup']:.1f} -> {result['rss_mib_end']:.1f} MiB "
          f"(growth {result['rss_growth_mib']:+.1f}, bound {args.max_growth_mib}); "
          f"peak {result['peak_rss_mib']:.1f} MiB", file=sys.stderr)
    print(out)
    if not result["passed"]:
        raise clitools.CheckFailed(
            f"RSS grew by {result['rss_growth_mib']:.1f} MiB > {args.max_growth_mib} MiB")
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python -m fewstep.benchmarks.soak"))
