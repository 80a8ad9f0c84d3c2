"""Pipeline: load an exported model, generate images. numpy + a backend, no torch.

``Pipeline.load(path)`` opens ``model.onnx`` (or a TensorRT ``.plan``, or an
``.oracle.json``) and knows its sibling graphs (``model.step.onnx``,
``model.sampler-4.onnx``, ...), which it opens on first use. ``generate`` picks the
fastest graph that can do what was asked:

1. ``sampler``: a fused whole-loop graph baked for exactly these steps, spacing and η
   (not for img2img or inpainting);
2. ``step``: the fused DDIM-step graph driven by ``graph.run_loop`` (x stays on the
   device); with a mask, ``step-blend``: one step per call and the inpainting blend
   on the host in between;
3. ``denoiser``: the network alone, the DDIM update on the host (``sampling.run_loop``).

Every path uses the same host noise (``noise.generation_noise``: image i of a seed
has its own stream), so an image is the same whatever the batch split, the graph
or the backend, and the same as ``fewstep.train.reference.sample`` gives for the
same arguments, up to float rounding.

One Pipeline may be used from several threads at once: graphs are opened under a
lock, ONNX Runtime sessions are thread-safe and device-resident state is locked
per graph by its backend.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from . import artifact, backends, ddim, sampling
from . import noise as host_noise
from .backends import Array, Graph
from .errors import ArtifactError, NumericalError, inert
from .fileio import check_writable_target
from .images import (
    from_uint8_nhwc,
    grid,
    load_image,
    load_mask,
    nonfinite_images,
    save_image,
    to_uint8_nhwc,
)
from .meta import ModelMeta
from .sampling import SamplingPlan

DEFAULT_MODEL: Final = "landscapes.onnx"
DEFAULT_BATCH: Final = 16
ORACLE_EXT: Final = ".oracle.json"
NUMERIC_FIX: Final = "fp16 overflow? export with --precision fp32 or keep more fp32 islands"

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]
ImageInput = str | os.PathLike[str] | NDArray[Any]
Progress = Callable[[int, int], None]


def default_model_path() -> Path:
    """The model shipped in ``fewstep.runtime.models``, or an ArtifactError."""
    from . import models

    folder = Path(models.__file__).parent if models.__file__ else Path(__file__).parent / "models"
    path = folder / DEFAULT_MODEL
    if not path.is_file():
        raise ArtifactError(
            f"this build of fewstep ships no default model ({DEFAULT_MODEL} is not in "
            f"{str(folder)!r}); pass --model PATH to a model.onnx made by `fewstep export`"
        )
    return path


def meta_summary(meta: ModelMeta) -> dict[str, Any]:
    """The model-level fields of a ModelMeta (no per-graph fields), JSON-ready."""
    s = meta.schedule
    return {
        "prediction_type": meta.prediction_type,
        "schedule": {
            "beta_schedule": s.beta_schedule, "num_train_timesteps": s.num_train_timesteps,
            "beta_start": s.beta_start, "beta_end": s.beta_end,
            "rescale_zero_terminal_snr": s.rescale_zero_terminal_snr,
            "set_alpha_to_one": s.set_alpha_to_one, "clip_sample_range": s.clip_sample_range,
            "steps_offset": s.steps_offset,
        },
        "image_shape": list(meta.image_shape),
        "num_classes": meta.num_classes,
        "class_names": list(meta.class_names),
        "distilled_steps": list(meta.distilled_steps),
        "distilled_spacing": meta.distilled_spacing,
        "source_hash": meta.source_hash,
        "fewstep_version": meta.fewstep_version,
    }


def graph_summary(meta: ModelMeta) -> dict[str, Any]:
    g = meta.graph
    d: dict[str, Any] = {"kind": g.kind, "precision": g.precision, "guidance": g.guidance,
                         "inputs": list(g.inputs), "outputs": list(g.outputs)}
    if g.kind == "sampler":
        d.update(steps=g.steps, spacing=g.spacing, eta=g.eta, output_format=g.output_format)
    return d


def mismatch(main: ModelMeta, other: ModelMeta) -> str | None:
    """What makes ``other`` a graph of a different model than ``main``, or None."""
    checks: list[tuple[str, object, object]] = [
        ("source_hash", main.source_hash, other.source_hash),
        ("schedule", main.schedule, other.schedule),
        ("prediction type", main.prediction_type, other.prediction_type),
        ("image shape", main.image_shape, other.image_shape),
        ("precision", main.graph.precision, other.graph.precision),
        ("classes", main.class_names or main.num_classes,
         other.class_names or other.num_classes),
    ]
    for what, a, b in checks:
        if a != b:
            return f"{what} ({b!r} vs {a!r})"
    return None


@dataclass(frozen=True)
class GenerationInfo:
    """How the last ``generate`` ran (``Pipeline.last_info``)."""

    path: str       # "sampler", "step", "step-blend" or "denoiser"
    graph: str      # the graph file that ran
    backend: str
    n: int
    steps: int      # network evaluations per image (fewer than plan steps for img2img)
    spacing: str
    eta: float
    batch_size: int
    seconds: float


class _Entry:
    """One graph of the artifact: its metadata, and the graph once opened."""

    def __init__(self, path: str, meta: ModelMeta, graph: Graph | None = None,
                 opener: Callable[[], Graph] | None = None) -> None:
        self.path = path
        self.meta = meta
        self.graph = graph
        self.opener = opener
        self.failed = False


def _name(path: str) -> str:
    return Path(path).name if path and not path.startswith("<") else path


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be a whole number >= 1 (the number of images)")
    return int(n)


def _check_batch_size(batch_size: object) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
        batch_size < 1
    ):
        raise ValueError(f"batch_size={batch_size!r} must be a whole number >= 1, or None")
    return int(batch_size)


class Pipeline:
    """A loaded model: ``generate`` images, ``describe`` it. See the module docstring."""

    def __init__(self, entries: Sequence[_Entry], backend: str, source: str) -> None:
        if not entries:
            raise ValueError("a Pipeline needs at least one graph")
        self._entries = list(entries)
        self.meta: ModelMeta = entries[0].meta
        self.backend = backend
        self.source = source
        self.last_info: GenerationInfo | None = None
        self._lock = threading.Lock()
        self._warned: set[int] = set()
        self._plans: dict[tuple[Any, ...], SamplingPlan] = {}

    def __repr__(self) -> str:
        kinds = ", ".join(_name(e.path) for e in self._entries)
        return f"Pipeline({self.source!r}, backend={self.backend!r}, graphs=[{kinds}])"

    # -- construction -----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, backend: str = "auto",
             **backend_options: Any) -> Pipeline:
        """Open ``path`` (default: the shipped model) and know its sibling graphs.

        ``backend``: ``auto`` (TensorRT for a ``.plan``, else ONNX Runtime CUDA when
        usable, else CPU), or a name from ``backends.BACKENDS``; ``backend_options``
        go to the backend (e.g. ``threads=4``, ``cuda_graph=False``).
        """
        p = Path(path) if path is not None else default_model_path()
        name = str(p)
        artifact.check_model_path(p)  # a folder: names the model file inside it
        if not p.is_file():
            raise ArtifactError(
                f"model file {name!r} does not exist; pass --model PATH to a model.onnx "
                "made by `fewstep export`"
            )
        ext = ORACLE_EXT if name.endswith(ORACLE_EXT) else ".plan" if name.endswith(
            ".plan") else ".onnx"
        concrete = "oracle" if (ext == ORACLE_EXT and backend == "auto") else backends.resolve(
            backend, name)

        def opener(file: str) -> Callable[[], Graph]:
            return lambda: backends.load(file, concrete, **backend_options)

        main = backends.load(name, concrete, **backend_options)
        entries = [_Entry(name, main.meta, main)]
        for sibling in artifact.siblings(p, ext):
            if sibling == p:
                continue
            file = str(sibling)
            graph: Graph | None = None
            try:
                if ext == ".onnx":
                    meta = artifact.read_onnx_meta(file)
                elif ext == ORACLE_EXT:
                    from .backends.oracle import read_oracle_file

                    meta = read_oracle_file(file)[0]
                else:  # a plan's metadata lives in its sidecar: the backend reads it
                    graph = backends.load(file, concrete, **backend_options)
                    meta = graph.meta
            except ArtifactError as e:
                warnings.warn(inert(f"ignoring {file}: {e}", 2000), stacklevel=2)
                continue
            different = mismatch(main.meta, meta)
            if different:
                warnings.warn(
                    f"ignoring {file}: its {different} differs from {p.name}; "
                    "re-export the whole artifact together", stacklevel=2,
                )
                continue
            entries.append(_Entry(file, meta, graph, opener(file)))
        return cls(entries, concrete, name)

    @classmethod
    def from_graphs(cls, graphs: Sequence[Graph]) -> Pipeline:
        """A pipeline over already-opened graphs (oracle graphs in tests, benchmarks).

        The first denoiser (else the first graph) is the main one; the others must be
        graphs of the same model.
        """
        if not graphs:
            raise ValueError("from_graphs needs at least one graph")
        ordered = sorted(graphs, key=lambda g: g.meta.graph.kind != "denoiser")
        main = ordered[0]
        for g in ordered[1:]:
            different = mismatch(main.meta, g.meta)
            if different:
                raise ValueError(
                    f"graph {g.path} is of another model than {main.path}: its {different} "
                    "differs; pass graphs of one model"
                )
        names = sorted({g.backend for g in graphs})
        return cls([_Entry(g.path, g.meta, g) for g in ordered], "+".join(names), main.path)

    # -- what is loaded ---------------------------------------------------------------

    @property
    def graphs(self) -> list[Graph]:
        """The graphs opened so far."""
        return [e.graph for e in self._entries if e.graph is not None]

    def describe(self) -> dict[str, Any]:
        """Backend, graphs (kind, precision, steps, ...), and the model's metadata."""
        graphs = []
        for e in self._entries:
            d: dict[str, Any] = {"path": e.path, **graph_summary(e.meta),
                                 "loaded": e.graph is not None}
            extra = getattr(e.graph, "describe", None)
            if callable(extra):
                d["runtime"] = extra()
            graphs.append(d)
        return {"source": self.source, "backend": self.backend,
                "model": meta_summary(self.meta), "graphs": graphs}

    def _open(self, entry: _Entry) -> Graph | None:
        with self._lock:
            if entry.graph is None and not entry.failed:
                assert entry.opener is not None
                try:
                    entry.graph = entry.opener()
                except ArtifactError as e:
                    entry.failed = True
                    warnings.warn(inert(f"ignoring {entry.path}: {e}", 2000), stacklevel=4)
            return entry.graph

    # -- choosing a graph ---------------------------------------------------------------

    def _candidates(self, plan: SamplingPlan, spacing: str, guidance: float | None,
                    fused_ok: bool, want_float: bool) -> list[tuple[str, _Entry]]:
        def usable(e: _Entry) -> bool:
            return not e.failed and (guidance is None or e.meta.graph.guidance)

        def rank(e: _Entry) -> tuple[bool, ...]:
            g = e.meta.graph
            return (g.guidance != (guidance is not None),
                    (g.output_format == "float") != want_float)

        out: list[tuple[str, _Entry]] = []
        if fused_ok:
            samplers = [
                e for e in self._entries
                if usable(e) and e.meta.graph.kind == "sampler"
                and e.meta.graph.steps == plan.steps and e.meta.graph.spacing == spacing
                and math.isclose(e.meta.graph.eta, plan.eta, abs_tol=1e-9)
                and not (want_float and e.meta.graph.output_format == "uint8")
            ]
            out += [("sampler", e) for e in sorted(samplers, key=rank)]
        for kind in ("step", "denoiser"):
            out += [(kind, e) for e in sorted(
                (e for e in self._entries if usable(e) and e.meta.graph.kind == kind), key=rank)]
        return out

    def _no_graph(self, plan: SamplingPlan, spacing: str, reason: str) -> ValueError:
        have = "; ".join(
            f"{_name(e.path)} ({e.meta.graph.kind}"
            + (f", steps={e.meta.graph.steps}, spacing={e.meta.graph.spacing}, "
               f"eta={e.meta.graph.eta:g}, output {e.meta.graph.output_format}"
               if e.meta.graph.kind == "sampler" else "") + ")"
            for e in self._entries if not e.failed
        )
        return ValueError(
            f"no graph of {_name(self.source)} can run steps={plan.steps}, spacing={spacing!r}, "
            f"eta={plan.eta:g}{reason}; it has {have or 'no usable graph'}: pass matching "
            "arguments, or export the denoiser or step graph (fewstep export CHECKPOINT)"
        )

    def _choose(self, plan: SamplingPlan, spacing: str, guidance: float | None,
                fused_ok: bool, want_float: bool, masked: bool) -> tuple[str, Graph]:
        for path, entry in self._candidates(plan, spacing, guidance, fused_ok, want_float):
            graph = self._open(entry)
            if graph is not None:
                return ("step-blend" if path == "step" and masked else path), graph
        reason = ""
        if not fused_ok:
            reason = " with an init image (img2img and inpainting need a step or denoiser graph)"
        elif want_float:
            reason = " with float output (a uint8 sampler graph returns only images)"
        raise self._no_graph(plan, spacing, reason)

    # -- arguments ------------------------------------------------------------------------

    def _check_steps(self, steps: object) -> None:
        T = self.meta.schedule.num_train_timesteps
        if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps > T:
            raise ValueError(
                f"steps={steps} exceeds num_train_timesteps={T} recorded in "
                f"{_name(self.source)}; pass steps <= {T}"
            )

    def _warn_distilled(self, steps: int) -> None:
        distilled = self.meta.distilled_steps
        if not distilled or steps in distilled:
            return
        with self._lock:
            if steps in self._warned:
                return
            self._warned.add(steps)
        counts = ", ".join(map(str, distilled))
        warnings.warn(
            f"model was distilled for {counts} steps; {steps} steps may look worse",
            stacklevel=4,
        )

    def _image(self, image: ImageInput, n: int) -> F32:
        c, h, w = self.meta.image_shape
        if isinstance(image, (str, os.PathLike)):
            arr = load_image(image, (h, w), c)[None]
        else:
            a = np.asarray(image)
            if a.dtype == np.uint8:
                a = a[None] if a.ndim == 3 else a
                if a.ndim != 4 or a.shape[1:] != (h, w, c):
                    raise ValueError(
                        f"init_image of shape {np.shape(image)} (uint8) does not fit; pass "
                        f"({h}, {w}, {c}) or (n, {h}, {w}, {c}) uint8, or a file path"
                    )
                arr = from_uint8_nhwc(a)
            else:
                a = a[None] if a.ndim == 3 else a
                if a.ndim != 4 or a.shape[1:] != (c, h, w) or not np.issubdtype(
                    a.dtype, np.floating
                ):
                    raise ValueError(
                        f"init_image of shape {np.shape(image)} ({a.dtype}) does not fit; pass "
                        f"({c}, {h}, {w}) float in [-1, 1], (n, {c}, {h}, {w}), or uint8 "
                        f"({h}, {w}, {c}), or a file path"
                    )
                arr = a.astype(np.float32)
        if arr.shape[0] not in (1, n):
            raise ValueError(f"{arr.shape[0]} init images for n={n}; pass one image or n images")
        if not np.all(np.isfinite(arr)):
            raise ValueError("init_image contains NaN or Inf; pass finite values in [-1, 1]")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _mask(self, mask: ImageInput, n: int) -> F32:
        _, h, w = self.meta.image_shape
        if isinstance(mask, (str, os.PathLike)):
            return load_mask(mask, (h, w))[None]
        a = np.asarray(mask)
        if a.ndim == 2:
            a = a[None, None]
        elif a.ndim == 3:
            a = a[:, None] if a.shape[0] != 1 else a[None]
        if a.ndim != 4 or a.shape[1:] != (1, h, w) or a.shape[0] not in (1, n):
            raise ValueError(
                f"mask of shape {np.shape(mask)} does not fit; pass ({h}, {w}) or "
                f"(n, 1, {h}, {w}) with 1 = regenerate and 0 = keep, or a file path"
            )
        if a.dtype == np.uint8:
            return (a > 0).astype(np.float32)
        m = a.astype(np.float32)
        if not np.all((m >= 0) & (m <= 1)):
            raise ValueError("mask values must be in [0, 1] (1 = regenerate, 0 = keep)")
        return np.ascontiguousarray(m)

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        n: int,
        steps: int,
        eta: float = 0.0,
        seed: int = 0,
        labels: Any = None,
        guidance: float | None = None,
        spacing: str | None = None,
        init_image: ImageInput | None = None,
        strength: float = 1.0,
        mask: ImageInput | None = None,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> U8:
        """``n`` images as (n, H, W, C) uint8.

        ``labels``: None (cycle the classes), a class index or name for all, or one per
        image. ``guidance``: classifier-free guidance scale (needs a graph exported
        with --guidance; None = the conditional model). ``spacing``: default the
        model's distilled spacing, else trailing. ``init_image`` + ``strength`` < 1:
        img2img; ``mask`` (1 = regenerate, 0 = keep): inpainting. ``progress(done,
        total)`` is called after each batch.
        """
        out: U8 = self._generate(n, steps, eta, seed, labels, guidance, spacing, init_image,
                                 strength, mask, batch_size, progress, want_float=False)
        assert out.dtype == np.uint8
        return out

    def generate_float(
        self,
        n: int,
        steps: int,
        eta: float = 0.0,
        seed: int = 0,
        labels: Any = None,
        guidance: float | None = None,
        spacing: str | None = None,
        init_image: ImageInput | None = None,
        strength: float = 1.0,
        mask: ImageInput | None = None,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> F32:
        """Like ``generate``, but the final samples (n, C, H, W) float32 in model range.

        A sampler graph that outputs uint8 images cannot serve this; the step or
        denoiser graph is used instead (a ValueError says so when there is none).
        """
        out: F32 = self._generate(n, steps, eta, seed, labels, guidance, spacing, init_image,
                                  strength, mask, batch_size, progress, want_float=True)
        assert out.dtype == np.float32
        return out

    def _generate(self, n: int, steps: int, eta: float, seed: int, labels: Any,
                  guidance: float | None, spacing: str | None, init_image: ImageInput | None,
                  strength: float, mask: ImageInput | None, batch_size: int | None,
                  progress: Progress | None, want_float: bool) -> Any:
        meta = self.meta
        n = _check_n(n)
        seed = host_noise.check_seed(seed)
        spacing = spacing if spacing is not None else (
            meta.distilled_spacing or sampling.DEFAULT_SPACING)
        self._check_steps(steps)
        plan = self._plan(steps, spacing, eta, strength)
        if init_image is None and mask is not None:
            raise ValueError(
                "mask given without init_image: inpainting keeps the init image's pixels "
                "where mask == 0; pass init_image=... (--init-image) or drop the mask"
            )
        if init_image is None and strength != 1.0:
            raise ValueError(
                f"strength={strength} needs an init image (img2img); pass init_image=... "
                "(--init-image) or strength=1"
            )
        limit = _check_batch_size(batch_size)
        all_labels = sampling.resolve_labels(meta, n, labels)
        g = sampling.check_guidance(meta, guidance)
        if g is not None and not any(e.meta.graph.guidance for e in self._entries):
            raise ValueError(
                f"guidance={guidance} needs a graph exported with --guidance; re-export: "
                f"fewstep export CHECKPOINT --guidance (or drop guidance)"
            )
        self._warn_distilled(plan.steps)
        init = None if init_image is None else self._image(init_image, n)
        m = None if mask is None else self._mask(mask, n)
        path, graph = self._choose(plan, spacing, g, init is None, want_float, m is not None)

        if limit is not None and graph.max_batch is not None and limit > graph.max_batch:
            raise ValueError(
                f"batch_size={limit} exceeds the largest batch {_name(graph.path)} accepts "
                f"({graph.max_batch}, its optimisation profile); pass batch_size <= "
                f"{graph.max_batch}, or rebuild the plan with a larger --batch MIN:OPT:MAX"
            )
        chunk = min(limit or DEFAULT_BATCH, graph.max_batch or DEFAULT_BATCH * 1024)
        c, h, w = meta.image_shape
        out: Any = (np.empty((n, c, h, w), np.float32) if want_float
                    else np.empty((n, h, w, c), np.uint8))
        started = time.perf_counter()
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            x_T, step_noise = host_noise.generation_noise(
                seed, range(lo, hi), meta.image_shape, plan.steps if plan.stochastic else 0)
            extra = self._extra_feeds(graph, None if all_labels is None else all_labels[lo:hi],
                                      g, hi - lo)

            def part(a: F32 | None, lo: int = lo, hi: int = hi) -> F32 | None:
                return None if a is None else (a if a.shape[0] == 1 else a[lo:hi])

            if path == "sampler":
                try:
                    y = self._run_sampler(graph, x_T, step_noise, extra, lo)
                except NumericalError as e:
                    labels_part = None if all_labels is None else all_labels[lo:hi]
                    raise self._locate(e, plan, spacing, g, x_T, step_noise,
                                       labels_part) from None
            elif path == "denoiser":
                y = self._run_denoiser(graph, plan, x_T, step_noise, extra, part(init), part(m))
            else:
                y = self._run_steps(graph, plan, x_T, step_noise, extra, part(init), part(m))
            if y.dtype == np.uint8:
                out[lo:hi] = y
            else:
                out[lo:hi] = y if want_float else to_uint8_nhwc(y)
            if progress is not None:
                progress(hi, n)
        self.last_info = GenerationInfo(
            path=path, graph=graph.path, backend=graph.backend, n=n,
            steps=plan.steps - plan.start, spacing=spacing, eta=plan.eta, batch_size=chunk,
            seconds=time.perf_counter() - started,
        )
        return out

    def _plan(self, steps: Any, spacing: Any, eta: Any, strength: Any) -> SamplingPlan:
        """SamplingPlan.create, remembered per arguments (it is pure; creating one costs
        more than the rest of a small generation's host work)."""
        key: tuple[Any, ...] = (type(steps), steps, spacing, type(eta), eta, type(strength),
                                 strength)
        try:
            plan = self._plans.get(key)
        except TypeError:  # unhashable argument: let create() explain what is wrong
            return SamplingPlan.create(self.meta, steps, spacing, eta, strength)
        if plan is None:
            plan = SamplingPlan.create(self.meta, steps, spacing, eta, strength)
            if len(self._plans) < 256:
                self._plans[key] = plan
        return plan

    @property
    def last_path(self) -> str | None:
        """The path the last ``generate`` took: sampler, step, step-blend or denoiser."""
        return None if self.last_info is None else self.last_info.path

    @staticmethod
    def _extra_feeds(graph: Graph, labels: NDArray[np.int64] | None, guidance: float | None,
                     n: int) -> dict[str, Array]:
        feeds: dict[str, Array] = {}
        if "label" in graph.meta.graph.inputs:
            assert labels is not None
            feeds["label"] = np.ascontiguousarray(labels, dtype=np.int64)
        if "guidance" in graph.meta.graph.inputs:
            feeds["guidance"] = np.full(n, 1.0 if guidance is None else guidance, np.float32)
        return feeds

    # -- the three paths ----------------------------------------------------------------

    def _run_sampler(self, graph: Graph, x_T: F32, step_noise: F32 | None,
                     extra: dict[str, Array], lo: int) -> Array:
        feeds = {"x": x_T, **extra}
        if "noise" in graph.meta.graph.inputs:
            assert step_noise is not None
            feeds["noise"] = step_noise
        y = graph.run(feeds)
        n = x_T.shape[0]
        if graph.meta.graph.output_format == "uint8":
            c, h, w = self.meta.image_shape
            if y.dtype != np.uint8 or y.shape != (n, h, w, c):
                raise ArtifactError(
                    f"{graph.path} returned {y.dtype} {y.shape}, not uint8 ({n}, {h}, {w}, {c}) "
                    "images as its metadata says; re-export it"
                )
            bad = nonfinite_images(y)
            if bad.size:
                which = ", ".join(str(lo + int(b)) for b in bad[:8]) + (
                    ", ..." if bad.size > 8 else "")
                raise NumericalError(
                    f"the sampler graph {_name(graph.path)} produced NaN/Inf for image(s) "
                    f"{which} of this call; {NUMERIC_FIX}"
                )
            return y
        y = np.asarray(y, dtype=np.float32)
        if not np.all(np.isfinite(y)):
            raise NumericalError(
                f"the sampler graph {_name(graph.path)} returned NaN/Inf for images "
                f"{lo}..{lo + n - 1}; {NUMERIC_FIX}"
            )
        return y

    def _locate(self, err: NumericalError, plan: SamplingPlan, spacing: str,
                guidance: float | None, x_T: F32, step_noise: F32 | None,
                labels: NDArray[np.int64] | None) -> NumericalError:
        """The fused sampler runs every step in one graph, so its NaN/Inf has no step: rerun
        the same inputs through the step or denoiser graph (when the artifact has one) to
        name it. Only on this failure path; ``err`` itself when nothing else reproduces it."""
        for path, entry in self._candidates(plan, spacing, guidance, False, True):
            other = self._open(entry)
            if other is None:
                continue
            extra = self._extra_feeds(other, labels, guidance, x_T.shape[0])
            try:
                if path == "denoiser":
                    self._run_denoiser(other, plan, x_T, step_noise, extra, None, None)
                else:
                    self._run_steps(other, plan, x_T, step_noise, extra, None, None)
            except NumericalError as located:
                return NumericalError(f"{err} (rerun through {_name(other.path)}: {located})")
            return err
        return err

    def _numerical(self, graph: Graph, plan: SamplingPlan, i: int) -> NumericalError:
        return NumericalError(
            f"step {i} of {plan.steps} (t={plan.timesteps[i]}) produced NaN/Inf in "
            f"{_name(graph.path)}; {NUMERIC_FIX}"
        )

    def _run_steps(self, graph: Graph, plan: SamplingPlan, x_T: F32, step_noise: F32 | None,
                   extra: dict[str, Array], init: F32 | None, m: F32 | None) -> F32:
        n = x_T.shape[0]
        x: F32 = np.ascontiguousarray(sampling.initial_state(plan, x_T, init), dtype=np.float32)
        fixed: dict[str, Array] = {**extra, "eta": np.full(n, plan.eta, np.float32)}
        if not plan.stochastic:
            fixed["noise"] = np.zeros_like(x_T)

        def feeds(i: int) -> dict[str, Array]:
            d: dict[str, Array] = {
                "t": np.full(n, plan.timesteps[i], np.float32),
                "a_t": np.full(n, plan.a_t[i], np.float32),
                "a_prev": np.full(n, plan.a_prev[i], np.float32),
            }
            if plan.stochastic:
                assert step_noise is not None
                d["noise"] = np.ascontiguousarray(step_noise[:, i])
            return d

        def one_step(x: F32, i: int) -> F32:
            out = np.asarray(graph.run_loop(x, fixed, [feeds(i)]), dtype=np.float32)
            if not np.all(np.isfinite(out)):
                raise self._numerical(graph, plan, i)
            return out

        if m is None:
            y = np.asarray(graph.run_loop(x, fixed, [feeds(i) for i in range(plan.start,
                                                                            plan.steps)]))
            if not np.all(np.isfinite(y)):
                # All steps ran on the device in one loop: rerun them one at a time (only on
                # this failure path) to name the first step that produced NaN/Inf.
                for i in range(plan.start, plan.steps):
                    x = one_step(x, i)
                raise NumericalError(
                    f"the step graph {_name(graph.path)} returned NaN/Inf after steps "
                    f"{plan.start}..{plan.steps - 1} (t={plan.timesteps[plan.start]}.."
                    f"{plan.timesteps[-1]}); {NUMERIC_FIX}"
                )
            return y.astype(np.float32, copy=False)
        assert init is not None
        for i in range(plan.start, plan.steps):
            x = one_step(x, i)
            # Inpainting: keep the known pixels, noised to the level of the next step.
            x = m * x + (1 - m) * ddim.q_sample(init, x_T, plan.a_prev[i])
        return x

    def _run_denoiser(self, graph: Graph, plan: SamplingPlan, x_T: F32, step_noise: F32 | None,
                      extra: dict[str, Array], init: F32 | None, m: F32 | None) -> F32:
        n = x_T.shape[0]

        def denoise(x: F32, i: int) -> F32:
            if i > plan.start and not np.all(np.isfinite(x)):
                raise self._numerical(graph, plan, i - 1)
            t = np.full(n, plan.timesteps[i], np.float32)
            out = np.asarray(graph.run({"x": np.ascontiguousarray(x), "t": t, **extra}),
                             dtype=np.float32)
            if not np.all(np.isfinite(out)):
                raise self._numerical(graph, plan, i)
            return out

        x = sampling.initial_state(plan, x_T, init)
        inpaint = None if m is None or init is None else (init, m, x_T)
        y: F32 = sampling.run_loop(plan, denoise, x, step_noise, inpaint)
        if not np.all(np.isfinite(y)):
            raise self._numerical(graph, plan, plan.steps - 1)
        return y

    # -- output -------------------------------------------------------------------------

    @staticmethod
    def save_grid(images: U8, path: str | os.PathLike[str], nrow: int | None = None,
                  scale: int = 1) -> Path:
        """Tile (N, H, W, C) uint8 images into one image file at ``path`` (atomic write;
        the format from the extension: .png, .jpg, .webp, ...)."""
        target = check_writable_target(path)
        save_image(grid(images, nrow), target, scale=scale)
        return target
