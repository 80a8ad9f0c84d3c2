"""GPU checks of the runtime: ONNX Runtime CUDA (IO binding + CUDA graphs) vs CPU images.

    python benchmarks/lab/gpu_checks.py MODEL.onnx [MODEL.onnx ...] --out checks.json

For every artifact and every graph path it has (fused sampler, fused step loop, denoiser
with the update on the host), generate the same images with ``ort-cpu`` and ``ort-cuda``
(same seed, labels, guidance) and report the max pixel difference, the PSNR, whether CUDA
graphs were captured, and a short latency figure. Exit 1 when a path's PSNR is below the
gate of its precision (fp32 40 dB, fp16 35 dB) — the parity gate of ``fewstep check``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import Pipeline, backends, clitools
from fewstep.runtime.artifact import Artifact
from fewstep.runtime.fileio import check_writable_target, write_text

GATES = {"fp32": 40.0, "fp16": 35.0}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def check_model(model: Path, n: int, steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for graph in Artifact.open(model).graphs:
        path, meta = graph.path, graph.meta
        assert meta is not None
        kind = meta.graph.kind
        if kind == "sampler" and meta.graph.steps != steps:
            continue
        pipes = {b: Pipeline.from_graphs([backends.load(str(path), b)]) for b in
                 ("ort-cpu", "ort-cuda")}
        images = {}
        for name, pipe in pipes.items():
            images[name] = pipe.generate(n, steps, seed=0)
            assert pipe.last_path is not None and pipe.last_path.startswith(kind[:4]), (
                pipe.last_path, kind)
        cuda = pipes["ort-cuda"]
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            cuda.generate(1, steps, seed=i)
            times.append((time.perf_counter() - t0) * 1000)
        info = cuda.describe()["graphs"][0].get("runtime", {})
        diff = np.abs(images["ort-cpu"].astype(int) - images["ort-cuda"].astype(int))
        psnr = _psnr(images["ort-cpu"], images["ort-cuda"])
        gate = GATES[meta.graph.precision]
        rows.append({
            "graph": path.name, "kind": kind, "precision": meta.graph.precision,
            "n": n, "steps": steps, "max_abs_pixel_diff": int(diff.max()),
            "mean_abs_pixel_diff": float(diff.mean()), "psnr_db": psnr, "gate_db": gate,
            "passed": psnr >= gate, "cuda_graph": bool(info.get("cuda_graph")),
            "providers": info.get("providers"), "batch1_ms_p50": float(np.median(times)),
            "batch1_ms_min": float(np.min(times)),
        })
        p = "inf" if math.isinf(psnr) else f"{psnr:.1f}"
        print(f"{path.name:<32} {kind:<9} {meta.graph.precision:<5} max|diff| {diff.max():>3} "
              f"PSNR {p:>6} dB (gate {gate:.0f}) cuda_graph={info.get('cuda_graph')} "
              f"batch-1 p50 {np.median(times):.3f} ms", file=sys.stderr)
    return rows


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("models", nargs="+", type=Path, help="exported model.onnx files")
    p.add_argument("--n", type=clitools.positive_int, default=16)
    p.add_argument("--steps", type=clitools.positive_int, default=4)
    p.add_argument("--repeats", type=clitools.positive_int, default=50)
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    return p


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    reason = backends.availability()["ort-cuda"]
    if reason is not None:
        raise ValueError(f"ort-cuda is not usable here: {reason}")
    import onnxruntime as ort

    rows = []
    for model in args.models:
        rows += check_model(model, args.n, args.steps, args.repeats)
    result = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    write_text(out, json.dumps(result, indent=2) + "\n")
    print(out)
    failed = [r for r in rows if not r["passed"]]
    if failed:
        raise clitools.CheckFailed(f"{len(failed)} path(s) below the parity gate")
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/lab/gpu_checks.py"))
