"""Generate images with an exported model and save them as a grid or one file each.

Runs with numpy and ONNX Runtime (or TensorRT for a .plan); no PyTorch. The model
defaults to the one shipped with fewstep; --steps defaults to the step count the
model was distilled for. --out writes one image: a grid with a white frame, or with
--n 1 the plain image; its format follows the extension (.png, .jpg, .webp, .bmp,
...). --out-dir writes one PNG per image instead (SEED-INDEX.png). Progress
(backend, graph, time; a progress bar on a terminal) goes to stderr; the paths
written, one a line, alone go to stdout. Images are the same for the same --seed
whatever --batch-size or backend. img2img: --init-image with --strength < 1;
inpainting: also --mask (white = regenerate, black = keep). An init image or mask
of another size than the model's is resized, with a warning saying so. A model whose
samples are not images (a diffusion policy's action sequences, ...) writes .npy: --out
FILE.npy holds all samples (n, *sample_shape) float32, --out-dir one SEED-INDEX.npy
each; its conditioning inputs come from --cond NAME=FILE.npy (one value for all
samples, or one per sample).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from . import artifact, clitools, ddim, fileio, images, sampling
from .errors import inert
from .meta import GRAPH_KINDS, ModelMeta

DEFAULT_STRENGTH = 0.75
MAX_N = 10_000  # images per run: one grid; more is a batch job (call Pipeline.generate)
PROGRESS_DELAY = 1.0  # seconds of sampling before a progress bar appears on a terminal
MAX_SCALE = 64  # grid enlargement; the grid itself is also capped (images.MAX_GRID_PIXELS)


def _resolve(backend: str, path: str) -> str:
    from .backends import resolve

    return resolve(backend, path)


def quick_start_options_here() -> dict[str, str]:
    """``ort_options.quick_start_options`` for the onnxruntime installed here."""
    from .backends.ort import installed_version
    from .backends.ort_options import quick_start_options

    return quick_start_options(installed_version())


def start_options(backend: str, model: Path | None, search: str,
                  graph: str = "auto") -> dict[str, Any]:
    """``Pipeline.load`` options of ``--cudnn-search`` and ``--graph``: on ort-cuda (named,
    or what ``auto`` picks for this model) ``heuristic`` gives
    ``ort_options.quick_start_options`` and ``--graph auto`` the step graph first."""
    opts: dict[str, Any] = {} if graph == "auto" else {"prefer": graph}
    if search == "exhaustive" and graph != "auto":
        return opts
    from .pipeline import default_model_path

    path = artifact.locate(model if model is not None else default_model_path())
    if _resolve(backend, str(path)) != "ort-cuda":
        return opts
    if graph == "auto":
        opts["prefer"] = "step"
    if search != "exhaustive":
        opts["cuda_options"] = quick_start_options_here()
    return opts


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("--model", type=Path, default=None,
                   help="model.onnx (its .step/.sampler-N siblings are used too), a TensorRT "
                        ".plan, or an .oracle.json; default: the shipped model")
    p.add_argument("--backend", default="auto",
                   help="auto, ort, ort-cpu, ort-cuda, ort-tensorrt, tensorrt or oracle")
    p.add_argument("--cudnn-search", choices=("heuristic", "exhaustive"), default="heuristic",
                   help="ort-cuda only: heuristic (default) lets cuDNN pick convolution "
                        "algorithms from its heuristics, so the first image comes seconds "
                        "sooner and each image is a little slower (H200, a model with its "
                        "fp16 ORT-CUDA variant: load + first image 11.1 -> 2.0 s, +5 %% per "
                        "image); exhaustive times every algorithm at the first call and, "
                        "on an ORT-CUDA variant, uses cuDNN's fused convolution + bias: the "
                        "library's default, the fastest images for a long run")
    p.add_argument("--graph", choices=("auto", *GRAPH_KINDS), default="auto",
                   help="which of the model's graphs to try first: auto (default) takes the "
                        "step graph on ort-cuda, where the fused sampler's unrolled loop "
                        "pays cuDNN's first use once per convolution, four times the step "
                        "graph's (measured: see the README's time to first image), and the "
                        "fastest graph per call elsewhere; sampler, step or denoiser to "
                        "choose (a kind the model lacks, or that cannot do what is asked, "
                        "falls back to the others)")
    p.add_argument("--n", type=clitools.bounded_int(1, MAX_N, "the most images one grid holds"),
                   default=16, help=f"number of images, at most {MAX_N}")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: the step count the model was distilled for, "
                        "else that of its fused sampler graph, else "
                        f"{sampling.FALLBACK_STEPS})")
    p.add_argument("--eta", type=float, default=0.0,
                   help="0 = deterministic DDIM, 1 = DDPM-like ancestral noise")
    p.add_argument("--seed", type=clitools.nonneg_int, default=0,
                   help="image i of a seed is always the same image")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="class names or indices: one for all images, or one per image "
                        "(default: cycle through the classes)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 0 to 50 (default: none, the plain "
                        "conditional model, the same as 1; 0 = unconditional; above 1 pushes "
                        "images further toward their label; diffusers' usual 7.5 is far too "
                        "strong for these models; needs a graph exported with --guidance)")
    p.add_argument("--spacing", choices=ddim.SPACINGS, default=None,
                   help="timestep spacing (default: the model's distilled spacing, else "
                        "its schedule's: trailing for fewstep's own models)")
    p.add_argument("--init-image", type=Path, default=None,
                   help="start from this image (img2img); another size is resized to the "
                        "model's, with a warning (pass a single image, not a grid)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"img2img strength in (0, 1]; 1 ignores the image (default "
                        f"{DEFAULT_STRENGTH} with --init-image)")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting mask (white = regenerate, black = keep the init image); "
                        "another size is resized to the model's, with a warning")
    p.add_argument("--batch-size", type=clitools.positive_int, default=None,
                   help="images per graph call (default: 16, or the graph's limit)")
    p.add_argument("--nrow", type=clitools.positive_int, default=None,
                   help="images per grid row (default: one column per class when the labels "
                        "cycle through the classes, else a square grid)")
    p.add_argument("--scale", type=clitools.bounded_int(1, MAX_SCALE, "the largest enlargement"),
                   default=4,
                   help=f"enlarge the images this many times (nearest neighbour), at most "
                        f"{MAX_SCALE}; a written image may have at most "
                        f"{images.MAX_GRID_PIXELS // 1_000_000} megapixels")
    p.add_argument("--cond", action="append", default=[], metavar="NAME=FILE.npy",
                   help="a conditioning input of the model from a .npy file: its shape, or "
                        "(n, *its shape) (repeatable; `fewstep info` lists the inputs)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, default=None,
                     help="the image to write: a grid, or with --n 1 the image alone; its "
                          "extension picks the format (.png, .jpg, .webp, .bmp, ... any "
                          "Pillow writes)")
    out.add_argument("--out-dir", type=Path, default=None,
                     help="write each image to its own PNG file in this folder (made if "
                          "missing), named SEED-INDEX.png: image i of --seed S is S-000i.png")
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


def check_grid(meta: ModelMeta, n: int, nrow: int | None, scale: int, fmt: str,
               pad: int = images.GRID_PAD) -> None:
    """A ValueError naming --n/--scale and the fix when the grid (``pad`` 0: one image)
    would be too large (to hold in memory, or for the format), before any image is
    generated."""
    _, h, w = meta.image_shape
    gh, gw = images.grid_size(n, h, w, nrow, pad)
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
    what = f"--n {n} images of {w}x{h}" if pad else f"an image of {w}x{h}"
    raise ValueError(f"{what} at --scale {scale} make{'' if pad else 's'} a {gw * scale}x"
                     f"{gh * scale} {'grid' if pad else 'image'}, over {limit}; {fix}")


def check_out_dir(folder: Path) -> Path:
    """``--out-dir``: an existing writable folder, or one that can be made in one; a
    ValueError naming what is wrong otherwise. Nothing is created here."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out-dir {str(folder)!r} is a file, not a folder; pass a folder "
                         "(it is made when missing)")
    parent = folder if folder.is_dir() else (folder.parent if str(folder.parent) else Path("."))
    if not parent.is_dir():
        raise ValueError(f"--out-dir {str(folder)!r}: folder {str(parent)!r} does not exist; "
                         "create it or pass another --out-dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {str(folder)!r}: folder {str(parent)!r} is not writable; "
                         "pass another --out-dir")
    return folder


