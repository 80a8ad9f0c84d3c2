"""Load on fewstep's Triton Python model under the bundled Triton server: nothing lost.

    python -m fewstep.benchmarks.serve_load --clients 1 4 16 64 --requests 2 \\
        --time-limit 300 --out serve-load.json

Exports the model's Triton repository (KIND_CPU) into a temporary folder, starts the
Triton server bundled in nvidia-pytriton on free loopback ports (``fewstep.export.serve``)
with the repository's Python-backend model, and for each number of concurrent clients
runs that many threads, each with its own gRPC client sending ``--requests`` one-image
requests (distinct seed, label cycling through the classes, ``--steps`` DDIM steps).
A client sends nothing new once ``--time-limit`` seconds of its level have passed, and no
request waits longer than that. Reported per level: throughput (images/s over the
level's wall time), p50/p99 latency, the batch sizes Triton's dynamic batcher formed
(the model's statistics endpoint before and after), errors (the server answered with an
error), lost (no answer: deadline or connection), mismatched (an image that is not
``Pipeline.generate``'s for its seed and label, the Pipeline loaded on the graph the
model serves; every answer is compared after the level's clock stopped), requests not
sent for the time limit, and the resident memory of the server and of its Python stub
before and after. Exit 1 when anything was
lost, mismatched or answered with an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import clitools
from fewstep.runtime.fileio import check_writable_target, write_text

LOST_STATUS = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED")


@dataclass
class Outcome:
    """One request: what was asked, what came back."""

    client: int
    seed: int
    label: int
    latency_s: float | None = None
    image: np.ndarray | None = None
    error: str | None = None
    lost: bool = False
    sent: bool = True


@dataclass
class Level:
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


def _client_loop(url: str, model: str, client: int, plan: list[tuple[int, int]],
                 steps: int, deadline: float, out: list[Outcome]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    triton = grpcclient.InferenceServerClient(url)
    try:
        for seed, label in plan:
            outcome = Outcome(client, seed, label)
            out.append(outcome)
            left = deadline - time.monotonic()
            if left <= 0:
                outcome.sent = False
                continue
            inputs = []
            for name, value in (("seed", seed), ("label", label), ("steps", steps)):
                tensor = grpcclient.InferInput(name, [1, 1], "INT64")
                tensor.set_data_from_numpy(np.array([[value]], np.int64))
                inputs.append(tensor)
            start = time.perf_counter()
            try:
                result = triton.infer(model, inputs, client_timeout=max(left, 1.0))
                outcome.image = result.as_numpy("image")
                outcome.latency_s = time.perf_counter() - start
            except InferenceServerException as e:
                outcome.error = str(e)[:300]
                outcome.lost = any(s in str(e.status()) for s in LOST_STATUS)
    finally:
        triton.close()


def batch_counts(stats: dict[str, Any]) -> dict[int, int]:
    """Executions per batch size from a model's statistics (``/v2/models/M/stats``)."""
    counts: dict[int, int] = {}
    for model in stats.get("model_stats", []):
        for b in model.get("batch_stats", []):
            size = int(b.get("batch_size", 0))
            counts[size] = counts.get(size, 0) + int(b.get("compute_infer", {}).get("count", 0))
    return counts


def run_level(server: Any, model: str, clients: int, requests: int, steps: int,
              time_limit: float, seed_base: int, num_classes: int) -> tuple[Level, dict[int, int]]:
    """``clients`` threads x ``requests`` requests; the level and its batch sizes."""
    plans = [[(seed_base + c * 1000 + i, (c + i) % max(1, num_classes))
              for i in range(requests)] for c in range(clients)]
    before = json.loads(server.get(f"/v2/models/{model}/stats")[1] or b"{}")
    level = Level(clients)
    results: list[list[Outcome]] = [[] for _ in range(clients)]
    start = time.monotonic()
    deadline = start + time_limit
    threads = [threading.Thread(target=_client_loop, daemon=True,
                                args=(server.grpc_url, model, c, plans[c], steps, deadline,
                                      results[c]))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit + 30.0)
    level.wall_s = time.monotonic() - start
    for c, planned in enumerate(plans):
        got = results[c]
        level.outcomes += got
        for seed, label in planned[len(got):]:  # a client thread that never finished
            level.outcomes.append(Outcome(c, seed, label, error="client did not finish",
                                          lost=True))
    after = json.loads(server.get(f"/v2/models/{model}/stats")[1] or b"{}")
    b0, b1 = batch_counts(before), batch_counts(after)
    batches = {s: b1[s] - b0.get(s, 0) for s in sorted(b1) if b1[s] - b0.get(s, 0) > 0}
    return level, batches


def check_level(level: Level, pipe: Any, steps: int) -> int:
    """Compare every image with ``Pipeline.generate``; the number that differ."""
    mismatched = 0
    for o in level.outcomes:
        if o.image is None:
            continue
        want = pipe.generate(1, steps=steps, seed=o.seed, labels=[o.label])
        if o.image.shape != want.shape or not np.array_equal(o.image, want):
            mismatched += 1
    return mismatched


