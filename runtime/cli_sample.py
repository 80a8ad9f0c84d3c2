"""Generate images with an exported model and save them as one PNG grid.

Runs with numpy and ONNX Runtime (or TensorRT for a .plan); no PyTorch. The model
defaults to the one shipped with fewstep. Progress (backend, graph, time) goes to
stderr; the path of the written grid alone goes to stdout. Images are the same
for the same --seed whatever --batch-size or backend. img2img: --init-image with
--strength < 1; inpainting: also --mask (white = regenerate, black = keep).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from . import clitools, ddim, fileio

DEFAULT_STRENGTH = 0.75


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="model.onnx (its .step/.sampler-N siblings are used too), a TensorRT "
                        ".plan, or an .oracle.json; default: the shipped model")
    p.add_argument("--backend", default="auto",
                   help="auto, ort, ort-cpu, ort-cuda, ort-tensorrt, tensorrt or oracle")
    p.add_argument("--n", type=clitools.positive_int, default=16, help="number of images")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0,
                   help="0 = deterministic DDIM, 1 = DDPM-like ancestral noise")
    p.add_argument("--seed", type=clitools.nonneg_int, default=0,
                   help="image i of a seed is always the same image")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="class names or indices: one for all images, or one per image "
                        "(default: cycle through the classes)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (needs a graph exported with --guidance)")
    p.add_argument("--spacing", choices=ddim.SPACINGS, default=None,
                   help="timestep spacing (default: the model's distilled spacing, else "
                        "trailing)")
    p.add_argument("--init-image", type=Path, default=None,
                   help="start from this image (img2img)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"img2img strength in (0, 1]; 1 ignores the image (default "
                        f"{DEFAULT_STRENGTH} with --init-image)")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting mask (white = regenerate, black = keep the init image)")
    p.add_argument("--batch-size", type=clitools.positive_int, default=None,
                   help="images per graph call (default: 16, or the graph's limit)")
    p.add_argument("--nrow", type=clitools.positive_int, default=None,
                   help="images per grid row (default: one column per class when the labels "
                        "cycle through the classes, else a square grid)")
    p.add_argument("--scale", type=clitools.positive_int, default=4,
                   help="enlarge the grid this many times (nearest neighbour)")
    p.add_argument("--out", type=Path, required=True, help="the PNG grid to write")
    return p


@contextmanager
def one_line_warnings(stream: TextIO) -> Iterator[None]:
    """Show warnings as ``warning: message`` lines (no file/line noise) meanwhile."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        print(f"warning: {message}", file=stream)

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        warnings.showwarning = previous


def body(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    err = sys.stderr
    target = fileio.check_writable_target(args.out)  # before any work
    strength = args.strength
    if args.init_image is None:
        if args.mask is not None:
            raise ValueError("--mask needs --init-image (the pixels to keep); pass both")
        if strength is not None and strength != 1.0:
            raise ValueError(f"--strength {strength} needs --init-image; pass an image or drop "
                             "--strength")
        strength = 1.0
    elif strength is None:
        strength = 1.0 if args.mask is not None else DEFAULT_STRENGTH
    labels: Any = args.labels
    if labels is not None and len(labels) == 1:
        labels = labels[0]
    with one_line_warnings(err):
        started = time.perf_counter()
        pipe = Pipeline.load(args.model, backend=args.backend)
        print(f"model {pipe.source} on {pipe.backend} "
              f"(loaded in {time.perf_counter() - started:.2f} s)", file=err)

        def progress(done: int, total: int) -> None:
            print(f"  {done}/{total} images", file=err)

        images = pipe.generate(
            args.n, args.steps, eta=args.eta, seed=args.seed, labels=labels,
            guidance=args.guidance, spacing=args.spacing, init_image=args.init_image,
            strength=strength, mask=args.mask, batch_size=args.batch_size, progress=progress,
        )
    info = pipe.last_info
    assert info is not None
    print(f"{info.n} images, {info.steps} steps ({info.spacing}, eta={info.eta:g}) via the "
          f"{info.path} path: {info.graph} [{info.backend}], {info.seconds:.2f} s", file=err)
    nrow = args.nrow
    k = pipe.meta.num_classes
    if nrow is None and args.labels is None and 1 < k <= args.n:
        nrow = k  # labels cycle, so every column is one class
    Pipeline.save_grid(images, target, nrow=nrow, scale=args.scale)
    print(target)
    return 0


main = clitools.main_of(build_parser, body)
