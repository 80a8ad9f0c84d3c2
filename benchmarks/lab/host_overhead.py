"""The pipeline's own host time per ``generate``: a null sampler graph, any machine (lab).

    python benchmarks/lab/host_overhead.py [--model model.onnx] [--out host.json]

``Pipeline.generate(1, 4, guidance=2.0)`` (the bench's headline call) on a sampler graph
that does no work: it checks its feeds against the graph I/O contract and returns
preallocated uint8 images (a grey image, so the NaN check runs in full). What is left is
what fewstep adds on the host around a real graph call (argument checks, plan, noise,
feeds, the output checks); ONNX Runtime's own binding (upload, replay call, copy back)
is not in it. Also timed alone: ``noise.generation_noise`` of one sample and
``images.nonfinite_images`` of one image. p50 of ``--rounds`` rounds of ``--iters``
calls each, ``perf_counter``.

``--graph SAMPLER.onnx --backend ort-cuda`` (a GPU) decomposes the same call on a real
fused sampler graph instead, one layer at a time, p50 of interleaved rounds:

  replay      the bound graph launched on device buffers that already hold the inputs,
              and synchronised (what the bench calls the network)
  +upload     x copied from the host into its device buffer first (``update_inplace``)
  +download   and the uint8 images copied back to a numpy array (``OrtValue.numpy``)
  graph.run   ``OrtGraph.run``: feed checks, every input's upload (small ones skipped when
              unchanged), the launch and the copy back
  generate    ``Pipeline.generate(1, 4, guidance=2.0)``: arguments, plan, the noise of one
              sample, feeds, ``graph.run`` and the output checks

so ONNX Runtime's own copies (+upload, +download), the graph layer and the pipeline each
get their share of the bench's host overhead (generate - replay).

Host-side levers, predictions written before their measurement (this 2-core CPU machine):

=== ===================================================== ===============================
id  lever                                                 prediction
=== ===================================================== ===============================
H1  noise: reuse one Philox bit generator per thread and  -8..-10 µs a sample: the
    set its key and counter, instead of constructing one  constructor draws OS entropy
    per sample (the same stream)                          for a seed it then discards
H2  NaN check of uint8 images: compare a 64-byte prefix   -3..-8 µs a 32 x 32 image
    with the marker first, the whole image only when the
    prefix matches
H3  the two copies of a bound run through cudaMemcpy     +upload +download 65 -> 20-30 µs
    (cuda-python) on the OrtValues' device pointers,      on the H200 host: a cuda-python
    not ONNX Runtime's binding (``+upload cudart``,       call is a few µs, a small
    ``+download cudart``)                                 pageable copy 5-10 µs each way
H3b the same copies through libcuda's cuMemcpyHtoD/DtoH   15-25 µs: no cuda-python wrapper
    via ctypes (``+upload driver``, ``+download driver``)
H4  the pipeline keeps each request's checked, prepared   ``generate`` -15..-25 µs here
    form (plan, graph, labels, feeds) per its plain       (plan lookup, graph choice,
    arguments; a call with the same ones only draws the   labels, guidance checks); on the
    seed's noise and runs                                 H200 host -80..-130 µs
=== ===================================================== ===============================

Measured (``benchmarks/results/host-overhead-2026-12-01-cpu/``): H1 took one sample's
noise from 52–79 to 35–54 µs p50 over three alternating pairs (kept); H2 measured no gain
(6.7–7.8 → 7.1 µs) and was reverted, so the runtime has H1 only. H4: the null-graph
``generate`` went from 164–171 to 114–123 µs p50 (two alternating pairs, 7 rounds of
2000 calls): −41..−57 µs, more than predicted (the feeds it keeps were not in the
prediction); kept. H3/H3b need a GPU (``--graph``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import Pipeline, artifact, clitools, images, noise, runners
from fewstep.runtime.backends import Array, NetworkRun
from fewstep.runtime.fileio import check_writable_target, write_text
from fewstep.runtime.meta import ModelMeta


class NullSampler:
    """A sampler graph that returns grey images without running anything."""

    backend = "null"
    max_batch = None

    def __init__(self, meta: ModelMeta) -> None:
        self.meta, self.path = meta, "<null sampler>"
        c, h, w = meta.image_shape
        self._out: dict[int, Array] = {}
        self._shape = (h, w, c)

    def run(self, feeds: Mapping[str, Array]) -> Array:
        ins = self.meta.io.inputs
        if set(feeds) != set(ins):
            raise ValueError(f"feeds {sorted(feeds)} are not {sorted(ins)}")
        n = feeds["x"].shape[0]
        out = self._out.get(n)
        if out is None:
            out = self._out[n] = np.full((n, *self._shape), 128, np.uint8)
        return out

    def run_loop(self, x: Array, fixed: Mapping[str, Array],
                 per_step: Sequence[Mapping[str, Array]]) -> Array:
        raise NotImplementedError("a sampler graph has no run_loop")

    def network_run(self, feeds: Mapping[str, Array], launches: int = 1) -> NetworkRun:
        return NetworkRun(lambda: None, "nothing")


def _p50_us(call: Callable[[int], Any], iters: int, rounds: int) -> tuple[float, list[float]]:
    for i in range(min(iters, 200)):
        call(i)
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(iters):
            call(i)
        per_round.append((time.perf_counter() - t0) / iters * 1e6)
    return float(np.median(per_round)), per_round


def run(model: Path, iters: int, rounds: int) -> dict[str, Any]:
    art = artifact.Artifact.open(artifact.locate(model))
    sampler = next((g.meta for g in art.graphs
                    if g.meta is not None and g.meta.graph.kind == "sampler"), None)
    if sampler is None:
        raise ValueError(f"{model} has no fused sampler graph; export one with --fused sampler")
    pipe = Pipeline.from_graphs([NullSampler(sampler)])
    steps = sampler.graph.steps
    g = 2.0 if sampler.graph.guidance else None
    shape = sampler.sample_shape
    grey = np.full((1, *sampler.image_shape[1:], sampler.image_shape[0]), 128, np.uint8)
    rows = {}
    for name, call in (
        ("generate", lambda i: pipe.generate(1, steps, seed=i % 4, guidance=g)),
        ("generation_noise", lambda i: noise.generation_noise(i % 4, range(1), shape)),
        ("nonfinite_images", lambda i: images.nonfinite_images(grey)),
    ):
        p50, per_round = _p50_us(call, iters, rounds)
        rows[name] = {"p50_us": p50, "rounds_us": per_round}
    return {"model": str(model), "steps": steps, "guidance": g, "sample_shape": list(shape),
            "iters": iters, "rounds": rounds, "rows": rows}


Copy = Callable[[int, int, int], None]  # (destination, source, bytes)


def _copy_layers(name: str, copies: tuple[Copy, Copy] | None, graph: Any, buffers: Any,
                 x: Any) -> dict[str, Callable[[int], Any]]:
    """``+upload NAME`` and ``+download NAME``: x uploaded and the images copied back with
    ``copies`` (host→device, device→host) on the OrtValues' device pointers instead of
    ONNX Runtime's binding. ``run_with_iobinding`` synchronises its stream before it
    returns, and a copy from pageable memory returns when it is done, so the order is
    the binding's. The bytes are checked against ``OrtValue.numpy()`` once."""
    if copies is None:
        return {}
    h2d, d2h = copies
    dst_x, src_out = buffers.values["x"].data_ptr(), buffers.out.data_ptr()
    host_out = np.zeros(buffers.out.shape(), dtype=np.asarray(graph._host(buffers.out)).dtype)

    def upload(_: int) -> None:
        h2d(dst_x, x.ctypes.data, x.nbytes)
        graph._launch(buffers, 0)

    def download(_: int) -> None:
        upload(_)
        d2h(host_out.ctypes.data, src_out, host_out.nbytes)

    download(0)
    if not np.array_equal(host_out, np.asarray(graph._host(buffers.out))):
        raise RuntimeError(f"{name} copied other bytes than OrtValue.numpy()")
    return {f"+upload {name}": upload, f"+download {name}": download}


