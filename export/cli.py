"""Export a fewstep checkpoint to ONNX, then run the parity gate.

Writes OUT (the denoiser graph, usable at any step count) and, with --fused, beside it
OUT.step.onnx (denoiser + DDIM update: state stays on the device between steps) and
OUT.sampler-N.onnx (the whole N-step loop in one graph: one run = one generation).
The graphs share one weights file (OUT.weights.<hash>.bin) unless --no-shared-weights.
Everything is staged in a temporary folder and moved into place only when every file
passed onnx.checker and the parity gate; an existing model is replaced only on success.
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
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 keeps GroupNorm statistics, softmax and the time embedding fp32")
    p.add_argument("--guidance", action="store_true",
                   help="classifier-free guidance inside the graph (guidance scale is an input)")
    p.add_argument("--fused", action="append", choices=["step", "sampler"], default=[],
                   help="also export a fused graph (repeatable)")
    p.add_argument("--steps", type=clitools.positive_int, action="append", default=None,
                   help="step count of a fused sampler graph (repeatable; default 4, or the "
                        "distilled step count)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=None,
                   help="timestep spacing baked into sampler graphs (default: trailing, or "
                        "the spacing the model was distilled for)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="eta baked into sampler graphs (> 0 adds a noise input)")
    p.add_argument("--sampler-output", choices=["uint8", "float"], default="uint8",
                   help="sampler graphs output uint8 NHWC images or float x0")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--no-shared-weights", action="store_true",
                   help="embed the weights in every graph file instead of sharing them")
    p.add_argument("--no-check", action="store_true", help="skip the parity gate")
    p.add_argument("--check-n", type=clitools.positive_int, default=4,
                   help="images per parity check")
    p.add_argument("--min-psnr-fp32", type=float, default=40.0)
    p.add_argument("--min-psnr-fp16", type=float, default=35.0)
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

    ck = ckpt_io.load(args.checkpoint)
    meta = ck.meta
    steps = tuple(args.steps) if args.steps else (meta.distilled_steps[-1:] or (4,))
    if args.steps is not None and "sampler" not in args.fused:
        raise ValueError("--steps applies to sampler graphs; add --fused sampler")
    options = onnx_export.ExportOptions(
        precision=args.precision, guidance=args.guidance, fused=tuple(dict.fromkeys(args.fused)),
        sampler_steps=tuple(dict.fromkeys(steps)), spacing=args.spacing, eta=args.eta,
        sampler_output=args.sampler_output, opset=args.opset,
        shared_weights=not args.no_shared_weights,
    )
    onnx_export.check_options_against(meta, options)
    model = ck.build_model()
    stem = out.name[: -len(".onnx")]
    with staging_dir(out.parent, f"export-{stem}") as staging:
        files, reports = onnx_export.export_to_folder(model, meta, staging, stem, options)
        for r in reports:
            islands = ""
            if r.fp32_islands:
                ops = ", ".join(f"{k} x{v}" for k, v in r.fp32_islands.items())
                islands = f"; fp32 islands: {sum(r.fp32_islands.values())} nodes ({ops})"
            print(f"  {r.path.name}: {r.nodes} nodes, {r.seconds:.1f} s{islands}",
                  file=sys.stderr)
        if not args.no_check:
            rows = check.check_artifact(
                staging / out.name, model, meta, n=args.check_n, eta=args.eta,
                gates={"fp32": args.min_psnr_fp32, "fp16": args.min_psnr_fp16},
            )
            print(check.table(rows), file=sys.stderr)
            failed = [r for r in rows if not r.passed]
            if failed:
                raise clitools.CheckFailed(
                    f"{len(failed)} parity row(s) below the gate; nothing was written "
                    f"to {out.parent}/ (try --precision fp32, or lower the gate knowingly)"
                )
        final = onnx_export.place(files, out.parent, stem, meta.source_hash)
    for path in final:
        if path.suffix == ".onnx":
            print(path)
    if args.triton is not None:
        for folder in triton.write_repository(out, args.triton, triton.options_from(args)):
            print(folder)
    return 0


main = clitools.main_of(build_parser, body)
