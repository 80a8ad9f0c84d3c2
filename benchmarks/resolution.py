"""Latency against resolution: one preset at several image sizes, every path, same run.

For each --sizes entry a model of --preset at that size is made with seeded random-init
weights (latency does not depend on what the weights learned), saved as a fewstep
training checkpoint, exported (denoiser, fused step graph, fused sampler for each --steps;
the parity gate runs; on ort-cuda also the ORT-CUDA variant, gated on the CUDA provider,
and timed instead of the portable graphs unless --portable) in parallel worker processes,
and then timed one size after the
other by the latency suite in this process (``fewstep bench`` with the checkpoint as
source: fewstep's paths and the torch-eager / torch-compile baselines on the same weights
and noise). --time-budget bounds the whole run: each size's bench gets an equal share of
the time left when it starts (what a fast size leaves over goes to the larger ones), and
configurations not started within it are rows saying so. OUT/pxNNN/ holds each size's
bench folder (results.jsonl, report.md, plots, export.log); OUT/resolution.jsonl (line 1
the run record, then one row per size x batch x path) and OUT/resolution.md (a table per
path, and where fewstep wins and loses) join them. --render OUT re-draws resolution.md
from OUT/resolution.jsonl.

Figures of a row: p50_ms and images_per_s from the bench row; vs_torch_compile and
vs_torch_eager, its p50 over the fastest torch-compile / torch-eager row (any precision)
of the same size, batch and steps (the row named in torch_compile_ref / torch_eager_ref);
floor_fraction, the roofline fraction (``roofline.py``: the floor of one step, max of
FLOPs / matrix rate and bytes / copy bandwidth at this run's measured ceilings, over the
measured time per step); kernels_per_step (nodes of the timed denoiser graph, Constant
nodes left out), launch_us (the measured device time of one tiny kernel: replayed in a
CUDA graph on a GPU, one ONNX Runtime node on the CPU), launch_floor_ms = kernels x
launch_us / 1000 and launch_fraction = launch floor / time per step.

The ``bound`` rule. ``scaling`` is the share of added work that shows up as added time:
between a row and the next larger batch measured for the same size and path (for the
largest batch, the next smaller one), scaling = (t2 / t1 - 1) / (w2 / w1 - 1) with t the
time per step and w the FLOPs per step (the batch where FLOPs were not counted). A row is
**compute-bound** when scaling >= 0.5: time follows the work, so the kernels' arithmetic
and memory traffic set it. It is **launch-bound** when scaling < 0.5: extra images are
nearly free, so the time goes into the fixed cost of launching and running the step's
kernels (on the host: Python and dispatch for eager PyTorch; on the device: a few
microseconds a kernel even inside a CUDA graph), and the floor and launch fractions show
how far each floor is. Except: a GPU path replayed from a CUDA graph (fewstep's, or
torch.compile's) whose launch floor is under 5 % of its step (``launch_fraction`` <
``LAUNCH_SHARE``) is **under-occupied**: extra images are nearly free, but launches do
not explain the time, so some kernels leave most of the GPU idle (too few thread blocks
for its SMs). The first 256 px run was that case: 12 GroupNorms a step ran as a
LayerNormalization over 4 rows, 4 thread blocks on 132 SMs, 77 % of the busy time
(``benchmarks/results/resolution-2026-12-01-h200-256/``), where the launch floor was
2–3 % of the step. With a single batch measured, a row is launch-bound when the
launch floor is at least the roofline floor, else compute-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from fewstep.runtime import backends, clitools
from fewstep.runtime.fileio import write_text

from .resolution_report import (
    LAUNCH_SHARE,
    REPORT,
    RESULTS,
    SCALING_THRESHOLD,
    add_bounds,
    add_ratios,
    new_row,
    read_results,
    render,
    summary_table,
    write_results,
)

DEFAULT_SIZES: Final = (32, 64, 128, 256)
DEFAULT_BATCHES: Final = (1, 4, 16, 64)
TORCH_BASELINES: Final = ("torch-eager", "torch-compile", "ort-steps")
LAUNCH_KERNELS: Final = 256  # tiny kernels timed for launch_us

def folder_name(size: int) -> str:
    return f"px{size:03d}"


def build_parser(prog: str) -> argparse.ArgumentParser:
    from fewstep.train.config import PRESETS

    p = clitools.parser(prog, __doc__)
    p.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES), metavar="PX",
                   help="image sizes (height = width) in pixels")
    p.add_argument("--preset", default="small",
                   help=f"UNet preset of every model: {' '.join(PRESETS)}")
    p.add_argument("--batch", nargs="+", type=int, default=list(DEFAULT_BATCHES),
                   metavar="N", help="batch sizes")
    p.add_argument("--steps", nargs="+", type=int, default=[4], metavar="N",
                   help="step counts (a fused sampler graph is exported for each)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="fewstep backends (default: ort-cuda where ONNX Runtime's CUDA "
                        "provider is available, else ort-cpu)")
    p.add_argument("--graphs", nargs="+", default=["sampler"], metavar="KIND",
                   help="graph kinds fewstep is timed with: denoiser step sampler (all "
                        "three are exported)")
    p.add_argument("--portable", action="store_true",
                   help="on ort-cuda, export and time the portable graphs only (default: "
                        "also the ORT-CUDA variant, fewstep export --target ort-cuda, which "
                        "is what Pipeline.load runs there; only the variant is then timed "
                        "on ort-cuda)")
    p.add_argument("--baselines", nargs="*", default=["torch-eager", "torch-compile"],
                   metavar="NAME", help=f"{' '.join(TORCH_BASELINES)}; none when empty")
    p.add_argument("--precisions", nargs="+", default=["fp32"], metavar="P",
                   help="precisions fewstep's graphs are exported and timed at (fp32 fp16; "
                        "each is one more export per size and one more row per batch)")
    p.add_argument("--compile-precisions", nargs="+", default=["fp16"], metavar="P",
                   help="precisions torch.compile is measured at on a GPU (fp16 fp32; each "
                        "costs a compile per size and batch); the CPU has fp32 only")
    p.add_argument("--guidance", action="store_true",
                   help="export with classifier-free guidance inside the graphs (scale 2.0; "
                        "the UNet then runs on a doubled batch every step)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init weights")
    p.add_argument("--time-budget", type=float, default=450.0, metavar="S",
                   help="seconds of the whole run, export included: each size's bench gets "
                        "an equal share of what is left when it starts; configurations not "
                        "started within it are skipped (rows say so)")
    p.add_argument("--compile-budget", type=float, default=90.0, metavar="S",
                   help="seconds of torch.compile first calls per size after which compile "
                        "rows are skipped")
    p.add_argument("--compile-margin", type=float, default=20.0, metavar="S",
                   help="no torch.compile is started with fewer seconds of the size's "
                        "budget left")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per configuration")
    p.add_argument("--iters", type=int, default=10, help="least timed calls per configuration")
    p.add_argument("--target-seconds", type=float, default=0.3,
                   help="time spent timing one configuration")
    p.add_argument("--max-config-seconds", type=float, default=2.0,
                   help="slow calls get fewer than --iters iterations beyond this")
    p.add_argument("--workers", type=int, default=None,
                   help="export worker processes (default: one per size, at most the "
                        "number of CPU cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of ONNX Runtime CPU in the bench (default: all)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU torch baselines (default: torch's)")
    p.add_argument("--no-check", action="store_true",
                   help="export without the parity gate (faster; the bench's max-error "
                        "column still compares every path with PyTorch)")
    p.add_argument("--check-n", type=int, default=2,
                   help="images the export's parity gate generates per graph")
    p.add_argument("--quick-ceilings", action="store_true",
                   help="smaller matrix products and copies for the roofline's ceilings")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots in the bench folders")
    p.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="keep the checkpoints and exported models here (default: a "
                        "temporary folder, removed at the end)")
    p.add_argument("--out", type=Path, default=Path("runs/resolution"),
                   help="output folder (created): resolution.jsonl, resolution.md, pxNNN/")
    p.add_argument("--render", type=Path, default=None, metavar="OUT",
                   help="only re-write OUT/resolution.md from OUT/resolution.jsonl")
    return p


# ---------------------------------------------------------------------------------
# Arguments (one-line errors: ValueError → exit 2)
# ---------------------------------------------------------------------------------


def _positive(flag: str, values: Sequence[int]) -> tuple[int, ...]:
    for v in values:
        if v < 1:
            raise ValueError(f"{flag} {v} must be a whole number >= 1")
    return tuple(dict.fromkeys(values))


def _choices(flag: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            raise ValueError(f"{flag} {v!r} is unknown; use one or more of {' '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """The validated settings of a run (a ValueError names the value and the fix)."""
    from fewstep.train.config import PRESETS, preset

    from .paths import FEWSTEP_BACKENDS, GRAPH_KINDS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is unknown; use one of "
                         f"{' '.join(PRESETS)}")
    levels = len(PRESETS[args.preset].channel_mults)
    div = 2 ** (levels - 1)
    sizes = _positive("--sizes", args.sizes)
    for s in sizes:
        if s % div:
            raise ValueError(f"--sizes {s} is not divisible by {div} (the {args.preset} "
                             f"preset halves the image {clitools.plural(levels - 1, 'time')})"
                             f"; pass multiples of {div}, e.g. {max(div, s - s % div)}")
        try:
            preset(args.preset, image_size=s)
        except ValueError as e:
            raise ValueError(f"--sizes {s}: {e}") from None
    batches = _positive("--batch", args.batch)
    steps = _positive("--steps", args.steps)
    for s in steps:
        if s > 1000:
            raise ValueError(f"--steps {s} exceeds num_train_timesteps=1000 of the models; "
                             "pass --steps <= 1000")
    avail = backends.availability()
    default_backend = "ort-cuda" if avail.get("ort-cuda") is None else "ort-cpu"
    chosen = _choices("--backends", args.backends or [default_backend], FEWSTEP_BACKENDS)
    graphs = _choices("--graphs", args.graphs, GRAPH_KINDS)
    baselines = _choices("--baselines", args.baselines, TORCH_BASELINES)
    precisions = _choices("--compile-precisions", args.compile_precisions, ("fp16", "fp32"))
    exports = _choices("--precisions", args.precisions, ("fp32", "fp16"))
    for flag, value, low in (("--time-budget", args.time_budget, 1e-9),
                             ("--compile-budget", args.compile_budget, 0.0),
                             ("--compile-margin", args.compile_margin, 0.0),
                             ("--target-seconds", args.target_seconds, 1e-9),
                             ("--max-config-seconds", args.max_config_seconds, 1e-9)):
        if not value >= low:
            raise ValueError(f"{flag} {value} must be {'>= 0' if low == 0 else '> 0'} seconds")
    for flag, value, low in (("--warmup", args.warmup, 0), ("--iters", args.iters, 1),
                             ("--seed", args.seed, 0), ("--check-n", args.check_n, 1)):
        if value < low:
            raise ValueError(f"{flag} {value} must be >= {low}")
    for flag, value in (("--workers", args.workers), ("--threads", args.threads),
                        ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    _writable_folder(args.out, "--out")
    if args.models is not None:
        _writable_folder(args.models, "--models")
    notes = []
    if args.backends is None and avail.get("ort-cuda") is not None:
        notes.append(f"fewstep ran on ort-cpu: ort-cuda is not available here "
                     f"({avail['ort-cuda']}); pass --backends to choose")
    variants = ("ort-cuda",) if "ort-cuda" in chosen and not args.portable else ()
    return dict(sizes=sizes, batches=batches, steps=steps, backends=chosen, graphs=graphs,
                baselines=baselines, compile_precisions=precisions, variants=variants,
                precisions=exports, notes=notes)


def _writable_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {flag} {str(folder)!r} ({e.strerror}); pass a "
                         "writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(folder)!r} is not writable; pass a writable folder")


# ---------------------------------------------------------------------------------
# A model per size: checkpoint + export (worker processes)
# ---------------------------------------------------------------------------------


def make_checkpoint(path: Path, preset_name: str, size: int, seed: int) -> Path:
    """A class-conditional UNet of ``preset_name`` at ``size`` px with seeded random-init
    weights, saved by the project's checkpoint code as ``fewstep train`` would save it."""
    import dataclasses

    import torch

    from fewstep.runtime import __version__
    from fewstep.runtime.meta import ModelMeta, Schedule
    from fewstep.train import checkpoint as ckpt_io
    from fewstep.train.config import TrainConfig
    from fewstep.train.data import LANDSCAPE_CLASSES
    from fewstep.train.unet import UNet, preset

    classes = len(LANDSCAPE_CLASSES)
    config = preset(preset_name, image_size=size, num_classes=classes)
    torch.manual_seed(seed)
    ema = {k: v.detach().clone() for k, v in UNet(config).state_dict().items()}
    tc = TrainConfig(image_size=size, preset=preset_name, seed=seed)
    meta = ModelMeta.build(
        prediction_type=tc.prediction_type,
        schedule=Schedule(beta_schedule=tc.beta_schedule,
                          num_train_timesteps=tc.num_train_timesteps),
        channels=3, height=size, width=size, num_classes=classes,
        class_names=LANDSCAPE_CLASSES,
        train_config={**dataclasses.asdict(tc), "world_size": 1},
        source_hash=ckpt_io.weights_hash(ema), fewstep_version=__version__,
    )
    return ckpt_io.save(path, ckpt_io.Checkpoint(meta=meta, unet_config=config, ema=ema))