def summary(level: Level, batches: dict[int, int], mismatched: int,
            rss: dict[str, Any]) -> dict[str, Any]:
    ok = [o for o in level.outcomes if o.image is not None]
    lat = np.array([o.latency_s for o in ok], np.float64) * 1000
    sent = [o for o in level.outcomes if o.sent]
    return {
        "clients": level.clients,
        "requests_planned": len(level.outcomes),
        "requests_sent": len(sent),
        "not_sent_time_limit": len(level.outcomes) - len(sent),
        "answered_images": len(ok),
        "errors": sum(1 for o in sent if o.error is not None and not o.lost),
        "lost": sum(1 for o in sent if o.lost),
        "mismatched": mismatched,
        "wall_s": round(level.wall_s, 3),
        "throughput_img_s": round(len(ok) / level.wall_s, 3) if level.wall_s > 0 else None,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "batch_sizes": {str(k): v for k, v in batches.items()},
        "error_examples": sorted({o.error for o in sent if o.error})[:3],
        "rss_mib": rss,
    }


def rss(server: Any) -> dict[str, float | None]:
    from fewstep.export.serve import rss_mib

    stubs = [p for pids in server.stub_pids().values() for p in pids]
    return {"server": None if server.pid is None else rss_mib(server.pid),
            "stubs": sum(rss_mib(p) or 0.0 for p in stubs) if stubs else None}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(model_path: str | None, clients: list[int], requests: int, time_limit: float,
        out: Path, steps: int = 4, ready_timeout: float = 180.0) -> dict[str, Any]:
    from fewstep.benchmarks import envinfo
    from fewstep.export import serve, triton
    from fewstep.runtime.pipeline import Pipeline, default_model_path

    model = Path(model_path) if model_path else default_model_path()
    with tempfile.TemporaryDirectory(prefix="fewstep-serve-load-") as tmp:
        repo = Path(tmp) / "models"
        entries = triton.write_repository(model, repo, triton.TritonOptions(instance_kind="cpu"),
                                          log=lambda _msg: None)
        name = next(p.name for p in entries if p.name.endswith("_ddim"))
        # The reference: a Pipeline on the very graph the model serves (the artifact's
        # fused sampler, which Pipeline prefers at its step count, is another graph and
        # may round a pixel to the next uint8 level).
        graph = next((repo / name / "1").glob("*.onnx"))
        pipe = Pipeline.load(graph, backend="ort-cpu")
        with serve.serving(repo, [name], ready_timeout=ready_timeout) as server:
            levels = []
            rss_start = rss(server)
            for i, n in enumerate(clients):
                before = rss(server)
                level, batches = run_level(server, name, n, requests, steps, time_limit,
                                           (i + 1) * 1_000_000, pipe.meta.num_classes)
                after = rss(server)
                mismatched = check_level(level, pipe, steps)
                row = summary(level, batches, mismatched, {"before": before, "after": after})
                levels.append(row)
                print(f"{n:>3} clients: {row['answered_images']}/{row['requests_planned']} "
                      f"images, {row['throughput_img_s']} img/s, p50 {row['latency_ms_p50']} "
                      f"ms, p99 {row['latency_ms_p99']} ms, batches {row['batch_sizes']}, "
                      f"errors {row['errors']}, lost {row['lost']}, mismatched "
                      f"{row['mismatched']}", flush=True)
            rss_end = rss(server)
    result = {
        "what": "fewstep serve_load: the Triton Python-backend DDIM model under the "
                "Triton server bundled in nvidia-pytriton, CPU instance, loopback gRPC",
        "model": str(model),
        "triton_model": name,
        "steps": steps,
        "requests_per_client": requests,
        "time_limit_s": time_limit,
        "server": {"tritonserver": "2.51.0 (bundled)", "nvidia-pytriton": _version(
            "nvidia-pytriton"), "tritonclient": _version("tritonclient")},
        "rss_mib": {"start": rss_start, "end": rss_end},
        "levels": levels,
        "env": envinfo.collect(f"serve-load-{datetime.date.today()}",
                               " ".join(["python -m fewstep.benchmarks.serve_load",
                                         *sys.argv[1:]])),
    }
    write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", default=None, help="model.onnx (default: the shipped model)")
    p.add_argument("--clients", type=clitools.bounded_int(1, 256, "the most clients"),
                   nargs="+", default=[1, 4, 16, 64], help="concurrent clients per level")
    p.add_argument("--requests", type=clitools.bounded_int(1, 10_000, "the most requests"),
                   default=2, help="requests per client per level")
    p.add_argument("--steps", type=clitools.bounded_int(1, 1000, "num_train_timesteps"),
                   default=4, help="DDIM steps every request asks for")
    p.add_argument("--time-limit", type=clitools.bounded_int(1, 3600, "an hour"), default=300,
                   help="seconds per level: no request is sent or waited for after it")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    return p


def body(args: argparse.Namespace) -> int:
    check_writable_target(args.out)
    from fewstep.export import serve

    try:
        serve.find_bundle()
    except serve.BundleUnavailable as e:
        raise ValueError(str(e)) from None
    result = run(args.model, list(args.clients), args.requests, float(args.time_limit),
                 args.out, args.steps)
    bad = sum(r["errors"] + r["lost"] + r["mismatched"] for r in result["levels"])
    print(f"wrote {args.out}")
    if bad:
        print(f"check failed: {bad} request(s) lost, mismatched or answered with an error",
              file=sys.stderr)
        return clitools.EXIT_FAILED_CHECK
    return clitools.EXIT_OK


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python -m fewstep.benchmarks.serve_load"))
