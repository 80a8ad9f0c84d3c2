"""Export a fewstep checkpoint to ONNX, then run the parity gate.

Writes OUT (the denoiser graph, usable at any step count) and, with --fused, beside it
OUT.step.onnx (denoiser + DDIM update: state stays on the device between steps) and
OUT.sampler-N.onnx (the whole N-step loop in one graph: one run = one generation).
The graphs share one weights file (OUT.weights.<hash>.bin) unless --no-shared-weights.
Everything is staged in a temporary folder and moved into place only when every file
passed onnx.checker and the parity gate; an existing model is replaced only on success,
and then every other graph or weights file of OUT's name that this export did not write
is removed. --precision fp16 or bf16 keeps GroupNorm statistics, softmax and the time
embedding in fp32 (the graph's inputs and outputs stay fp32) and lists those fp32 nodes
(all of them with --verbose). ONNX Runtime's CPU provider cannot run bf16 graphs (it has
no bfloat16 Conv/Gemm kernels): their parity rows there are skipped with the reason, the
gate is then not passed, and the files are written unchecked on that provider.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewstep.runtime import clitools
from fewstep.runtime.fileio import check_writable_target, staging_dir


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by fewstep train")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path (the denoiser)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="fp16/bf16 keep GroupNorm statistics, softmax and the time embedding "
                        "fp32 (bf16 needs opset >= 22)")
    p.add_argument("--guidance", action="store_true",
                   help="classifier-free guidance inside the graph (guidance scale is an input)")
    p.add_argument("--fused", action="append", choices=["step", "sampler"], default=[],
                   help="also export a fused graph (repeatable)")
    p.add_argument("--steps", type=clitools.positive_int, action="append", default=None,
                   help="step count of a fused sampler graph (repeatable; default 4, or the "
                        "distilled step count)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=None,
                   help="timestep spacing baked into sampler graphs (default: trailing, or "
                        "the spacing the model was distilled for); needs --fused sampler")
    p.add_argument("--eta", type=float, default=None,
                   help="eta baked into sampler graphs (> 0 adds a noise input; default 0); "
                        "needs --fused sampler")
    p.add_argument("--sampler-output", choices=["uint8", "float"], default="uint8",
                   help="sampler graphs output uint8 NHWC images or float x0")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 17..23 (default: 18; 22 for bf16)")
    p.add_argument("--no-shared-weights", action="store_true",
                   help="embed the weights in every graph file instead of sharing them")
    p.add_argument("--no-check", action="store_true", help="skip the parity gate")
    p.add_argument("--check-n", type=clitools.positive_int, default=4,
                   help="images per parity check")
    p.add_argument("--min-psnr-fp32", type=float, default=40.0)
    p.add_argument("--min-psnr-fp16", type=float, default=35.0)
    p.add_argument("--min-psnr-bf16", type=float, default=30.0)
    p.add_argument("--verbose", action="store_true",
                   help="list every node kept in fp32 (fp16/bf16), not just the first few")
    from . import triton

    p.add_argument("--triton", type=Path, default=None, metavar="DIR",
                   help="also write a Triton Inference Server model repository into DIR")
    triton.add_options(p)
    return p


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out {str(out)!r} must end in .onnx")
    from . import triton

    if args.triton is not None:
        triton.check_repository_target(args.triton)
    from fewstep.train import checkpoint as ckpt_io

    from . import check, onnx_export

    if "sampler" not in args.fused:
        for flag, value in (("--steps", args.steps), ("--spacing", args.spacing),
                            ("--eta", args.eta)):
            if value is not None:
                raise ValueError(f"{flag} applies to sampler graphs; add --fused sampler "
                                 f"(or drop {flag})")
    eta = 0.0 if args.eta is None else args.eta
    ck = ckpt_io.load(args.checkpoint)
    meta = ck.meta
    steps = tuple(args.steps) if args.steps else (meta.distilled_steps[-1:] or (4,))
    options = onnx_export.ExportOptions(
        precision=args.precision, guidance=args.guidance, fused=tuple(dict.fromkeys(args.fused)),
        sampler_steps=tuple(dict.fromkeys(steps)), spacing=args.spacing, eta=eta,
        sampler_output=args.sampler_output, opset=args.opset,
        shared_weights=not args.no_shared_weights,
    )
    onnx_export.check_options_against(meta, options)
    model = ck.build_model()
    stem = out.name[: -len(".onnx")]
    stages = onnx_export.graph_count(options) * (2 if args.no_check else 3)
    with staging_dir(out.parent, f"export-{stem}") as staging, clitools.Progress(
            stages, "export", unit="stage") as progress:
        # On a terminal a bar: each graph traced, checked (onnx.checker), gated.
        files, reports = onnx_export.export_to_folder(model, meta, staging, stem, options,
                                                      progress)
        for r in reports:
            islands = ""
            if r.fp32_islands:
                ops = ", ".join(f"{k} x{v}" for k, v in r.fp32_islands.items())
                islands = f"; fp32 islands: {sum(r.fp32_islands.values())} nodes ({ops})"
            progress.line(f"  {r.path.name}: {r.nodes} nodes, {r.seconds:.1f} s{islands}")
            for line in onnx_export.describe_islands(r.fp32_nodes,
                                                     first=None if args.verbose else 3):
                progress.line(f"    fp32 {line}")
        if not args.no_check:
            rows = check.check_artifact(
                staging / out.name, model, meta, n=args.check_n, eta=eta,
                gates={"fp32": args.min_psnr_fp32, "fp16": args.min_psnr_fp16,
                       "bf16": args.min_psnr_bf16}, progress=progress,
            )
            progress.close()
            print(check.table(rows), file=sys.stderr)
            print(check.summary(rows), file=sys.stderr)
            failed = [r for r in rows if r.failed]
            if failed:
                raise clitools.CheckFailed(
                    f"{len(failed)} parity row(s) below the gate; nothing was written "
                    f"to {out.parent}/ (try --precision fp32, or lower the gate knowingly)"
                )
            skipped = sorted({r.provider for r in rows if r.skipped})
            if skipped:
                fix = (f"check them with `fewstep check {out} --against {args.checkpoint} "
                       "--providers cuda` on a machine with ONNX Runtime's CUDA provider"
                       if "cuda" not in skipped else
                       "no ONNX Runtime provider here runs them; build a TensorRT plan "
                       "with `fewstep build` and compare it")
                print(f"warning: the {args.precision} graphs were written without a parity "
                      f"check on {', '.join(skipped)} (reasons above); {fix}",
                      file=sys.stderr)
        progress.close()
        final = onnx_export.place(files, out.parent, stem, meta.source_hash)
    for path in final:
        if path.suffix == ".onnx":
            print(path)
    if args.triton is not None:
        for folder in triton.write_repository(out, args.triton, triton.options_from(args)):
            print(folder)
    return 0


main = clitools.main_of(build_parser, body)