def prepare(size: int, preset_name: str, seed: int, steps: tuple[int, ...], guidance: bool,
            folder: str, log: str, check: bool, check_n: int, threads: int,
            variants: tuple[str, ...] = (), precisions: tuple[str, ...] = ("fp32",)
            ) -> dict[str, Any]:
    """Checkpoint + export of one size (run in a worker process), one artifact per
    precision (``model.onnx``, or ``<precision>/model.onnx`` for more than one). Never
    raises: a failure is the returned dict's ``error``."""
    started = time.perf_counter()
    info: dict[str, Any] = {"size": size, "error": None}
    try:
        with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stderr(f):
            import torch

            torch.set_num_threads(threads)
            from fewstep.export import api, onnx_export
            from fewstep.train import checkpoint as ckpt_io

            work = Path(folder)
            work.mkdir(parents=True, exist_ok=True)
            ckpt = make_checkpoint(work / "checkpoint.pt", preset_name, size, seed)
            ck = ckpt_io.load(ckpt)
            model = ck.build_model()
            info.update(checkpoint=str(ckpt),
                        parameters=sum(p.numel() for p in model.parameters()),
                        attention_resolutions=list(ck.unet_config.attention_resolutions),
                        channel_mults=list(ck.unet_config.channel_mults))
            info["models"] = []
            for precision in precisions:
                options = onnx_export.ExportOptions(
                    guidance=guidance, fused=("step", "sampler"), sampler_steps=steps,
                    variants=variants, precision=precision)
                onnx_export.check_options_against(ck.meta, options)
                out = (work / "model.onnx" if len(precisions) == 1
                       else work / precision / "model.onnx")
                out.parent.mkdir(parents=True, exist_ok=True)
                api.write_artifact(model, ck.meta, out, options, check_parity=check,
                                   check_n=check_n, source=str(ckpt))
                info["models"].append(str(out))
            info["model"] = info["models"][0]
            info["parity_gate"] = (f"passed ({check_n} images a graph)" if check
                                   else "not run (--no-check)")
    except Exception as e:  # a worker reports, the run goes on with the other sizes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        info["error"] = f"export failed: {type(e).__name__}: {first} (see {log})"
    info["export_s"] = time.perf_counter() - started
    return info


