"""Latency benchmark: fewstep's paths against PyTorch and plain ONNX Runtime baselines.

Times every path (fewstep on each backend × graph kind, and the baselines torch-eager,
torch-compile and ort-steps; with a diffusers folder as --source also diffusers-eager and
diffusers-compile, diffusers' own loop) at every steps × batch, in one process, on the same
weights, host noise, labels and guidance; writes OUT/results.jsonl (one row per
configuration, line 1 the environment), OUT/report.md and PNG plots. Latency is end
to end (host noise in, uint8 images out on the host), synchronised, p50 after warm-up.
--quick: the shipped model on ONNX Runtime CPU, steps 1 and 4, batch 1 and 4 (under a
minute on a CPU). --render OUT re-draws report.md and the plots from OUT/results.jsonl.
Unavailable backends give one row saying why; nothing here changes the GPU's clocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fewstep.runtime import backends, clitools
from fewstep.runtime.sampling import default_spacing

from . import envinfo, report
from .latency import BASELINES, DEFAULT_BATCHES, DEFAULT_STEPS, Runner, SuiteConfig, unique
from .paths import (
    FEWSTEP_BACKENDS,
    GRAPH_KINDS,
    BenchModel,
    BenchPath,
    FewstepPath,
    Workload,
    open_models,
)
from .probes import Cuda
from .stats import TimingConfig

COMPILE_MODES = ("reduce-overhead", "max-autotune")
QUICK: dict[str, Any] = dict(backends=("ort-cpu",), steps=(1, 4), batches=(1, 4),
                             baselines=("torch-eager", "ort-steps"), warmup=1, iters=3,
                             target_seconds=0.1, max_config_seconds=1.0, time_budget=40.0)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """The house formatter, without "(default: None)" where the help names the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.formatter_class = _Formatter
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="an exported model.onnx (its step/sampler graphs and .plan files "
                        "beside it are found); give it twice for e.g. fp32 and fp16 "
                        "artifacts (default: the shipped model)")
    p.add_argument("--source", "--checkpoint", dest="checkpoint", type=Path, default=None,
                   metavar="PATH",
                   help="what the model was exported from: a fewstep training checkpoint, "
                        "or a diffusers folder (then also the diffusers-eager and "
                        "diffusers-compile baselines, diffusers' own loop); enables the "
                        "torch baselines and the max-error/PSNR columns (default: none)")
    p.add_argument("--scheduler-config", type=Path, default=None, metavar="FILE",
                   help="the scheduler_config.json of a diffusers model folder given as "
                        "--source (a pipeline folder has its own)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help=f"fewstep backends: {' '.join(FEWSTEP_BACKENDS)} (default: all; "
                        "--quick: ort-cpu)")
    p.add_argument("--graphs", nargs="+", default=list(GRAPH_KINDS), metavar="KIND",
                   help="graph kinds fewstep is forced to use: denoiser step sampler")
    p.add_argument("--steps", nargs="+", type=int, default=None, metavar="N",
                   help=f"step counts (default: {' '.join(map(str, DEFAULT_STEPS))}; "
                        "--quick: 1 4)")
    p.add_argument("--batch", nargs="+", type=int, default=None, metavar="N",
                   help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))}; "
                        "--quick: 1 4)")
    p.add_argument("--baselines", nargs="*", default=None, metavar="NAME",
                   help=f"{' '.join(BASELINES)}; none when given empty (default: all; "
                        "--quick: torch-eager ort-steps)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also torch.compile mode max-autotune (long compiles)")
    p.add_argument("--compile-steps", nargs="+", type=int, default=[1, 2, 4, 8], metavar="N",
                   help="step counts torch.compile is measured at")
    p.add_argument("--compile-batch", nargs="+", type=int, default=[1, 4], metavar="N",
                   help="batch sizes torch.compile is measured at")
    p.add_argument("--compile-budget", type=float, default=240.0, metavar="S",
                   help="seconds of torch.compile first calls after which compile rows are "
                        "skipped")
    p.add_argument("--guidance", default="2.0",
                   help="classifier-free guidance scale of every path ('none' = conditional "
                        "model without CFG); ignored for models without guided graphs")
    p.add_argument("--cuda-options", action="append", default=[], type=clitools.key_values,
                   metavar="K=V[,K=V]",
                   help="time every ort-cuda graph once more with these CUDA EP options "
                        "(repeatable; each a row of its own, named with the options), e.g. "
                        "fuse_conv_bias=1")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of ONNX Runtime CPU (default: all cores)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU torch baseline and reference "
                        "(default: torch's own choice; on a small shared CPU, 1 avoids "
                        "OpenMP stalls)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10; quick 1)")
    p.add_argument("--iters", type=int, default=None,
                   help="least timed calls per configuration (default 50; quick 3)")
    p.add_argument("--max-iters", type=int, default=2000, help="most timed calls")
    p.add_argument("--target-seconds", type=float, default=None,
                   help="time to spend timing one configuration (default 1.0; quick 0.1)")
    p.add_argument("--max-config-seconds", type=float, default=None,
                   help="slow calls get fewer than --iters iterations beyond this "
                        "(default 10; quick 1)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="configurations not started S seconds after the start are "
                        "skipped (default: none; quick 40)")
    p.add_argument("--no-roofline", action="store_true", help="skip FLOP counts and ceilings")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--quick", action="store_true",
                   help="the small CPU configuration (CI): see the description")
    p.add_argument("--out", type=Path, default=Path("runs/bench"),
                   help="output folder (created): results.jsonl, report.md, *.png")
    p.add_argument("--render", type=Path, default=None, metavar="OUT",
                   help="only re-write report.md and the plots from OUT/results.jsonl, "
                        "measuring nothing")
    return p


