"""Levers of the ORT-CUDA variant, one at a time, batch 1, 4 steps, on a GPU (lab script).

    python benchmarks/lab/variant_levers.py --model fp16/model.onnx --out levers.json

MODEL is an artifact exported with ``--target ort-cuda`` (its variant lies beside it).
Every lever runs the fused 4-step sampler end to end (host noise in, uint8 image out)
through ``Pipeline.generate(1, 4)``, p50 of ``perf_counter`` times in interleaved rounds
(clock drift hits every lever alike), and its images are compared with the portable
graph's. The predictions were written before the first run:

=== ============================================================ ===========================
id  lever                                                        prediction (written first)
=== ============================================================ ===========================
P   portable sampler (LayerNorm-form GroupNorm, NCHW)            the reference
V1  the variant as exported                                      -30 %: 4.19 -> 2.75 ms in
                                                                 the bench (fp16)
V2  V1 with the CUDA EP's prefer_nhwc=1                          ~V1: the convolutions are
                                                                 NHWC already; what is left
                                                                 NCHW is attention
V3  V1 with the CUDA EP's fuse_conv_bias=1 (cuDNN's frontend     -4..-8 %: one bias-add
    runs convolution + bias as one fused graph)                  kernel fewer per NhwcConv
                                                                 (172 a generation, ~1.5 µs
                                                                 each), if cuDNN's fused
                                                                 engines are as fast
V4  V1 with cudnn_conv_algo_search=HEURISTIC (the time-to-first- +0..+10 %: the heuristic
    image lever: no exhaustive search at the first call)         can pick slower engines
=== ============================================================ ===========================

A layout clean-up after ONNX Runtime's UNet fusions (removing the no-op Casts the
NhwcConv fusion adds and sinking Transposes below residual Adds and skip Concats: 66 ->
22 Transposes and 54 -> 19 Casts a step in the fp16 graph) was lever V0 -> V1 of the
first run, predicted -7..-16 %; it measured 2.808 -> 2.864 ms (no gain: ONNX Runtime's
session optimisers already remove them) and was reverted, so this script no longer
builds it (``benchmarks/results/latency-2026-12-01-h200-ortcuda/levers-fp16.json``).

It also times the host-side noise of one 64 x 64 sample (``noise.generation_noise``), the
part of the host overhead every path shares.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import Pipeline, artifact, backends, clitools, noise
from fewstep.runtime.fileio import check_writable_target, write_text


def _pipe(path: Path, **options: Any) -> Pipeline:
    return Pipeline.from_graphs([backends.load(str(path), "ort-cuda", **options)])


def _p50(pipe: Pipeline, iters: int) -> float:
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        pipe.generate(1, 4, seed=i % 4, guidance=2.0)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def run(model: Path, iters: int, rounds: int = 5) -> dict[str, Any]:
    variant = artifact.variant_path(model, "ort-cuda")
    v_sampler = artifact.graph_path(variant, "sampler", 4)
    levers: list[tuple[str, str, Any]] = [
        ("P", "portable sampler",
         lambda: _pipe(artifact.graph_path(model, "sampler", 4))),
        ("V1", "variant as exported", lambda: _pipe(v_sampler)),
        ("V2", "V1 + prefer_nhwc=1",
         lambda: _pipe(v_sampler, cuda_options={"prefer_nhwc": "1"})),
        ("V3", "V1 + fuse_conv_bias=1",
         lambda: _pipe(v_sampler, cuda_options={"fuse_conv_bias": "1"})),
        ("V4", "V1 + cudnn_conv_algo_search=HEURISTIC",
         lambda: _pipe(v_sampler, cuda_options={"cudnn_conv_algo_search": "HEURISTIC"})),
    ]
    pipes: dict[str, Pipeline] = {}
    rows: dict[str, dict[str, Any]] = {}
    for lid, name, make in levers:
        rows[lid] = {"id": lid, "lever": name, "p50_rounds_ms": []}
        try:
            pipes[lid] = make()
            _p50(pipes[lid], 30)  # warm-up and CUDA graph capture
        except Exception as e:  # a lever ONNX Runtime refuses is a row saying so
            rows[lid]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    for _ in range(rounds):
        for lid, pipe in pipes.items():
            rows[lid]["p50_rounds_ms"].append(_p50(pipe, max(1, iters // rounds)))
    ref = pipes["P"].generate(8, 4, seed=123, guidance=2.0) if "P" in pipes else None
    for lid, pipe in pipes.items():
        row = rows[lid]
        row["p50_ms"] = float(np.median(row["p50_rounds_ms"]))
        if ref is not None:
            img = pipe.generate(8, 4, seed=123, guidance=2.0)
            d = np.abs(img.astype(np.int16) - ref.astype(np.int16))
            row["max_diff_vs_P"] = int(d.max())
            row["share_diff_gt1_vs_P"] = float((d > 1).mean())
    shape = (3, 64, 64)
    reps = []
    for i in range(200):
        t0 = time.perf_counter()
        noise.generation_noise(i, range(1), shape)
        reps.append((time.perf_counter() - t0) * 1e6)
    host = _host_profile(pipes["V1"]) if "V1" in pipes else None
    return {"rows": list(rows.values()), "host_profile_V1": host,
            "host_noise_us_p50": float(np.median(reps)),
            "host_noise_what": f"noise.generation_noise of one {shape} sample, 200 calls"}


def _host_profile(pipe: Pipeline, calls: int = 2000, top: int = 18) -> dict[str, Any]:
    """Where ``Pipeline.generate(1, 4)``'s host time goes: cProfile over ``calls`` calls,
    the functions with the most own time (µs per call). The profiler's own cost inflates
    every row alike; the GPU wait is in whichever call synchronises."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        pipe.generate(1, 4, seed=i % 4, guidance=2.0)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})",
                     "calls_per_generate": ncalls / calls,
                     "own_us_per_generate": tottime / calls * 1e6,
                     "cumulative_us_per_generate": cumtime / calls * 1e6})
    rows.sort(key=lambda r: -r["own_us_per_generate"])
    return {"calls": calls, "top_own_time": rows[:top]}


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, required=True,
                   help="model.onnx exported with --target ort-cuda (4-step sampler)")
    p.add_argument("--iters", type=clitools.positive_int, default=500)
    p.add_argument("--out", type=Path, required=True)
    return p


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    import onnxruntime as ort

    from fewstep.benchmarks.envinfo import collect

    result = run(args.model, args.iters)
    env = collect("variant_levers", " ".join(sys.argv))
    write_text(out, json.dumps({"environment": env, "onnxruntime": ort.__version__,
                                "steps": 4, "batch": 1, **result}, indent=2))
    print(f"host noise (one 3x64x64 sample): {result['host_noise_us_p50']:.1f} us")
    if result["host_profile_V1"]:
        print("host profile of V1 (cProfile, own µs per generate):")
        for r in result["host_profile_V1"]["top_own_time"]:
            print(f"  {r['own_us_per_generate']:8.1f} {r['calls_per_generate']:6.1f}x "
                  f"{r['function'][:90]}")
    print(f"{'id':<3} {'lever':<40} {'p50 ms':>8} {'max diff':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['id']:<3} {r['lever']:<40} error: {r['error'][:60]}")
        else:
            print(f"{r['id']:<3} {r['lever']:<40} {r['p50_ms']:>8.3f} "
                  f"{r.get('max_diff_vs_P', '-'):>9}")
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/lab/variant_levers.py"))
