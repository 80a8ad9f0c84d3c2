"""Build a TensorRT plan (+ its .plan.json sidecar) from a fewstep ONNX file.

The plan runs only on this GPU model and this TensorRT version; the sidecar records
both, so `fewstep sample --backend tensorrt` refuses a mismatched or stale plan and
prints the command to rebuild it. Precision comes from the ONNX (export with
--precision fp16 or bf16 for an fp16 or bf16 plan: a strongly typed network);
--fp16-weak or --bf16-weak (TensorRT 10 only) lets TensorRT pick fp16 or bf16 kernels
for an fp32 graph instead (weak typing). bf16 needs compute capability 8.0 or newer
(Ampere, Jetson Orin). --batch sets the optimisation profile
MIN:OPT:MAX (or N for a fixed batch); the default is 1:1:16 (1:1:4 on Jetson), less for
large images. --all builds every graph of the artifact (model.onnx, model.step.onnx,
model.sampler-4.onnx, ...) into --out's folder with the same names. Layer timings are
kept in a timing cache (default ~/.cache/fewstep/) so rebuilds are faster.

--engine tensorrt-rtx builds with TensorRT for RTX instead (pip install
'fewstep[tensorrt-rtx]'): ahead of time, with or without a GPU, a plan for RTX GPUs of
compute capability 8.0, 8.6, 8.9 and 12.x (or those of --target-cc), which TensorRT's
runtime (and so `fewstep sample`) cannot load. It has no weak typing, version-compatible
plans or timing cache: --fp16-weak, --bf16-weak, --version-compatible,
--exclude-lean-runtime and --timing-cache are refused with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewstep.runtime import clitools
from fewstep.runtime.artifact import Artifact, read_onnx_meta, require_portable
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.plan import ENGINES, PLAN_EXT, RTX_DEFAULT_TARGETS, BatchProfile


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("onnx", type=Path, help="the fewstep ONNX file (model.onnx, model.step.onnx...)")
    p.add_argument("--engine", choices=ENGINES, default="tensorrt",
                   help="tensorrt: a plan for this GPU; tensorrt-rtx: TensorRT for RTX, a plan "
                        "for RTX GPUs (see --target-cc)")
    p.add_argument("--target-cc", default=None, metavar="CC[,CC...]",
                   help="with --engine tensorrt-rtx: the compute capabilities the plan is for, "
                        "e.g. 8.9 or 8.6,12.0 (default: TensorRT-RTX's own, "
                        f"{', '.join(RTX_DEFAULT_TARGETS)})")
    p.add_argument("--out", type=Path, required=True,
                   help="the plan to write (model.plan); with --all, a folder or a .plan name "
                        "whose siblings get matching names")
    p.add_argument("--batch", default=None,
                   help="batch profile MIN:OPT:MAX, or N for a fixed batch "
                        "(default: 1:1:16, 1:1:4 on Jetson, less for large images)")
    p.add_argument("--opt-level", type=int, default=3,
                   help="TensorRT builder optimisation level 0..5 (higher: slower build, "
                        "maybe faster plan)")
    p.add_argument("--workspace-mib", type=clitools.positive_int, default=None,
                   help="TensorRT workspace limit in MiB (default: half the free GPU memory, "
                        "at most 8 GiB; on Jetson a quarter, at most 2 GiB)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file, or a folder for one named by GPU and TensorRT "
                        "version (default: $FEWSTEP_CACHE_DIR or ~/.cache/fewstep)")
    p.add_argument("--no-timing-cache", action="store_true", help="use no timing cache")
    p.add_argument("--version-compatible", action="store_true",
                   help="a plan that also runs on later TensorRT versions and on tensorrt-lean "
                        "(may be slower)")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave the lean runtime out of the plan "
                        "(smaller; then it needs this exact TensorRT version's runtime)")
    p.add_argument("--fp16-weak", action="store_true",
                   help="TensorRT 10 only: let TensorRT use fp16 in an fp32 graph (weak typing); "
                        "prefer exporting with --precision fp16")
    p.add_argument("--bf16-weak", action="store_true",
                   help="TensorRT 10 only: let TensorRT use bf16 in an fp32 graph (weak typing, "
                        "BuilderFlag.BF16); prefer exporting with --precision bf16")
    p.add_argument("--all", action="store_true",
                   help="build a plan for every graph of the artifact ONNX belongs to")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's verbose log")
    return p


def _targets(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(onnx, plan) pairs, with every ONNX's metadata read (so checked) before TensorRT."""
    from fewstep.export.tensorrt_build import plan_name_for

    onnx: Path = args.onnx
    out: Path = args.out
    meta = read_onnx_meta(onnx)  # ArtifactError: missing, not ONNX, no fewstep metadata
    require_portable(onnx, meta, "fewstep build")
    if args.all:
        if not (out.is_dir() or out.name.endswith(PLAN_EXT)):
            raise ValueError(
                f"--out {str(out)!r} with --all must be an existing folder or a name ending "
                f"in {PLAN_EXT}"
            )
        art = Artifact.open(onnx)
        if art.rejected:
            bad = art.rejected[0]
            raise ArtifactError(f"{bad.path.name}: {bad.problem}")
        pairs = [(g.path, plan_name_for(g.path, out, g.meta))
                 for g in sorted(art.graphs, key=lambda g: g.path) if g.meta is not None]
        built: dict[Path, Path] = {}
        for source, plan in pairs:
            if plan in built:
                raise ArtifactError(
                    f"{built[plan].name} and {source.name} hold the same kind of graph and "
                    f"would both be built into {plan}; a file's name must match its graph: "
                    "re-export the model with `fewstep export`")
            built[plan] = source
        return pairs
    if out.is_dir():
        return [(onnx, plan_name_for(onnx, out, meta))]
    return [(onnx, out)]


def body(args: argparse.Namespace) -> int:
    from fewstep.export import tensorrt_build as tb

    if args.batch is not None:
        BatchProfile.parse(args.batch)  # a bad --batch is reported before anything else
    if args.fp16_weak and args.bf16_weak:
        raise ValueError("--fp16-weak and --bf16-weak exclude each other; pick one")
    weak = "fp16" if args.fp16_weak else "bf16" if args.bf16_weak else None
    requests = [
        tb.prepare_build(
            onnx, plan, batch=args.batch, weak=weak, opt_level=args.opt_level,
            workspace_mib=args.workspace_mib, timing_cache=args.timing_cache,
            use_timing_cache=not args.no_timing_cache,
            version_compatible=args.version_compatible,
            exclude_lean_runtime=args.exclude_lean_runtime, verbose=args.verbose,
            engine=args.engine, targets=args.target_cc,
        )
        for onnx, plan in _targets(args)
    ]
    tb.import_build_module(args.engine)  # BackendUnavailable (exit 2) says how to install it
    for request in requests:
        try:
            sidecar = tb.build_from_request(request)
        except tb.BuildFailed as e:
            if args.debug:
                raise
            print(f"error: {e}", file=sys.stderr)
            return clitools.EXIT_FAILED_CHECK
        print(f"{request.out_path}  batch {sidecar.profile}  {sidecar.precision}  "
              f"{sidecar.engine_name} {sidecar.tensorrt_version}  "
              + (f"RTX GPUs {','.join(sidecar.targets)}" if sidecar.targets
                 else sidecar.gpu_name))
    return clitools.EXIT_OK


main = clitools.main_of(build_parser, body)