def image_names(seed: int, n: int) -> list[str]:
    """``SEED-INDEX.png`` for images 0..n-1 (at least 4 digits, as many as n needs)."""
    width = max(4, len(str(n - 1)))
    return [f"{seed}-{i:0{width}d}.png" for i in range(n)]


def body(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    err = sys.stderr
    arrays = args.out is not None and args.out.suffix.lower() == ".npy"
    cond = read_cond(args.cond)
    if args.out is not None:
        target: Path | None = fileio.check_writable_target(args.out)  # before any work
        fmt = "NPY" if arrays else images.image_format(args.out)
    else:
        target = None
        out_dir = check_out_dir(args.out_dir)
        fmt = "PNG"
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
        pipe = Pipeline.load(args.model, backend=args.backend,
                             **start_options(args.backend, args.model, args.cudnn_search,
                                             args.graph))
        # Said with the first finished batch: a run that fails before prints only its error.
        loaded = (f"model {pipe.source} on {pipe.backend} "
                  f"(loaded in {time.perf_counter() - started:.2f} s)")
        steps = args.steps
        if steps is None:
            steps = pipe.default_steps(args.spacing, args.eta)
        if not pipe.meta.images or arrays:
            return _sample_arrays(args, pipe, steps, target, cond, loaded)
        nrow = args.nrow
        k = pipe.meta.num_classes
        if nrow is None and args.labels is None and 1 < k <= args.n:
            nrow = k  # labels cycle, so every column is one class
        c, h, w = pipe.meta.image_shape
        single = target is None or args.n == 1
        if target is not None:
            fmt = images.image_format(target, c)  # the model's channels may not fit the format
        if single:
            check_grid(pipe.meta, 1, 1, args.scale, fmt, pad=0)
        else:
            check_grid(pipe.meta, args.n, nrow, args.scale, fmt)

        # A bar on a terminal (once the run takes PROGRESS_DELAY); elsewhere a line per
        # batch, at most one every 10 s, and the last.
        bar = clitools.Progress(args.n, "sample", unit="image", delay=PROGRESS_DELAY)
        throttle = clitools.Throttle(10.0)

        shown = 0

        def progress(done: int, total: int) -> None:
            nonlocal loaded, shown
            if loaded:
                bar.line(loaded)
                loaded = ""
            bar.advance(done - shown)
            shown = done
            if not bar.drawing and (done == total or throttle()):
                print(f"  {done}/{clitools.plural(total, 'image')}", file=err)

        try:
            with bar:
                made = pipe.generate(
                    args.n, steps, eta=args.eta, seed=args.seed, labels=labels,
                    guidance=args.guidance, spacing=args.spacing, init_image=args.init_image,
                    strength=strength, mask=args.mask, batch_size=args.batch_size,
                    progress=progress, cond=cond or None,
                )
        except MemoryError:
            need = args.n * c * h * w * 4 / 2**30
            raise ValueError(
                f"--n {args.n}: out of memory generating {args.n} images of {c}x{h}x{w} "
                f"(about {need:.1f} GiB as float32 plus the model's working memory); pass a "
                "smaller --n or --batch-size") from None
    print(ran(pipe, clitools.plural(args.n, "image")), file=err)
    if target is not None:
        images.save_image(made[0] if args.n == 1 else images.grid(made, nrow), target,
                          scale=args.scale, format=fmt)
        print(target)
        return 0
    out_dir.mkdir(exist_ok=True)
    for image, name in zip(made, image_names(args.seed, args.n), strict=True):
        images.save_image(image, out_dir / name, scale=args.scale, format=fmt)
        print(out_dir / name)
    return 0


MAX_COND_FILE_BYTES = 256 * 1024**2


def read_cond(items: list[str]) -> dict[str, Any]:
    """--cond NAME=FILE.npy values as {name: array}: plain .npy files (no pickles) of at
    most MAX_COND_FILE_BYTES, each named once."""
    import numpy as np

    out: dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--cond {inert(item, 200)!r} is not NAME=FILE.npy")
        if name in out:
            raise ValueError(f"--cond {inert(name, 80)!r} given twice; pass each input once")
        f = Path(path)
        try:
            size = f.stat().st_size
            if size > MAX_COND_FILE_BYTES:
                raise ValueError(f"--cond {inert(name, 80)}: {inert(path, 200)!r} has {size:,} "
                                 f"bytes, more than {MAX_COND_FILE_BYTES:,}")
            out[name] = np.load(f, allow_pickle=False)
        except OSError as e:
            raise ValueError(f"--cond {inert(name, 80)}: cannot read {inert(path, 200)!r} "
                             f"({e.strerror or e}); pass a .npy file") from None
        except ValueError as e:
            if "--cond" in str(e):
                raise
            raise ValueError(f"--cond {inert(name, 80)}: {inert(path, 200)!r} is not a plain "
                             f".npy array ({inert(str(e), 200)}); save it with "
                             "numpy.save") from None
    return out


def ran(pipe: Any, what: str) -> str:
    """One line on how the last generate ran: what, steps, spacing, path, graph, time."""
    info = pipe.last_info
    assert info is not None
    return (f"{what}, {clitools.plural(info.steps, 'step')} ({info.spacing}, "
            f"eta={info.eta:g}) via the {info.path} path: {info.graph} [{info.backend}], "
            f"{info.seconds:.2f} s")


def _save_npy(path: Path, array: Any) -> None:
    import numpy as np

    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _sample_arrays(args: argparse.Namespace, pipe: Any, steps: int, target: Path | None,
                   cond: dict[str, Any], loaded: str) -> int:
    """Samples of any model as .npy: one file with all, or one per sample."""

    err = sys.stderr
    if target is not None and target.suffix.lower() != ".npy":
        raise ValueError(f"--out {str(target)!r}: this model's samples are "
                         f"{pipe.meta.sample_shape} arrays, not images; write a .npy file")
    for flag, value in (("--init-image", args.init_image), ("--mask", args.mask)):
        if value is not None and not pipe.meta.images:
            raise ValueError(f"{flag} needs an image model; this model's samples are arrays")
    print(loaded, file=err)
    made = pipe.generate(args.n, steps, eta=args.eta, seed=args.seed, labels=(
        args.labels[0] if args.labels and len(args.labels) == 1 else args.labels),
        guidance=args.guidance, spacing=args.spacing, init_image=args.init_image,
        strength=1.0 if args.strength is None else args.strength, mask=args.mask,
        batch_size=args.batch_size, cond=cond or None, output="samples")
    print(ran(pipe, f"{clitools.plural(args.n, 'sample')} {tuple(made.shape[1:])}"),
          file=err)
    if target is not None:
        _save_npy(target, made)
        print(target)
        return 0
    out_dir = check_out_dir(args.out_dir)
    out_dir.mkdir(exist_ok=True)
    for sample, name in zip(made, image_names(args.seed, args.n), strict=True):
        path = out_dir / (Path(name).stem + ".npy")
        _save_npy(path, sample)
        print(path)
    return 0


main = clitools.main_of(build_parser, body)
