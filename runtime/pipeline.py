"""Pipeline: load an exported model, generate samples. numpy + a backend, no torch.

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

``Pipeline.load(..., prefer="step")`` (or ``sampler``, ``denoiser``) tries that kind
first wherever it can do what is asked: the step graph reaches a new process's first
image sooner on cuDNN (``fewstep sample --graph``). A request repeated with the same plain
arguments reuses its checked preparation (``requests.Prepared``); only its seed's noise
is drawn anew.

On ONNX Runtime's CUDA provider, the ORT-CUDA variant beside the model
(``model.ort-cuda.onnx`` and its graphs, from ``fewstep export --target ort-cuda``) is
preferred for every path it has; a variant graph that cannot be opened is reported once
and the portable graph runs instead.

Every path uses the same host noise (``noise.generation_noise``: sample i of a seed
has its own stream), so a sample is the same whatever the batch split, graph or
backend, and as ``fewstep.train.reference.sample`` gives, up to float rounding. One
Pipeline may be used from several threads at once (graphs open under a lock; backends
lock their device-resident state).
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from . import artifact, backends, checks, runners, sampling
from . import noise as host_noise
from .backends import Graph
from .clitools import plural
from .errors import ArtifactError, NumericalError, inert
from .fileio import check_writable_target
from .images import grid, init_images, masks, save_image, to_uint8_nhwc
from .meta import GRAPH_KINDS, ModelMeta, graph_summary, meta_summary
from .requests import (
    MAX_PREPARED,
    GenerateRequest,
    GenerationInfo,
    ImageInput,
    Prepared,
    Progress,
    prepared_key,
    read_only,
)
from .runners import Batch
from .sampling import SamplingPlan

DEFAULT_MODEL: Final = "landscapes.onnx"
DEFAULT_BATCH: Final = 16

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]


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


def _variant_entries(art: artifact.Artifact, path: Path, backend: str,
                     options: dict[str, Any]) -> list[_Entry]:
    """The graphs of the ORT-CUDA variant ``path`` beside ``art``, to be opened on first
    use; a variant of another model, or one that cannot be read, is reported and left
    out."""
    try:
        variant = artifact.Artifact.open(path)
        different = art.same_model(variant) or (
            None if variant.meta.graph.target == "ort-cuda" else "target ('portable')")
    except ArtifactError as e:
        different = str(e)
    if different:
        warnings.warn(inert(f"ignoring {path}: not the ORT-CUDA variant of {art.path.name}: "
                            f"{different}; re-export with --target ort-cuda", 2000),
                      stacklevel=3)
        return []
    for bad in variant.rejected:
        warnings.warn(inert(f"ignoring {bad.path}: {bad.problem}", 2000), stacklevel=3)

    def opener(file: str) -> Callable[[], Graph]:
        def open_variant() -> Graph:
            try:
                return backends.load(file, backend, **options)
            except ArtifactError:
                raise
            except Exception as e:  # ONNX Runtime's own errors: fall back to the portable
                first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
                raise ArtifactError(f"ONNX Runtime could not open this ORT-CUDA variant "
                                    f"graph ({type(e).__name__}: {first[:300]}); the "
                                    "portable graph runs instead") from None
        return open_variant

    return [_Entry(str(g.path), g.meta, None, opener(str(g.path)))
            for g in variant.graphs if g.meta is not None]


class _Entry:
    """One graph of the artifact: its metadata, and the graph once opened."""

    def __init__(self, path: str, meta: ModelMeta, graph: Graph | None = None,
                 opener: Callable[[], Graph] | None = None) -> None:
        self.path = path
        self.meta = meta
        self.graph = graph
        self.opener = opener
        self.failed = False


_name = runners.name


class Pipeline:
    """A loaded model: ``generate`` images, ``describe`` it. See the module docstring."""

    def __init__(self, entries: Sequence[_Entry], backend: str, source: str,
                 prefer: str | None = None) -> None:
        if not entries:
            raise ValueError("a Pipeline needs at least one graph")
        if prefer is not None:
            checks.choice("prefer", prefer, GRAPH_KINDS)
        self.prefer = prefer
        self._entries = list(entries)
        self.meta: ModelMeta = entries[0].meta
        self.backend = backend
        self.source = source
        self.last_info: GenerationInfo | None = None
        self._lock = threading.Lock()
        self._warned: set[int] = set()
        self._plans: dict[tuple[Any, ...], SamplingPlan] = {}
        self._prepared: dict[tuple[Any, ...], Prepared] = {}

    def __repr__(self) -> str:
        kinds = ", ".join(_name(e.path) for e in self._entries)
        return f"Pipeline({self.source!r}, backend={self.backend!r}, graphs=[{kinds}])"

    # -- construction -----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, backend: str = "auto", *,
             prefer: str | None = None, **backend_options: Any) -> Pipeline:
        """Open ``path`` (default: the shipped model) and know its sibling graphs.

        ``backend``: ``auto`` (TensorRT for a ``.plan``, else ONNX Runtime CUDA when
        usable, else CPU), or a name from ``backends.BACKENDS``; ``backend_options``
        go to the backend (e.g. ``threads=4``, ``cuda_graph=False``). ``prefer``: a
        graph kind (``sampler``, ``step``, ``denoiser``) to try before the others
        wherever it can do what is asked; None = the fastest per call (see the module
        docstring). ``prefer="step"`` suits a process that generates once on cuDNN:
        the fused sampler's unrolled loop pays cuDNN's first use once per convolution
        (4x the step graph's), see ``fewstep sample --graph``.
        """
        if prefer is not None:
            checks.choice("prefer", prefer, GRAPH_KINDS)
        p = artifact.locate(path if path is not None else default_model_path())
        name = str(p)
        oracle = name.endswith(artifact.ORACLE_EXT) and backend == "auto"
        concrete = "oracle" if oracle else backends.resolve(backend, name)

        def opener(file: str) -> Callable[[], Graph]:
            return lambda: backends.load(file, concrete, **backend_options)

        art: artifact.Artifact | None = None
        variant: list[_Entry] = []
        vpath = (artifact.find_variant(p, "ort-cuda")
                 if concrete == "ort-cuda" and name.endswith(".onnx") else None)
        if vpath is not None:
            art = artifact.Artifact.open(p)
            if art.meta.graph.target == "portable":
                variant = _variant_entries(art, vpath, concrete, backend_options)
        if variant and art is not None:  # the portable main is a fallback, opened if needed
            main_entry = _Entry(name, art.meta, None, opener(name))
        else:
            main = backends.load(name, concrete, **backend_options)
            main_entry = _Entry(name, main.meta, main)
            art = art or artifact.Artifact.open(p)
        for bad in art.rejected:
            warnings.warn(inert(f"ignoring {bad.path}: {bad.problem}", 2000), stacklevel=2)
        entries = [main_entry] + [
            _Entry(str(g.path), g.meta, None, opener(str(g.path)))
            for g in art.graphs[1:] if g.meta is not None
        ] + variant
        return cls(entries, concrete, name, prefer)

    @classmethod
    def from_graphs(cls, graphs: Sequence[Graph], prefer: str | None = None) -> Pipeline:
        """A pipeline over already-opened graphs (oracle graphs in tests, benchmarks).

        The first denoiser (else the first graph) is the main one; the others must be
        graphs of the same model. ``prefer``: as for ``load``.
        """
        if not graphs:
            raise ValueError("from_graphs needs at least one graph")
        ordered = sorted(graphs, key=lambda g: g.meta.graph.kind != "denoiser")
        main = ordered[0]
        for g in ordered[1:]:
            different = artifact.mismatch(main.meta, g.meta)
            if different:
                raise ValueError(
                    f"graph {g.path} is of another model than {main.path}: its {different} "
                    "differs; pass graphs of one model"
                )
        names = sorted({g.backend for g in graphs})
        return cls([_Entry(g.path, g.meta, g) for g in ordered], "+".join(names), main.path,
                   prefer)

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

    def default_steps(self, spacing: str | None = None, eta: float = 0.0) -> int:
        """The steps ``generate`` runs when ``steps`` is None (``sampling.default_steps``)."""
        real = checks.is_number(eta)
        return sampling.default_steps(self.meta, [graph_summary(e.meta) for e in self._entries
                                         if not e.failed], spacing, eta if real else 0.0)

    def _open(self, entry: _Entry) -> Graph | None:
        with self._lock:
            if entry.graph is None and not entry.failed:
                assert entry.opener is not None
                try:
                    entry.graph = entry.opener()
                except ArtifactError as e:
                    entry.failed = True
                    self._prepared.clear()  # the graph and default steps chosen may change
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
                    (g.output_format == "float") != want_float,
                    g.target == "portable")  # a variant (loaded only where it runs) first

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
        if self.prefer is not None:  # stable: the preferred kind first, the rest as ranked
            out.sort(key=lambda pe: pe[0] != self.prefer)
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
        if checks.is_whole_number(steps) and steps > T:
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
            f"model was distilled for {counts} step{'s' * (distilled != (1,))}; "
            f"{plural(steps, 'step')} may look worse",
            stacklevel=4,
        )

    def _image(self, image: ImageInput, n: int) -> F32:
        arr = init_images(image, self.meta.image_shape, "init_image")
        if arr.shape[0] not in (1, n):
            raise ValueError(f"{arr.shape[0]} init images for n={n}; pass one image or n images")
        return arr

    def _mask(self, mask: ImageInput, n: int) -> F32:
        m = masks(mask, self.meta.image_shape[1:])
        if m.shape[0] not in (1, n):
            raise ValueError(f"{m.shape[0]} masks for n={n}; pass one mask or n masks")
        return m

    # -- generation ---------------------------------------------------------------------

    def generate(
        self,
        n: int,
        steps: int | None = None,
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
        *,
        cond: dict[str, Any] | None = None,
        latents: Any = None,
        output: str | None = None,
    ) -> Any:
        """``n`` samples: with ``output="images"`` (the default for an image model) uint8
        (n, H, W, C); with ``output="samples"`` (the default otherwise) the final samples
        (n, *sample_shape) float32 in model space.

        ``steps``: None = the model's own count, as ``fewstep sample`` picks it (the step
        count it was distilled for, else that of its fused sampler graph, else
        ``sampling.FALLBACK_STEPS``; ``default_steps`` says which).
        ``labels``: None (cycle the classes), a class index or name for all, or one per
        sample. ``cond``: the model's named conditioning inputs, {name: one value for all
        or one per sample} (``describe()["model"]["cond"]`` lists them). ``latents``: the
        initial noise x_T, (n, *sample_shape) float32, instead of the seed's (per-step
        noise for eta > 0 still comes from ``seed``). ``guidance``: classifier-free
        guidance scale (needs a graph exported with --guidance; None = the conditional
        model). ``spacing``: default the model's distilled spacing, else its schedule's
        (trailing for fewstep's own models, the scheduler's for an imported one).
        ``init_image`` + ``strength`` < 1: img2img; ``mask`` (1 = regenerate, 0 = keep):
        inpainting (image models); each a file path, a PIL image or an array of any size
        (another size is resized, with a warning; see ``images.init_images`` and
        ``images.masks``). ``progress(done, total)`` is called after each batch.
        """
        return self._generate(GenerateRequest(n, steps, eta, seed, labels, guidance, spacing,
                                              init_image, strength, mask, batch_size,
                                              progress, output, cond, latents))

    def _generate(self, r: GenerateRequest) -> Any:
        seed = host_noise.check_seed(r.seed)
        key = prepared_key(r)
        prep = None if key is None else self._prepared.get(key)
        if prep is None:
            prep = self._prepare(r)
            if key is not None and len(self._prepared) < MAX_PREPARED:
                self._prepared[key] = prep
        return self._run(prep, seed, r.progress)

    def _prepare(self, r: GenerateRequest) -> Prepared:
        """Everything of a generation but the seed's: its arguments checked, plan, graph,
        labels, conditioning, batch split. Pure for a request of plain values, so
        ``_generate`` keeps it per ``requests.prepared_key`` (until a graph fails to open)."""
        meta = self.meta
        n = checks.whole_number("n", r.n, 1, " (the number of samples)")
        output = r.output if r.output is not None else ("images" if meta.images else "samples")
        checks.choice("output", output, ("images", "samples"))
        if output == "images" and not meta.images:
            raise ValueError(f"output='images' needs an image model; this model's samples are "
                             f"{meta.sample_shape} arrays: pass output='samples'")
        want_float = output == "samples"
        if not meta.images and (r.init_image is not None or r.mask is not None):
            raise ValueError("init_image and mask (img2img, inpainting) need an image model; "
                             f"this model's samples are {meta.sample_shape} arrays")
        steps = self.default_steps(r.spacing, r.eta) if r.steps is None else r.steps
        spacing = r.spacing if r.spacing is not None else sampling.default_spacing(meta)
        self._check_steps(steps)
        plan = self._plan(steps, spacing, r.eta, r.strength)
        if r.init_image is None and r.mask is not None:
            raise ValueError(
                "mask given without init_image: inpainting keeps the init image's pixels "
                "where mask == 0; pass init_image=... (--init-image) or drop the mask"
            )
        if r.init_image is None and r.strength != 1.0:
            raise ValueError(
                f"strength={r.strength} needs an init image (img2img); pass init_image=... "
                "(--init-image) or strength=1"
            )
        limit = checks.optional_whole_number("batch_size", r.batch_size, 1)
        all_labels = sampling.resolve_labels(meta, n, r.labels)
        all_cond = sampling.resolve_cond(meta, n, r.cond)
        latents = None if r.latents is None else sampling.check_latents(meta, n, r.latents)
        g = sampling.check_guidance(meta, r.guidance)
        if g is not None and not any(e.meta.graph.guidance for e in self._entries):
            raise ValueError(
                f"guidance={r.guidance} needs a graph exported with --guidance; re-export: "
                f"fewstep export CHECKPOINT --guidance (or drop guidance)"
            )
        self._warn_distilled(plan.steps)
        init = None if r.init_image is None else self._image(r.init_image, n)
        m = None if r.mask is None else self._mask(r.mask, n)
        path, graph = self._choose(plan, spacing, g, init is None, want_float, m is not None)

        if limit is not None and graph.max_batch is not None and limit > graph.max_batch:
            raise ValueError(
                f"batch_size={limit} exceeds the largest batch {_name(graph.path)} accepts "
                f"({graph.max_batch}, its optimisation profile); pass batch_size <= "
                f"{graph.max_batch}, or rebuild the plan with a larger --batch MIN:OPT:MAX"
            )
        chunk = min(limit or DEFAULT_BATCH, graph.max_batch or DEFAULT_BATCH * 1024)
        return Prepared(n, want_float, plan, spacing, g, path, graph, chunk, all_labels,
                         all_cond, latents, init, m)

    def _run(self, p: Prepared, seed: int, progress: Progress | None) -> Any:
        meta, plan, graph, n = self.meta, p.plan, p.graph, p.n
        if p.want_float:
            out: Any = np.empty((n, *meta.sample_shape), np.float32)
        else:
            c, h, w = meta.image_shape
            out = np.empty((n, h, w, c), np.uint8)
        started = time.perf_counter()
        for lo in range(0, n, p.chunk):
            hi = min(n, lo + p.chunk)
            x_T, step_noise = host_noise.generation_noise(
                seed, range(lo, hi), meta.sample_shape, plan.steps if plan.stochastic else 0)
            if p.latents is not None:
                x_T = p.latents[lo:hi]
            labels = None if p.labels is None else p.labels[lo:hi]
            extra = p.feeds.get(lo)
            if extra is None:
                cond = {k: v[lo:hi] for k, v in p.cond.items()}
                extra = p.feeds[lo] = read_only(
                    runners.extra_feeds(graph, labels, p.guidance, hi - lo, cond))

            def part(a: F32 | None, lo: int = lo, hi: int = hi) -> F32 | None:
                return None if a is None else (a if a.shape[0] == 1 else a[lo:hi])

            batch = Batch(x_T, step_noise, extra, part(p.init), part(p.mask), lo)
            try:
                y = runners.run(p.path, graph, plan, batch)
            except NumericalError as e:
                if p.path != "sampler":
                    raise
                cond = {k: v[lo:hi] for k, v in p.cond.items()}
                raise self._locate(e, plan, p.spacing, p.guidance, batch, labels,
                                   cond) from None
            if y.dtype == np.uint8:
                out[lo:hi] = y
            else:
                out[lo:hi] = y if p.want_float else to_uint8_nhwc(y)
            if progress is not None:
                progress(hi, n)
        self.last_info = GenerationInfo(
            path=p.path, graph=graph.path, backend=graph.backend, n=n,
            steps=plan.steps - plan.start, spacing=p.spacing, eta=plan.eta,
            batch_size=p.chunk, seconds=time.perf_counter() - started,
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

    def _locate(self, err: NumericalError, plan: SamplingPlan, spacing: str,
                guidance: float | None, batch: Batch, labels: NDArray[np.int64] | None,
                cond: dict[str, Any]) -> NumericalError:
        """The fused sampler runs every step in one graph, so its NaN/Inf has no step: rerun
        the same inputs through the step or denoiser graph (when the artifact has one) to
        name it. Only on this failure path; ``err`` itself when nothing else reproduces it."""
        for path, entry in self._candidates(plan, spacing, guidance, False, True):
            other = self._open(entry)
            if other is None:
                continue
            extra = runners.extra_feeds(other, labels, guidance, batch.x_T.shape[0], cond)
            try:
                runners.run(path, other, plan, Batch(batch.x_T, batch.step_noise, extra))
            except NumericalError as located:
                return NumericalError(f"{err} (rerun through {_name(other.path)}: {located})")
            return err
        return err

    # -- output -------------------------------------------------------------------------

    @staticmethod
    def save_grid(images: U8, path: str | os.PathLike[str], nrow: int | None = None,
                  scale: int = 1) -> Path:
        """Tile (N, H, W, C) uint8 images into one image file at ``path`` (atomic write;
        the format from the extension: .png, .jpg, .webp, ...)."""
        target = check_writable_target(path)
        save_image(grid(images, nrow), target, scale=scale)
        return target