def _cudart_copies() -> tuple[Copy, Copy] | None:
    """cuda-python's ``cudaMemcpy`` (lever H3); None without cuda-python."""
    try:
        from fewstep.runtime.backends.cuda import cuda_check, import_cudart

        cudart = import_cudart()
    except ImportError:
        return None
    kinds = cudart.cudaMemcpyKind

    def copy(kind: Any) -> Copy:
        return lambda dst, src, n: cuda_check(cudart.cudaMemcpy(dst, src, n, kind),
                                              "cudaMemcpy")

    return copy(kinds.cudaMemcpyHostToDevice), copy(kinds.cudaMemcpyDeviceToHost)


def _driver_copies() -> tuple[Copy, Copy] | None:
    """libcuda's ``cuMemcpyHtoD``/``DtoH`` through ctypes, no cuda-python (lever H3b), in
    the context ONNX Runtime made current on this thread; None without one."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    ctx = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
        print("driver rows skipped: no current CUDA context on this thread", file=sys.stderr)
        return None
    h2d, d2h = lib.cuMemcpyHtoD_v2, lib.cuMemcpyDtoH_v2
    h2d.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    d2h.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]

    def checked(fn: Any, what: str) -> Copy:
        def copy(dst: int, src: int, n: int) -> None:
            if fn(dst, src, n) != 0:
                raise RuntimeError(f"{what} failed")
        return copy

    return checked(h2d, "cuMemcpyHtoD"), checked(d2h, "cuMemcpyDtoH")


def decompose(graph_path: Path, backend: str, iters: int, rounds: int) -> dict[str, Any]:
    """The layers of one ``generate`` on a real sampler graph (see the module docstring)."""
    from fewstep.runtime import backends

    graph = backends.load(str(graph_path), backend, io_binding=True)
    meta = graph.meta
    if meta.graph.kind != "sampler":
        raise ValueError(f"{graph_path.name} is a {meta.graph.kind} graph; pass a fused "
                         "sampler graph (model.sampler-4.onnx)")
    pipe = Pipeline.from_graphs([graph])
    steps = meta.graph.steps
    g = 2.0 if meta.graph.guidance else None
    unknown = set(meta.graph.inputs) - {"x", "label", "guidance"}
    if unknown:
        raise ValueError(f"decompose feeds x, label and guidance; this graph also takes "
                         f"{sorted(unknown)}")
    x, _ = noise.generation_noise(0, range(1), meta.sample_shape)
    feeds: dict[str, Any] = {"x": x, **runners.extra_feeds(graph, np.zeros(1, np.int64), g, 1)}
    pipe.generate(1, steps, seed=0, guidance=g)  # capture
    buffers = graph._allocate(1)
    for name, arr in graph._feeds(feeds, list(graph.inputs), 1).items():
        buffers.upload(name, arr)

    def replay(_: int) -> None:
        graph._launch(buffers, 0)

    def upload(_: int) -> None:
        buffers.values["x"].update_inplace(x)
        graph._launch(buffers, 0)

    def download(_: int) -> None:
        buffers.values["x"].update_inplace(x)
        graph._launch(buffers, 0)
        graph._host(buffers.out)

    layers: dict[str, Callable[[int], Any]] = {
        "replay": replay, "+upload": upload, "+download": download,
        **_copy_layers("cudart", _cudart_copies(), graph, buffers, x),
        **_copy_layers("driver", _driver_copies(), graph, buffers, x),
        "graph.run": lambda i: graph.run(feeds),
        "generate": lambda i: pipe.generate(1, steps, seed=i % 4, guidance=g),
        # the same with nothing kept from the call before (H4 off)
        "generate unkept": lambda i: (pipe._prepared.clear(),
                                      pipe.generate(1, steps, seed=i % 4, guidance=g)),
        "generation_noise": lambda i: noise.generation_noise(i % 4, range(1),
                                                             meta.sample_shape),
    }
    per_round: dict[str, list[float]] = {k: [] for k in layers}
    for call in layers.values():  # warm every layer first
        _p50_us(call, min(iters, 200), 1)
    for _ in range(rounds):
        for name, call in layers.items():
            per_round[name].append(_p50_us(call, iters, 1)[0])
    rows = {k: {"p50_us": float(np.median(v)), "rounds_us": v} for k, v in per_round.items()}
    base = rows["replay"]["p50_us"]
    shares = {k: rows[k]["p50_us"] - base for k in layers if k not in ("replay",
                                                                         "generation_noise")}
    return {"graph": str(graph_path), "backend": backend, "describe": graph.describe(),
            "steps": steps, "guidance": g, "iters": iters, "rounds": rounds, "rows": rows,
            "over_replay_us": shares,
            "host_overhead_pct_of_replay": 100.0 * shares["generate"] / base}


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--iters", type=clitools.positive_int, default=2000)
    p.add_argument("--rounds", type=clitools.positive_int, default=7)
    p.add_argument("--graph", type=Path, default=None,
                   help="a real fused sampler graph to decompose on --backend (a GPU)")
    p.add_argument("--backend", default="ort-cuda", choices=["ort-cuda", "ort-cpu"])
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    return p


def body(args: argparse.Namespace) -> int:
    from fewstep.runtime.pipeline import default_model_path

    out = check_writable_target(args.out) if args.out is not None else None
    if args.graph is not None:
        result = decompose(args.graph, args.backend, args.iters, args.rounds)
    else:
        result = run(args.model or default_model_path(), args.iters, args.rounds)
    if out is not None:
        from fewstep.benchmarks.envinfo import collect

        env = collect("host_overhead", " ".join(sys.argv))
        write_text(out, json.dumps({"environment": env, **result}, indent=2) + "\n")
    for name, row in result["rows"].items():
        spread = f"{min(row['rounds_us']):.1f}-{max(row['rounds_us']):.1f}"
        print(f"{name:<18} p50 {row['p50_us']:8.1f} µs per call (rounds {spread})")
    if "over_replay_us" in result:
        print("over replay: " + ", ".join(f"{k} {v:+.1f} µs"
                                          for k, v in result["over_replay_us"].items())
              + f"; generate - replay = {result['host_overhead_pct_of_replay']:.1f} % of replay")
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/lab/host_overhead.py"))
