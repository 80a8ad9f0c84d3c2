"""Export a model to ONNX, then run the parity gate.

SOURCE is a checkpoint.pt written by `fewstep train`, or a diffusers folder: a pipeline
folder (model_index.json, unet/ with safetensors weights, scheduler/ — DDPMPipeline,
DDIMPipeline) or a model folder (config.json + safetensors) with --scheduler-config.
UNet2DModel (class-conditional through num_class_embeds) and UNet1DModel import; the
scheduler config (DDIMScheduler or DDPMScheduler) becomes the model's schedule, and its
timestep_spacing the default spacing. Anything fewstep cannot reproduce exactly is one
error naming the field and its value (exit 2, nothing written).

Writes OUT (the denoiser graph, usable at any step count) and, with --fused, beside it
OUT.step.onnx (denoiser + DDIM update: state stays on the device between steps) and
OUT.sampler-N.onnx (the whole N-step loop in one graph: one run = one generation).
The graphs share one weights file (OUT.weights.<hash>.bin) unless --no-shared-weights.
Everything is staged in a temporary folder and moved into place only when every file
passed onnx.checker and the parity gate; an existing model is replaced only on success,
and then every other graph or weights file of OUT's name that this export did not write
is removed. --target ort-cuda adds the ORT-CUDA variant (see --target) and needs ONNX
Runtime's CUDA provider for its gate. --precision fp16 or bf16 keeps GroupNorm
statistics, softmax and the time embedding in fp32 (the graph's inputs and outputs
stay fp32) and lists those fp32 nodes (all of them with --verbose). ONNX Runtime's CPU
provider cannot run bf16 graphs (it has no bfloat16 Conv/Gemm kernels): their parity
rows there are skipped with the reason, the gate is then not passed, and the files are
written unchecked on that provider.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewstep.runtime import clitools
from fewstep.runtime.fileio import check_writable_target


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("checkpoint", type=Path, metavar="SOURCE",
                   help="checkpoint.pt written by fewstep train, or a diffusers folder")
    p.add_argument("--scheduler-config", type=Path, default=None, metavar="FILE",
                   help="scheduler_config.json of a diffusers model folder (a pipeline "
                        "folder's scheduler/ is used by default)")
    p.add_argument("--sample-shape", type=_shape, default=None, metavar="C,H,W",
                   help="sample shape of a diffusers model, without the batch (default: "
                        "its config's sample_size)")
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
                   help="timestep spacing baked into sampler graphs (default: the spacing "
                        "the model was distilled for, else its schedule's: trailing for "
                        "fewstep's own models); needs --fused sampler")
    p.add_argument("--eta", type=float, default=None,
                   help="eta baked into sampler graphs (> 0 adds a noise input; default 0); "
                        "needs --fused sampler")
    p.add_argument("--sampler-output", choices=["uint8", "float"], default=None,
                   help="sampler graphs output uint8 NHWC images or float x0 (default: uint8 "
                        "for image models, float otherwise)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 17..23 (default: 18; 22 for bf16)")
    p.add_argument("--target", action="append", choices=["portable", "ort-cuda"],
                   default=[],
                   help="also write a graph variant (repeatable). ort-cuda: every graph "
                        "again as OUT.ort-cuda[.step|.sampler-N].onnx with ONNX Runtime's "
                        "fused CUDA kernels (NHWC GroupNorm+SiLU, SkipGroupNorm, NhwcConv; "
                        "fp32 or fp16), gated on the CUDA provider, used by fewstep on "
                        "ort-cuda; the portable graphs are always written (CPU, TensorRT)")
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


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole "
                                         "numbers, e.g. 3,64,64") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every dim must be >= 1")
    return dims


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out {str(out)!r} must end in .onnx")
    from . import triton

    if args.triton is not None:
        triton.check_repository_target(args.triton)

    from . import api, onnx_export

    if "sampler" not in args.fused:
        for flag, value in (("--steps", args.steps), ("--spacing", args.spacing),
                            ("--eta", args.eta)):
            if value is not None:
                raise ValueError(f"{flag} applies to sampler graphs; add --fused sampler "
                                 f"(or drop {flag})")
    eta = 0.0 if args.eta is None else args.eta
    model, meta = api.load_source(args.checkpoint, args.scheduler_config, args.sample_shape)
    sampler_output = args.sampler_output or ("uint8" if meta.images else "float")
    steps = tuple(args.steps) if args.steps else (meta.distilled_steps[-1:] or (4,))
    options = onnx_export.ExportOptions(
        precision=args.precision, guidance=args.guidance, fused=tuple(dict.fromkeys(args.fused)),
        sampler_steps=tuple(dict.fromkeys(steps)), spacing=args.spacing, eta=eta,
        sampler_output=sampler_output, opset=args.opset,
        shared_weights=not args.no_shared_weights,
        variants=tuple(dict.fromkeys(t for t in args.target if t != "portable")),
    )
    onnx_export.check_options_against(meta, options)
    final = api.write_artifact(
        model, meta, out, options, check_parity=not args.no_check,
        gates={"fp32": args.min_psnr_fp32, "fp16": args.min_psnr_fp16,
               "bf16": args.min_psnr_bf16},
        check_n=args.check_n, verbose=args.verbose, source=str(args.checkpoint))
    for path in final:
        if path.suffix == ".onnx":
            print(path)
    if args.triton is not None:
        for folder in triton.write_repository(out, args.triton, triton.options_from(args)):
            print(folder)
    return 0


main = clitools.main_of(build_parser, body)
