"""Measure sample quality: FD-cls, conditional accuracy, precision/recall vs. steps.

FD-cls is the Fréchet distance in the features of a small classifier fewstep trains on
the same data (no Inception weights are available): it is NOT FID and its values are
not comparable to FID. The classifier is trained once and cached (--classifier); its
held-out accuracy on real images is reported with every row. For each seed a fresh
set of n generated images is compared with a fresh set of n real images; the
real-vs-real FD-cls of two disjoint real sets of the same n is the noise floor.

Checkpoints that are not distilled are sampled with plain DDIM (eta 0) at every
--steps; distilled checkpoints at their own step count (plus any --student-steps).
Samples come from the PyTorch reference sampler. Writes OUT (one JSON row per
checkpoint and step count, with the environment), OUT with the suffix .md (a Markdown
table) and, with --grid, a PNG: rows = step counts, columns = classes, DDIM next to
the distilled students, all from the same noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.runtime import clitools
from fewstep.runtime.fileio import check_writable_target, write_text

DEFAULT_STEPS = (1, 2, 4, 8, 16, 50)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__)
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT",
                   help="checkpoints of fewstep train / fewstep distill (same data and size)")
    p.add_argument("--out", type=Path, required=True, help="results .jsonl (and .md beside it)")
    p.add_argument("--steps", type=clitools.positive_int, nargs="+", default=list(DEFAULT_STEPS),
                   help="DDIM step counts for checkpoints that are not distilled")
    p.add_argument("--student-steps", type=clitools.positive_int, nargs="*", default=[],
                   help="extra step counts for distilled checkpoints (always: their own)")
    p.add_argument("--n", type=clitools.positive_int, default=2000,
                   help="images per generated set and per real set")
    p.add_argument("--seeds", type=clitools.positive_int, default=3,
                   help="independent sets per row (mean ± std over them)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance for checkpoints that are not distilled "
                        "(distilled ones are sampled as distilled: guidance 1)")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"], default=None,
                   help="timestep spacing (default: the distilled spacing, else the "
                        "schedule's: trailing for fewstep's own models)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="classifier file: loaded if it exists, else trained and saved there "
                        "(default: OUT's folder/classifier-<data>-<size>px.pt)")
    p.add_argument("--classifier-steps", type=clitools.positive_int, default=None,
                   help="classifier training steps (default 3000 on CUDA, 300 on CPU)")
    p.add_argument("--classifier-images", type=clitools.positive_int, default=None,
                   help="real training images of the classifier (default 30000 on CUDA, "
                        "3000 on CPU)")
    p.add_argument("--classifier-batch-size", type=clitools.positive_int, default=None,
                   help="classifier training batch (default 256 on CUDA, 64 on CPU)")
    p.add_argument("--classifier-heldout", type=clitools.positive_int, default=2000,
                   help="held-out real images for the classifier's accuracy")
    p.add_argument("--pr-k", type=clitools.positive_int, default=3,
                   help="k of the k-NN precision/recall estimate")
    p.add_argument("--data", default=None,
                   help="real images (default: the data the checkpoints were trained on)")
    p.add_argument("--grid", type=Path, default=None, help="also write a side-by-side PNG grid")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=clitools.positive_int, default=500,
                   help="images per sampler batch")
    p.add_argument("--workers", type=clitools.nonneg_int, default=None,
                   help="processes that load real images (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass
class Job:
    path: Path
    name: str
    ck: Any
    steps: int
    spacing: str
    guidance: float | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def distilled(self) -> tuple[int, ...]:
        return tuple(self.ck.meta.distilled_steps)


def model_name(path: Path) -> str:
    return path.parent.name if path.stem == "checkpoint" and path.parent.name else path.stem


def environment(device: Any) -> dict[str, Any]:
    import torch

    from fewstep.runtime import __version__

    env = {"fewstep": __version__, "python": platform.python_version(),
           "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "device": str(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _plan_jobs(args: argparse.Namespace, loaded: list[tuple[Path, Any]]) -> list[Job]:
    from fewstep.runtime.sampling import SamplingPlan, check_guidance, default_spacing

    jobs = []
    for path, ck in loaded:
        meta = ck.meta
        distilled = bool(meta.distilled_steps)
        counts = ((*meta.distilled_steps, *args.student_steps) if distilled else args.steps)
        spacing = args.spacing or default_spacing(meta)
        guidance = None if distilled else check_guidance(meta, args.guidance)
        for steps in dict.fromkeys(counts):
            SamplingPlan.create(meta, steps, spacing)  # refuse bad step counts before any work
            jobs.append(Job(path, model_name(path), ck, steps, spacing, guidance))
    return jobs


def _check_same_model(loaded: list[tuple[Path, Any]]) -> None:
    first_path, first = loaded[0]
    for path, ck in loaded[1:]:
        a, b = first.meta, ck.meta
        if (a.image_shape, a.num_classes, a.class_names) != (b.image_shape, b.num_classes,
                                                              b.class_names):
            raise ValueError(
                f"{str(path)!r} ({b.image_shape}, {b.num_classes} classes) and "
                f"{str(first_path)!r} ({a.image_shape}, {a.num_classes} classes) do not "
                "generate the same kind of images; evaluate them separately")


def _group(job: Job) -> str:
    """The grid column group: each DDIM model, and one per teacher for its students."""
    if not job.distilled:
        return f"DDIM {job.name}"
    teacher = str(job.ck.meta.train_config.get("distill", {}).get("teacher_source_hash", ""))
    return f"distilled from {teacher.split(':')[-1][:8]}"


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    from .quality import FD_NAME

    clf, floor = header["classifier"], header["fd_floor"]
    lines = [
        "# fewstep eval", "",
        f"**FD-cls** = {FD_NAME}: the FID formula in the feature space of a small classifier "
        "trained on the same data. It is not FID; its values are not comparable to FID.", "",
        f"- classifier: `{clf['path']}`, held-out accuracy {clf['heldout_accuracy']:.4f} on "
        f"{clf['heldout_images']} real images ({clf['steps']} training steps)",
        f"- n = {header['n']} images per set, seeds {header['seeds']} (mean ± std over seeds; "
        "each seed: a fresh generated set and a fresh real set)",
        f"- real-vs-real FD-cls floor (two disjoint real sets of n): {_fmt(floor)}",
        f"- device: {header['environment'].get('gpu') or header['environment']['device']}, "
        f"torch {header['environment']['torch']}",
        f"- command: `{header['command']}`", "",
        "| model | sampler | steps | FD-cls ↓ | cond. accuracy ↑ | precision ↑ | recall ↑ "
        "| sampling s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sampler = (f"distilled for {', '.join(map(str, r['distilled_steps']))}"
                   if r["distilled_steps"] else "DDIM")
        if r["guidance"] is not None:
            sampler += f", guidance {r['guidance']:g}"
        lines.append(
            f"| {r['model']} | {sampler} | {r['steps']} | {_fmt(r['fd_cls'])} | "
            f"{_fmt(r['conditional_accuracy'])} | {_fmt(r['precision'])} | "
            f"{_fmt(r['recall'])} | {r['sample_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _grid_png(cells: dict[tuple[str, int], np.ndarray], groups: list[str], rows: list[int],
              columns: list[str], path: Path) -> None:
    from PIL import Image, ImageDraw

    from fewstep.runtime.fileio import atomic_path

    sample = next(iter(cells.values()))
    k, h, w, _ = sample.shape
    scale = max(1, 64 // max(h, w))
    cw, ch, pad, left, top = w * scale, h * scale, 2, 64, 30
    block = k * (cw + pad) + 12
    width, height = left + len(groups) * block, top + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for gi, g in enumerate(groups):
        x0 = left + gi * block
        draw.text((x0, 2), g[: block // 6], fill=(0, 0, 0))
        for c, name in enumerate(columns):
            draw.text((x0 + c * (cw + pad), 16), name[: max(1, cw // 6)], fill=(90, 90, 90))
    for ri, steps in enumerate(rows):
        y0 = top + ri * (ch + pad)
        draw.text((4, y0 + ch // 2 - 5), f"{steps} step{'s' * (steps > 1)}", fill=(0, 0, 0))
        for gi, g in enumerate(groups):
            images = cells.get((g, steps))
            if images is None:
                continue
            for c in range(k):
                tile = Image.fromarray(images[c]).resize((cw, ch), Image.Resampling.NEAREST)
                canvas.paste(tile, (left + gi * block + c * (cw + pad), y0))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        canvas.save(f, format="PNG")


def body(args: argparse.Namespace) -> int:
    out = check_writable_target(args.out)
    md_path = out.with_suffix(".md")
    if md_path == out:
        raise ValueError(f"--out {str(out)!r}: pass a .jsonl path (the table goes beside it "
                         "as .md)")
    if args.grid is not None:
        check_writable_target(args.grid)
    if args.guidance is not None and not 0 <= args.guidance <= 50:
        raise ValueError(f"--guidance {args.guidance} must be in [0, 50]; 1 = no guidance")

    from fewstep.runtime.images import to_uint8_nhwc

    from . import checkpoint as ckpt_io
    from . import quality, reference
    from .fit import pick_device

    err = sys.stderr

    def say(msg: str) -> None:
        print(msg, file=err, flush=True)

    t_all = time.perf_counter()
    device = pick_device(args.device)
    loaded = [(Path(p), ckpt_io.load(p)) for p in args.checkpoints]
    _check_same_model(loaded)
    jobs = _plan_jobs(args, loaded)
    meta0 = loaded[0][1].meta
    spec = args.data or str(meta0.train_config.get("data", ""))
    if not spec:
        raise ValueError(f"{str(loaded[0][0])!r} does not record its training data; pass "
                         "--data landscapes or --data FOLDER")
    data_seed = int(meta0.train_config.get("seed", 0))
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if cuda else 0)
    real = quality.RealData(spec, meta0.height, data_seed, workers)
    if meta0.conditional and real.class_names != tuple(meta0.class_names):
        raise ValueError(f"data {spec!r} has classes {', '.join(real.class_names)} but the "
                         f"checkpoints have {', '.join(meta0.class_names)}; pass --data")
    config = quality.ClassifierConfig(
        data=spec, image_size=meta0.height, data_seed=data_seed,
        steps=args.classifier_steps or (3000 if cuda else 300),
        images=args.classifier_images or (30_000 if cuda else 3000),
        batch_size=args.classifier_batch_size or (256 if cuda else 64),
        heldout=args.classifier_heldout)
    clf_path = args.classifier or out.parent / (
        f"classifier-{Path(spec).name or 'data'}-{meta0.height}px.pt")
    t0 = time.perf_counter()
    clf = quality.obtain_classifier(clf_path, config, real, device, not args.no_progress, say)
    t_clf = time.perf_counter() - t0
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    refs, floor = [], []
    for s in seeds:
        (a, la), (b, _) = real.reference_sets(s, args.n)
        fa, _ = quality.embed(clf.model, a, device)
        fb, _ = quality.embed(clf.model, b, device)
        refs.append((fa, la))
        floor.append(quality.fd(fb, fa))
    floor_stat = quality.mean_std(floor)
    if len(refs[0][1]) < args.n:
        say(f"warning: {spec!r} gives {len(refs[0][1])} real images per set, fewer than "
            f"--n {args.n}")
    say(f"real sets: {len(seeds)} x 2 x {len(refs[0][1])} images in "
        f"{time.perf_counter() - t0:.1f} s; real-vs-real FD-cls floor {_fmt(floor_stat)}")
    env = environment(device)
    command = shlex.join(["fewstep", "eval", *_ARGV])
    header = {"classifier": clf.describe(clf_path), "fd_floor": floor_stat, "n": args.n,
              "seeds": seeds, "environment": env, "command": command}
    k = meta0.num_classes or 6
    la0 = refs[0][1]
    pick = ([int(np.flatnonzero(la0 == c)[0]) if np.any(la0 == c) else 0 for c in range(k)]
            if meta0.conditional else list(range(min(k, len(la0)))))
    cells: dict[tuple[str, int], np.ndarray] = {}
    groups: list[str] = []
    rows: list[dict[str, Any]] = []
    current = None
    for job in jobs:
        meta = job.ck.meta
        if current is not job.ck:
            model, current = job.ck.build_model(), job.ck
        fds, accs, precs, recs, per_class = [], [], [], [], []
        t0 = time.perf_counter()
        for s, (fa, la) in zip(seeds, refs, strict=True):
            labels = la.tolist() if meta.conditional else None
            x = reference.sample(model, meta, len(la), job.steps, seed=s, labels=labels,
                                 guidance=job.guidance, spacing=job.spacing,
                                 batch_size=args.batch_size, device=device)
            images = to_uint8_nhwc(x)  # judged as the runtime delivers them: uint8
            feats, pred = quality.embed(clf.model, images, device)
            fds.append(quality.fd(feats, fa))
            if meta.conditional:
                acc, per = quality.conditional_accuracy(pred, la, meta.num_classes)
                accs.append(acc)
                per_class.append(per)
            if len(la) > args.pr_k:
                p, r = quality.precision_recall(fa, feats, args.pr_k, device)
                precs.append(p)
                recs.append(r)
            if s == seeds[0]:
                group = _group(job)
                if not job.distilled or job.steps in job.distilled:
                    cells[(group, job.steps)] = images[pick]
                    groups += [] if group in groups else [group]
        seconds = time.perf_counter() - t0
        distill_info = meta.train_config.get("distill", {}) if job.distilled else {}
        row = {
            "model": job.name, "checkpoint": str(job.path), "source_hash": meta.source_hash,
            "distilled_steps": list(job.distilled), "steps": job.steps, "spacing": job.spacing,
            "eta": 0.0, "guidance": job.guidance,
            "teacher_guidance": distill_info.get("teacher_guidance") if job.distilled else None,
            "n": len(refs[0][1]), "seeds": seeds, "metric": quality.FD_NAME,
            "fd_cls": quality.mean_std(fds), "fd_cls_real_floor": floor_stat,
            "conditional_accuracy": quality.mean_std(accs) if accs else None,
            "conditional_accuracy_per_class": (
                [None if any(p[c] is None for p in per_class) else
                 float(np.mean([p[c] for p in per_class])) for c in range(meta.num_classes)]
                if per_class else None),
            "class_names": list(meta.class_names),
            "precision": quality.mean_std(precs) if precs else None,
            "recall": quality.mean_std(recs) if recs else None, "pr_k": args.pr_k,
            "classifier": header["classifier"], "sample_seconds": round(seconds, 3),
            "images_per_s": round(len(seeds) * len(refs[0][1]) / max(seconds, 1e-9), 1),
            "environment": env, "command": command,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        rows.append(row)
        say(f"{job.name} {'distilled' if job.distilled else 'DDIM'} {job.steps:>3} steps: "
            f"FD-cls {_fmt(row['fd_cls'])} (floor {floor_stat['mean']:.3f}), cond. acc "
            f"{_fmt(row['conditional_accuracy'])}, precision {_fmt(row['precision'], 2)}, "
            f"recall {_fmt(row['recall'], 2)} [{seconds:.1f} s]")
        write_text(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        write_text(md_path, markdown(rows, header))
    written = [out, md_path]
    if args.grid is not None and cells:
        names = list(meta0.class_names) if meta0.conditional else [
            f"#{i}" for i in range(len(pick))]
        steps_rows = sorted({s for (_, s) in cells})
        _grid_png(cells, groups, steps_rows, names, args.grid)
        written.append(args.grid)
    say(f"eval done in {time.perf_counter() - t_all:.1f} s (classifier {t_clf:.1f} s, "
        f"{len(rows)} rows)")
    for path in written:
        print(path)
    return 0


_ARGV: list[str] = []


def main(argv: Sequence[str] | None = None, prog: str = "fewstep") -> int:
    """``clitools.main_of(build_parser, body)``, keeping argv for the rows' command field."""
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    return clitools.main_of(build_parser, body)(argv, prog)