def prepare_all(sizes: Sequence[int], settings: dict[str, Any], args: argparse.Namespace,
                models: Path, say: Callable[[str], None]) -> dict[int, dict[str, Any]]:
    import concurrent.futures
    import multiprocessing

    cores = _cpu_count()
    workers = args.workers or max(1, min(len(sizes), cores))
    threads = max(1, cores // workers)
    jobs = {s: (s, args.preset, args.seed, settings["steps"], args.guidance,
                str(models / folder_name(s)), str(args.out / folder_name(s) / "export.log"),
                not args.no_check, args.check_n, threads, settings["variants"],
                settings["precisions"]) for s in sizes}
    for s in sizes:
        (args.out / folder_name(s)).mkdir(parents=True, exist_ok=True)
    say(f"exporting {len(sizes)} sizes in {workers} worker process(es), {threads} "
        "thread(s) each")
    done: dict[int, dict[str, Any]] = {}
    if workers == 1:
        for s in sizes:
            done[s] = prepare(*jobs[s])
            say(f"{s} px: {_export_line(done[s])}")
        return done
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(prepare, *jobs[s]): s for s in sizes}
        for fut in concurrent.futures.as_completed(futures):
            s = futures[fut]
            try:
                done[s] = fut.result()
            except Exception as e:  # the worker process itself died
                done[s] = {"size": s, "export_s": None,
                           "error": f"export worker failed: {type(e).__name__}: {e}"}
            say(f"{s} px: {_export_line(done[s])}")
    return done