# ---------------------------------------------------------------------------------
# Arguments → SuiteConfig (one-line errors: ValueError → exit 2)
# ---------------------------------------------------------------------------------


def _positive(name: str, values: Sequence[int]) -> tuple[int, ...]:
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"{name} {bad[0]} must be a whole number >= 1")
    return unique(values)


def _choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    for v in values:
        if v not in allowed:
            raise ValueError(f"{name} {v!r} is unknown; use one or more of {' '.join(allowed)}")
    return unique(values)


def _guidance(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        g = float(text)
    except ValueError:
        raise ValueError(f"--guidance {text!r} is not a number; pass e.g. 2.0 or none") from None
    if not 0.0 <= g <= 50.0:
        raise ValueError(f"--guidance {g} must be in [0, 50]; 1 = no guidance")
    return g


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    q = args.quick

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else (QUICK[key] if q else default)

    models = tuple(args.model) if args.model else ()
    if not models:
        from fewstep.runtime.pipeline import default_model_path

        models = (default_model_path(),)
    for m in models:
        if not m.is_file():
            raise ValueError(f"--model {str(m)!r} does not exist; pass a model.onnx made by "
                             "`fewstep export`")
    if args.checkpoint is not None and not (args.checkpoint.is_file()
                                            or args.checkpoint.is_dir()):
        raise ValueError(f"--source {str(args.checkpoint)!r} does not exist; pass the .pt "
                         "written by fewstep train or the diffusers folder the model was "
                         "exported from")
    if args.scheduler_config is not None and (args.checkpoint is None
                                              or not args.checkpoint.is_dir()):
        raise ValueError("--scheduler-config applies to a diffusers model folder given as "
                         "--source; drop it or pass --source FOLDER")
    timing = TimingConfig(
        warmup=pick(args.warmup, "warmup", 10), iters=pick(args.iters, "iters", 50),
        max_iters=args.max_iters, target_seconds=pick(args.target_seconds, "target_seconds", 1.0),
        max_config_seconds=pick(args.max_config_seconds, "max_config_seconds", 10.0),
        warmup_seconds=1.0 if q else 2.0, min_iters_floor=3 if q else 5,
    ) if _timing_ok(args) else TimingConfig()
    modes = ("reduce-overhead", "max-autotune") if args.max_autotune else ("reduce-overhead",)
    budget = pick(args.time_budget, "time_budget", None)
    if budget is not None and budget <= 0:
        raise ValueError(f"--time-budget {budget} must be > 0 seconds")
    for flag, value in (("--threads", args.threads), ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    if args.compile_budget < 0:
        raise ValueError(f"--compile-budget {args.compile_budget} must be >= 0")
    return SuiteConfig(
        models=models, checkpoint=args.checkpoint, scheduler_config=args.scheduler_config,
        backends=_choices("--backends", pick(args.backends, "backends", FEWSTEP_BACKENDS),
                          FEWSTEP_BACKENDS),
        graphs=_choices("--graphs", args.graphs, GRAPH_KINDS),
        steps=_positive("--steps", pick(args.steps, "steps", DEFAULT_STEPS)),
        batches=_positive("--batch", pick(args.batch, "batches", DEFAULT_BATCHES)),
        baselines=_choices("--baselines", pick(args.baselines, "baselines", BASELINES),
                           BASELINES),
        compile_modes=modes,
        compile_steps=_positive("--compile-steps", args.compile_steps),
        compile_batches=_positive("--compile-batch", args.compile_batch),
        compile_budget_s=args.compile_budget,
        guidance=_guidance(args.guidance), threads=args.threads,
        torch_threads=args.torch_threads, timing=timing,
        cuda_options=tuple(tuple(o.items()) for o in args.cuda_options),
        time_budget_s=budget, roofline=not args.no_roofline, quick=q,
        command=shlex.join(["fewstep", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"]
        else shlex.join(sys.argv),
    )


def _timing_ok(args: argparse.Namespace) -> bool:
    for name in ("warmup", "iters"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name} {v} must be >= {0 if name == 'warmup' else 1}")
    for name in ("target_seconds", "max_config_seconds"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {v} must be > 0")
    if args.iters is not None and args.max_iters < args.iters:
        raise ValueError(f"--max-iters {args.max_iters} must be >= --iters {args.iters}")
    return True


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


class _Unavailable(BenchPath):
    """One row for a backend that cannot run here (instead of one per graph)."""

    def __init__(self, name: str, backend: str, reason: str, device: str) -> None:
        self.name, self.backend, self.reason, self.device = name, backend, reason, device
        self.path = "fewstep"

    def unavailable(self) -> str | None:
        return self.reason


def _backend_options(backend: str, cfg: SuiteConfig) -> dict[str, Any]:
    if backend == "ort-cpu" and cfg.threads is not None:
        return {"threads": cfg.threads}
    if backend == "ort-tensorrt":
        return {"max_batch": max(cfg.batches)}
    return {}


def build_paths(cfg: SuiteConfig, arts: Sequence[BenchModel], work: Workload,
                src: Any) -> list[tuple[BenchPath, Workload]]:
    from . import baselines as bl
    from . import diffusers_loop as dl

    avail = backends.availability()
    paths: list[BenchPath] = []
    for backend in cfg.backends:
        if avail.get(backend):
            paths.append(_Unavailable(f"fewstep {backend}", backend, str(avail[backend]),
                                      "cpu" if backend == "ort-cpu" else "cuda"))
            continue
        extra = [dict(o) for o in cfg.cuda_options] if backend == "ort-cuda" else []
        for art in arts:
            for kind in cfg.graphs:
                paths.append(FewstepPath(art, backend, kind, work,
                                         _backend_options(backend, cfg)))
                for opts in extra:
                    paths.append(FewstepPath(art, backend, kind, work,
                                             {**_backend_options(backend, cfg),
                                              "cuda_options": opts},
                                             tag=",".join(f"{k}={v}" for k, v in opts.items())))
    if "ort-steps" in cfg.baselines:
        ort_backends = [b for b in ("ort-cpu", "ort-cuda") if b in cfg.backends] or (
            ["ort-cuda"] if avail.get("ort-cuda") is None else ["ort-cpu"])
        for backend in ort_backends:
            for art in arts:
                paths.append(bl.OrtStepsPath(art, backend, work, cfg.threads))
    precisions = ("fp32", "fp16") if src.cuda else ("fp32",)
    # diffusers' own loop: where the source has a diffusers scheduler, or when asked by name
    diffusers = src.scheduler is not None or cfg.baselines != BASELINES
    for eager, compiled, wanted in (
            (bl.TorchEagerPath, bl.TorchCompilePath, True),
            (dl.DiffusersEagerPath, dl.DiffusersCompilePath, diffusers)):
        if eager.path in cfg.baselines and wanted:
            paths += [eager(src, work, p) for p in precisions]
        if compiled.path in cfg.baselines and wanted:
            for mode in cfg.compile_modes:
                # fp16 first: torch.compile at fp16 is the strongest baseline fewstep is
                # compared with, so it is measured before a time budget runs out
                for p in sorted(precisions, key=lambda p: p != "fp16"):
                    if src.cuda and p not in cfg.compile_precisions:
                        continue
                    paths.append(compiled(src, work, p, mode, cfg.compile_steps,
                                          cfg.compile_batches))
    return [(p, work) for p in paths]


def _workload(cfg: SuiteConfig, arts: Sequence[BenchModel]) -> Workload:
    meta = arts[0].meta
    T = meta.schedule.num_train_timesteps
    for s in cfg.steps:
        if s > T:
            raise ValueError(f"--steps {s} exceeds num_train_timesteps={T} recorded in "
                             f"{arts[0].path.name}; pass --steps <= {T}")
    guided = any(m.graph.guidance for a in arts for _, m in a.all_graphs())
    g = cfg.guidance if (meta.conditional and guided) else None
    return Workload(meta, default_spacing(meta), g)


def run(cfg: SuiteConfig, out: Path, log: Callable[[str], None] | None = None,
        plots: bool = True, source: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure everything ``cfg`` asks for; write results.jsonl, report.md and plots.
    ``source``: the torch model of the baselines (``torch_source.TorchSource``, e.g.
    ``TorchSource.from_module``) instead of ``cfg.checkpoint``."""
    from . import baselines as bl
    from .roofline import Roofline

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    started = time.perf_counter()
    gpus_start = envinfo.gpu_snapshot()  # clocks as found, before this run touches the GPU
    arts = open_models(cfg.models)
    work = _workload(cfg, arts)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out {str(out)!r} ({e.strerror}); pass another "
                         "folder") from None
    src = source if source is not None else bl.TorchSource(
        cfg.checkpoint, cfg.torch_threads, arts[0].meta.sample_shape, cfg.scheduler_config)
    for a in arts:
        src.check_matches(a)
    avail = backends.availability()
    gpu_wanted = src.cuda or any(avail.get(b) is None for b in cfg.backends if b != "ort-cpu")
    cuda = Cuda(probe=gpu_wanted)
    run_id = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
              + "-" + socket.gethostname().split(".")[0])

    roof = None
    if cfg.roofline:
        roof = Roofline()
        graphs = [(a.precision, d) for a in arts if (d := a.denoiser_onnx()) is not None]
        try:
            roof.count_graphs(graphs, cfg.batches)
        except ImportError as e:
            roof.notes.append(f"FLOPs not counted: {e} (pip install onnx)")
        say("measuring device ceilings")
        torch_gpu = gpu_wanted and _torch_cuda()
        roof.measure(gpu=torch_gpu, quick=cfg.quick)
        if gpu_wanted and not torch_gpu:
            roof.notes.append("GPU ceilings need torch with CUDA; not measured")
    reference = bl.Reference(src, work, cfg.batches)
    env = envinfo.collect(run_id, cfg.command, gpus_start)
    record: dict[str, Any] = {
        "run_id": run_id, "command": cfg.command, "config": _config_dict(cfg),
        "models": [{"path": str(a.path), "precision": a.precision, "label": a.label,
                    "graphs": [str(p) for p, _ in a.all_graphs()]}
                   for a in arts],
        "checkpoint": None if cfg.checkpoint is None else str(cfg.checkpoint),
        "source": {"kind": src.kind, "path": None if src.path is None else str(src.path),
                   "scheduler": None if src.scheduler is None
                   else type(src.scheduler).__name__},
        "workload": {"guidance": work.guidance, "spacing": work.spacing, "eta": work.eta,
                     "labels": "class i % num_classes for image i",
                     "seeds": "timed calls rotate seeds 0..3; parity on seed 0",
                     "sample_shape": list(work.meta.sample_shape), "images": work.meta.images},
        "cuda_api": cuda.method, "reference": reference.describe if src.reason is None
        else src.reason,
        "notes": _run_notes(cfg, arts, work),
        "environment": env, "roofline": None if roof is None else roof.to_dict(),
    }
    rows: list[dict[str, Any]] = []
    results = out / report.RESULTS
    report.write_results(results, record, rows)  # the run record first: --render works

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        report.write_results(results, record, rows)

    paths = build_paths(cfg, arts, work, src)
    runner = Runner(cfg, run_id, cuda, emit, reference if src.reason is None else None, roof,
                    say, started=started)
    runner.run(paths)
    env["gpus_end"] = envinfo.gpu_snapshot()
    record["elapsed_s"] = time.perf_counter() - started
    report.write_results(results, record, rows)
    report.write_report(out, {"record": "run", **record}, rows, plots=plots)
    return record, rows


def _run_notes(cfg: SuiteConfig, arts: Sequence[BenchModel], work: Workload) -> list[str]:
    notes = []
    guided = any(m.graph.guidance for a in arts for _, m in a.all_graphs())
    if work.guidance is None and guided:
        notes.append("guidance none with guided graphs: fewstep's graphs still evaluate the "
                     "UNet twice per step (at scale 1) while the torch baselines evaluate it "
                     "once; compare with a guidance scale instead")
    if cfg.time_budget_s is not None:
        notes.append(f"time budget {cfg.time_budget_s:g} s: configurations not started by "
                     "then are 'skipped'")
    return notes


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _config_dict(cfg: SuiteConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["models"] = [str(m) for m in cfg.models]
    d["checkpoint"] = None if cfg.checkpoint is None else str(cfg.checkpoint)
    d["scheduler_config"] = (None if cfg.scheduler_config is None
                             else str(cfg.scheduler_config))
    return d


def body(args: argparse.Namespace) -> int:
    if args.render is not None:
        run_rec, rows = report.read_results(args.render / report.RESULTS)
        files = report.write_report(args.render, run_rec, rows, plots=not args.no_plots)
        print(report.summary_table(rows))
        print("\n".join(str(f) for f in files))
        return 0
    cfg = config_from_args(args)
    record, rows = run(cfg, args.out, plots=not args.no_plots)
    print(report.summary_table(rows))
    print(f"wrote {args.out / report.RESULTS}, {args.out / report.REPORT} "
          f"({len(rows)} rows, {record['elapsed_s']:.0f} s)")
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="fewstep bench"))
