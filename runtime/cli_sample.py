"""Generate images with an exported model and save them as one image grid.

Runs with numpy and ONNX Runtime (or TensorRT for a .plan); no PyTorch. The model
defaults to the one shipped with fewstep; --steps defaults to the step count the
model was distilled for. Progress (backend, graph, time) goes to stderr; the path
of the written grid alone goes to stdout. The grid's format follows the --out
extension (.png, .jpg, .webp, .bmp, ...). Images are the same for the same --seed
whatever --batch-size or backend. img2img: --init-image with --strength < 1;
inpainting: also --mask (white = regenerate, black = keep).
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

from . import artifact, clitools, ddim, fileio, images, sampling
from .meta import ModelMeta

DEFAULT_STRENGTH = 0.75
FALLBACK_STEPS = 4  # when the model records no distilled steps and has no sampler graph
MAX_N = 10_000  # images per run: one grid; more is a batch job (call Pipeline.generate)
MAX_SCALE = 64  # grid enlargement; the grid itself is also capped (images.MAX_GRID_PIXELS)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="model.onnx (its .step/.sampler-N siblings are used too), a TensorRT "
                        ".plan, or an .oracle.json; default: the shipped model")
    p.add_argument("--backend", default="auto",
                   help="auto, ort, ort-cpu, ort-cuda, ort-tensorrt, tensorrt or oracle")
    p.add_argument("--n", type=clitools.bounded_int(1, MAX_N, "the most images one grid holds"),
                   default=16, help=f"number of images, at most {MAX_N}")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: the step count the model was distilled for, "
                        "else that of its fused sampler graph, else "
                        f"{FALLBACK_STEPS})")
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
                        "its schedule's: trailing for fewstep's own models)")
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
    p.add_argument("--scale", type=clitools.bounded_int(1, MAX_SCALE, "the largest enlargement"),
                   default=4,
                   help=f"enlarge the grid this many times (nearest neighbour), at most "
                        f"{MAX_SCALE}; the grid may have at most "
                        f"{images.MAX_GRID_PIXELS // 1_000_000} megapixels")
    p.add_argument("--out", type=Path, required=True,
                   help="the grid to write; its extension picks the format (.png, .jpg, "
                        ".webp, .bmp, ... any Pillow writes)")
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


def default_steps(meta: ModelMeta, graphs: list[dict[str, Any]], spacing: str | None,
                  eta: float) -> int:
    """--steps when not given: the model's distilled step count (the last recorded, as
    `fewstep export` picks it), else the steps of its fused sampler graph (one baked for
    this spacing and eta first, fewest steps first), else ``FALLBACK_STEPS``."""
    if meta.distilled_steps:
        return meta.distilled_steps[-1]
    spacing = spacing or sampling.default_spacing(meta)
    samplers = [g for g in graphs if g.get("kind") == "sampler"]
    if not samplers:
        return FALLBACK_STEPS
    best = min(samplers, key=lambda g: (g.get("spacing") != spacing or
                                         abs(float(g.get("eta", 0.0)) - eta) > 1e-9,
                                         int(g["steps"])))
    return int(best["steps"])


def check_grid(meta: ModelMeta, n: int, nrow: int | None, scale: int, fmt: str) -> None:
    """A ValueError naming --n/--scale and the fix when the grid would be too large (to
    hold in memory, or for the --out format), before any image is generated."""
    _, h, w = meta.image_shape
    gh, gw = images.grid_size(n, h, w, nrow)
    side = images.MAX_SIDE.get(fmt)
    if gh * gw * scale * scale <= images.MAX_GRID_PIXELS and (
            side is None or max(gh, gw) * scale <= side):
        return
    fits = int((images.MAX_GRID_PIXELS / (gh * gw)) ** 0.5)
    if side is not None:
        fits = min(fits, side // max(gh, gw))
    limit = (f"the {fmt} limit of {side} pixels a side" if side is not None and
             max(gh, gw) * scale > side else
             f"the limit of {images.MAX_GRID_PIXELS // 1_000_000} megapixels")
    if nrow is not None and nrow > n:
        fix = f"pass --nrow {n} or less"
    elif fits >= 1:
        fix = f"pass --scale {fits} or less, or a smaller --n"
    else:
        fix = "pass a smaller --n" + (" or write a .png" if side is not None else "")
    raise ValueError(f"--n {n} images of {w}x{h} at --scale {scale} make a {gw * scale}x"
                     f"{gh * scale} grid, over {limit}; {fix}")


def body(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    err = sys.stderr
    target = fileio.check_writable_target(args.out)  # before any work
    fmt = images.image_format(target)
    artifact.check_model_path(args.model, "--model ")
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
        # Said with the first finished batch: a run that fails before prints only its error.
        loaded = (f"model {pipe.source} on {pipe.backend} "
                  f"(loaded in {time.perf_counter() - started:.2f} s)")
        steps = args.steps
        if steps is None:
            steps = default_steps(pipe.meta, pipe.describe()["graphs"], args.spacing,
                                  args.eta)
        nrow = args.nrow
        k = pipe.meta.num_classes
        if nrow is None and args.labels is None and 1 < k <= args.n:
            nrow = k  # labels cycle, so every column is one class
        c, h, w = pipe.meta.image_shape
        fmt = images.image_format(target, c)  # the model's channels may not fit the format
        check_grid(pipe.meta, args.n, nrow, args.scale, fmt)

        def progress(done: int, total: int) -> None:
            nonlocal loaded
            if loaded:
                print(loaded, file=err)
                loaded = ""
            print(f"  {done}/{total} images", file=err)

        try:
            made = pipe.generate(
                args.n, steps, eta=args.eta, seed=args.seed, labels=labels,
                guidance=args.guidance, spacing=args.spacing, init_image=args.init_image,
                strength=strength, mask=args.mask, batch_size=args.batch_size,
                progress=progress,
            )
        except MemoryError:
            need = args.n * c * h * w * 4 / 2**30
            raise ValueError(
                f"--n {args.n}: out of memory generating {args.n} images of {c}x{h}x{w} "
                f"(about {need:.1f} GiB as float32 plus the model's working memory); pass a "
                "smaller --n or --batch-size") from None
    info = pipe.last_info
    assert info is not None
    print(f"{info.n} images, {info.steps} steps ({info.spacing}, eta={info.eta:g}) via the "
          f"{info.path} path: {info.graph} [{info.backend}], {info.seconds:.2f} s", file=err)
    images.save_image(images.grid(made, nrow), target, scale=args.scale, format=fmt)
    print(target)
    return 0


main = clitools.main_of(build_parser, body)