def _export_line(info: dict[str, Any]) -> str:
    if info.get("error"):
        return str(info["error"])
    return f"exported in {info['export_s']:.1f} s, {info['parameters']:,} parameters"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------
# Launch time and kernel counts
# ---------------------------------------------------------------------------------


def launch_us(device: str) -> tuple[float | None, str]:
    """The time one tiny kernel costs on ``device`` (µs) and how it was measured."""
    try:
        if device == "cuda":
            return _launch_cuda()
        return _launch_cpu()
    except Exception as e:
        return None, f"not measured: {type(e).__name__}: {e}"


def _launch_cuda() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "not measured: torch sees no CUDA device"
    x = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCH_KERNELS):
            x.add_(1)
    for _ in range(3):
        graph.replay()
    reps = 20
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / (reps * LAUNCH_KERNELS)
    return us, (f"{LAUNCH_KERNELS} one-element add kernels in a CUDA graph, replayed {reps} "
                "times, CUDA events")


def _launch_cpu() -> tuple[float | None, str]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(n: int) -> Any:
        nodes = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", "one"], [f"y{i}"])
                 for i in range(n)]
        g = helper.make_graph(
            nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info(f"y{n - 1}", TensorProto.FLOAT, [1])],
            [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8  # what opset 17 needs; a newer onnx writes an IR older runtimes refuse
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])

    x = {"x": np.zeros(1, np.float32)}

    def best(s: Any) -> float:
        for _ in range(5):
            s.run(None, x)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            s.run(None, x)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    one, many = best(session(1)), best(session(LAUNCH_KERNELS + 1))
    return (max(many - one, 0.0) * 1e6 / LAUNCH_KERNELS,
            f"ONNX Runtime CPU, a chain of {LAUNCH_KERNELS + 1} one-element Add nodes minus "
            "a chain of 1, median of 50 runs, one thread")


def kernel_count(model: Path) -> int | None:
    """Nodes of the denoiser graph, Constant nodes left out (one kernel each, unfused)."""
    try:
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return None
    return sum(1 for n in proto.graph.node if n.op_type != "Constant")


# ---------------------------------------------------------------------------------
# One size's bench
# ---------------------------------------------------------------------------------


def bench_size(info: dict[str, Any], settings: dict[str, Any], args: argparse.Namespace,
               command: str, budget_s: float, say: Callable[[str], None]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``fewstep bench`` of one size's model, in this process; writes OUT/pxNNN/."""
    from . import cli
    from .latency import SuiteConfig
    from .stats import TimingConfig

    timing = TimingConfig(warmup=args.warmup, iters=args.iters,
                          max_iters=max(2000, args.iters), target_seconds=args.target_seconds,
                          max_config_seconds=args.max_config_seconds, warmup_seconds=0.5,
                          min_iters_floor=min(5, args.iters))
    cfg = SuiteConfig(
        models=tuple(m for model in info.get("models", [info["model"]])
                     for m in bench_models(Path(model), settings)),
        checkpoint=Path(info["checkpoint"]),
        backends=settings["backends"], graphs=settings["graphs"], steps=settings["steps"],
        batches=settings["batches"], baselines=settings["baselines"],
        compile_steps=settings["steps"], compile_batches=settings["batches"],
        compile_budget_s=args.compile_budget,
        compile_precisions=settings["compile_precisions"],
        compile_margin_s=args.compile_margin, guidance=2.0 if args.guidance else None,
        threads=args.threads, torch_threads=args.torch_threads, timing=timing,
        time_budget_s=budget_s, quick=args.quick_ceilings,
        command=f"{command}  # size {info['size']}",
    )
    out = args.out / folder_name(info["size"])
    return cli.run(cfg, out, log=lambda s: say(f"[{info['size']} px] {s}"),
                   plots=not args.no_plots)


def bench_models(model: Path, settings: dict[str, Any]) -> tuple[Path, ...]:
    """The artifacts one size's bench times: the ORT-CUDA variant where it was exported
    (alone when ort-cuda is the only backend: it is what ``Pipeline.load`` runs there),
    and the portable graphs for any other backend."""
    from fewstep.runtime.artifact import variant_path

    variant = variant_path(model, "ort-cuda")
    if not settings.get("variants") or not variant.is_file():
        return (model,)
    return (variant,) if tuple(settings["backends"]) == ("ort-cuda",) else (model, variant)


def failed_rows(size: int, settings: dict[str, Any], path: str, reason: str
                ) -> list[dict[str, Any]]:
    """One row per batch and step count saying why a whole size has no numbers."""
    return [new_row(size=size, batch=b, steps=s, path=path, status="error", reason=reason,
                    bench=folder_name(size))
            for s in settings["steps"] for b in settings["batches"]]


def size_rows(size: int, bench_rows: Sequence[dict[str, Any]], settings: dict[str, Any],
              kernels: int | None, launch: dict[str, float | None]) -> list[dict[str, Any]]:
    """The resolution rows of one size from its bench rows."""
    rows: list[dict[str, Any]] = []
    for b in bench_rows:
        common = dict(size=size, path=b["name"], family=b["family"],
                      precision=b["precision"], device=b["device"], bench=folder_name(size))
        if b["batch"] is None:  # a backend or baseline that cannot run here: every batch
            rows += [new_row(batch=n, steps=s, status=b["status"], reason=b["reason"],
                             **common)
                     for s in settings["steps"] for n in settings["batches"]]
            continue
        row = new_row(batch=b["batch"], steps=b["steps"], status=b["status"],
                      reason=b["reason"], **common)
        for key in ("p50_ms", "images_per_s", "per_step_ms", "flops_per_step",
                    "floor_ms_per_step", "floor_fraction", "roofline_bound", "max_abs_err",
                    "psnr_db"):
            row[key] = b.get(key)
        if b["status"] == "ok":
            us = launch.get(b["device"])
            row.update(kernels_per_step=kernels, launch_us=us)
            if kernels is not None and us is not None:
                row["launch_floor_ms"] = kernels * us / 1e3
                if row["per_step_ms"]:
                    row["launch_fraction"] = row["launch_floor_ms"] / row["per_step_ms"]
        rows.append(row)
    add_ratios(rows)
    add_bounds(rows)
    return rows


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: dict[str, Any],
        say: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from . import envinfo

    started = time.perf_counter()
    gpus_start = envinfo.gpu_snapshot()
    command = shlex.join(["python", "-m", "fewstep.benchmarks.resolution", *sys.argv[1:]])
    run_id = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
              + "-" + socket.gethostname().split(".")[0])
    sizes = settings["sizes"]
    record: dict[str, Any] = {
        "run_id": run_id, "command": command,
        "config": {**{k: list(v) for k, v in settings.items() if k != "notes"},
                   "preset": args.preset,
                   "guidance": args.guidance, "seed": args.seed,
                   "time_budget_s": args.time_budget, "compile_budget_s": args.compile_budget,
                   "compile_margin_s": args.compile_margin, "warmup": args.warmup,
                   "iters": args.iters, "target_seconds": args.target_seconds,
                   "max_config_seconds": args.max_config_seconds,
                   "parity_gate": not args.no_check, "check_n": args.check_n},
        "weights": f"random init (torch.manual_seed({args.seed})); latency does not depend "
                   "on training",
        "bound_rule": f"compute-bound when scaling >= {SCALING_THRESHOLD}; else "
                      f"under-occupied for a CUDA-graph path whose launch floor is under "
                      f"{LAUNCH_SHARE:.0%} of a step, else launch-bound "
                      "(benchmarks/resolution.py)",
        "models": str(args.models) if args.models is not None
        else "a temporary folder, removed at the end (the weights are seeded: re-made alike)",
        "sizes": [], "launch": {}, "environment": None, "notes": settings["notes"],
    }
    rows: list[dict[str, Any]] = []
    results, md = args.out / RESULTS, args.out / REPORT

    def save() -> None:
        write_results(results, record, rows)
        write_text(md, render({**record, "record": "run"}, rows))

    save()
    temp = None
    models = args.models
    if models is None:
        temp = models = Path(tempfile.mkdtemp(prefix="fewstep-resolution-"))
    try:
        prepared = prepare_all(sizes, settings, args, models, say)
        record["sizes"] = [prepared[s] for s in sizes]
        devices = {"cpu"} | ({"cuda"} if any(b != "ort-cpu" for b in settings["backends"])
                             or _torch_cuda() else set())
        for d in sorted(devices):
            us, method = launch_us(d)
            record["launch"][d] = {"us": us, "method": method}
        launch = {d: v["us"] for d, v in record["launch"].items()}
        record["environment"] = envinfo.collect(run_id, command, gpus_start)
        save()
        for n, s in enumerate(sizes):
            info = prepared[s]
            if info.get("error"):
                rows += failed_rows(s, settings, "export", str(info["error"]))
                save()
                continue
            t0 = time.perf_counter()
            # an equal share of the time left: what a fast size leaves goes to the others
            share = max(args.time_budget - (t0 - started), 1.0) / (len(sizes) - n)
            info["bench_budget_s"] = share
            say(f"{s} px: bench, {share:.0f} s budget")
            try:
                _, bench_rows = bench_size(info, settings, args, command, share, say)
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                rows += failed_rows(s, settings, "bench", f"{type(e).__name__}: {first}")
                save()
                continue
            info["bench_s"] = time.perf_counter() - t0
            timed = bench_models(Path(info["model"]), settings)[0]  # the variant, if timed
            rows += size_rows(s, bench_rows, settings, kernel_count(timed), launch)
            save()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    record["elapsed_s"] = time.perf_counter() - started
    save()
    return record, rows


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def body(args: argparse.Namespace) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.render is not None:
        run_rec, rows = read_results(args.render / RESULTS)
        write_text(args.render / REPORT, render(run_rec, rows))
        print(summary_table(rows))
        print(args.render / REPORT)
        return 0
    settings = check_args(args)
    record, rows = run(args, settings, say)
    print(f"wrote {args.out / RESULTS}, {args.out / REPORT} ({len(rows)} rows, "
          f"{record['elapsed_s']:.0f} s)")
    print(summary_table(rows))
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m fewstep.benchmarks.resolution"))
