"""The paths under test: what every benchmarked path provides, and fewstep's own.

A ``BenchPath`` is one thing to time (a fewstep graph on a backend, or a baseline in
``baselines.py``); ``FewstepPath`` is a ``Pipeline`` forced onto one graph kind of one
artifact, with the network alone timed through ``Graph.network_run``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from fewstep.runtime import backends, sampling
from fewstep.runtime import noise as host_noise
from fewstep.runtime.artifact import Artifact, GraphFile
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta

FEWSTEP_BACKENDS: Final = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
GRAPH_KINDS: Final = ("denoiser", "step", "sampler")
SEEDS: Final = 4              # timed calls rotate over seeds 0..SEEDS-1


# ---------------------------------------------------------------------------------
# What every benchmarked path provides
# ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """What every path generates: the model, sampler settings, labels, guidance."""

    meta: ModelMeta
    spacing: str
    guidance: float | None
    eta: float = 0.0

    def plan(self, steps: int) -> sampling.SamplingPlan:
        return sampling.SamplingPlan.create(self.meta, steps, self.spacing, self.eta)

    def labels(self, n: int) -> np.ndarray | None:
        return sampling.resolve_labels(self.meta, n, None)  # type: ignore[no-any-return]

    def cond(self, n: int) -> dict[str, np.ndarray]:
        """Fixed values for the model's named conditioning inputs (standard normal floats,
        zeros for int64), the same for every path; those of n samples begin with those of
        fewer (one generator per input)."""
        return {c.name: (np.random.default_rng([0, i]).standard_normal((n, *c.shape))
                         .astype(np.float32)
                         if c.dtype == "float32" else np.zeros((n, *c.shape), np.int64))
                for i, c in enumerate(self.meta.cond)}

    @property
    def output(self) -> str:
        """What every path returns: uint8 images for an image model, else float samples."""
        return "images" if self.meta.images else "samples"

    def noise(self, seed: int, n: int) -> np.ndarray:
        x_T, _ = host_noise.generation_noise(seed, range(n), self.meta.sample_shape, 0)
        return x_T


class BenchPath:
    """One thing to time (a fewstep graph on a backend, or a baseline)."""

    name = ""
    family = "fewstep"     # or "baseline"
    path = ""              # "fewstep", "torch-eager", "torch-compile", "ort-steps"
    backend = ""
    graph: str | None = None
    mode: str | None = None
    precision = "fp32"
    device = "cpu"         # "cpu" or "cuda"
    model = ""
    memory = "device-wide"  # or "torch"

    def unavailable(self) -> str | None:
        """Why this path cannot run at all here (one 'unavailable' row), or None."""
        return None

    def supports(self, steps: int, batch: int) -> str | None:
        """Why this configuration does not exist (an 'n/a' row), or None."""
        return None

    def load(self, steps: int, batch: int) -> float | None:
        """Load what (steps, batch) needs; seconds spent, or None if already loaded."""
        return None

    def load_key(self, steps: int) -> Any:
        """Which loaded object (steps, batch) uses: its load time is the row's load_ms."""
        return None

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        """The end-to-end call: i → (batch, H, W, C) uint8 on the host (seed i % SEEDS);
        float32 samples (batch, *sample_shape) for a model whose samples are not images."""
        raise NotImplementedError

    def verify(self, steps: int) -> None:
        """After the first call: raise if the path did not run what its name says."""
        return None

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        """(network-only call, how it is measured) or (None, why not)."""
        return None, "not measured for this path"

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------
# fewstep's own paths: a Pipeline forced onto one graph kind
# ---------------------------------------------------------------------------------


MODEL_EXTENSIONS: Final = (".onnx", ".plan")
VARIANT_ON_CUDA_ONLY: Final = ("an ORT-CUDA variant graph (fewstep export --target ort-cuda): "
                               "only the ort-cuda backend runs it")


@dataclass
class BenchModel:
    """One ``--model``: its artifact, the graphs of both file types (ONNX graphs and
    TensorRT plans, whichever the user named), and its label in the report."""

    artifact: Artifact
    label: str  # "fp32", or "fp32 [stem]" where two models share a precision
    files: dict[str, tuple[GraphFile, ...]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.artifact.path

    @property
    def meta(self) -> ModelMeta:
        return self.artifact.meta

    @property
    def precision(self) -> str:
        return self.meta.graph.precision

    def graphs(self, kind: str, ext: str) -> list[tuple[Path, ModelMeta]]:
        return [(f.path, f.meta) for f in self.files.get(ext, ())
                if f.meta is not None and f.meta.graph.kind == kind]

    def all_graphs(self) -> list[tuple[Path, ModelMeta]]:
        return [(f.path, f.meta) for ext in MODEL_EXTENSIONS for f in self.files.get(ext, ())
                if f.meta is not None]

    def denoiser_onnx(self) -> Path | None:
        found = self.graphs("denoiser", ".onnx")
        return found[0][0] if found else None


def open_model(model: Path) -> BenchModel:
    """The model ``--model`` names, with every graph (ONNX and plans) of its artifact; a
    file named like one of its graphs that is not (unreadable, another model) is left out
    with a warning."""
    if not model.name.endswith(MODEL_EXTENSIONS) and model.is_file():
        raise ArtifactError(
            f"--model {str(model)!r} is neither a .onnx nor a .plan file; pass a model.onnx "
            "made by `fewstep export`"
        )
    art = Artifact.open(model)
    other = ".onnx" if art.ext == ".plan" else ".plan"
    files = {art.ext: art.files, other: art.files_of(other)}
    for ext in MODEL_EXTENSIONS:
        for f in files[ext]:
            if f.problem is not None:
                warnings.warn(f"ignoring {f.path}: {f.problem}", stacklevel=2)
        files[ext] = tuple(f for f in files[ext] if f.problem is None)
    return BenchModel(art, art.meta.graph.precision, files)


def open_models(models: Sequence[Path]) -> list[BenchModel]:
    """Every ``--model``, checked to be one model (precisions may differ), and labelled:
    by precision, with the file stem where two share a precision."""
    opened = [open_model(m) for m in models]
    first = opened[0]
    for other in opened[1:]:
        different = first.artifact.same_model(other.artifact)
        if different:
            raise ArtifactError(
                f"--model {other.path} is another model than {first.path}: its {different} "
                "differs; pass artifacts exported from one checkpoint"
            )
    for a in opened:
        twins = [b for b in opened if b.precision == a.precision]
        a.label = a.precision if len(twins) == 1 else f"{a.precision} [{a.path.stem}]"
    return opened


class FewstepPath(BenchPath):
    """``Pipeline.from_graphs`` over one graph of one kind: the graph choice is forced."""

    family = "fewstep"
    path = "fewstep"

    def __init__(self, art: BenchModel, backend: str, kind: str, work: Workload,
                 options: dict[str, Any], tag: str = "") -> None:
        self.art, self.backend, self.graph, self.work = art, backend, kind, work
        self.kind = kind
        self.name = f"fewstep {backend} {kind} {art.label}" + (f" {{{tag}}}" if tag else "")
        self.precision = art.precision
        self.device = "cpu" if backend == "ort-cpu" else "cuda"
        self.ext = ".plan" if backend == "tensorrt" else ".onnx"
        self.files = art.graphs(kind, self.ext)
        self.model = str(self.files[0][0]) if self.files else str(art.path)
        self.options = options
        self._pipes: dict[Path, Any] = {}

    def unavailable(self) -> str | None:
        reason = backends.availability().get(self.backend)
        if reason:
            return reason
        if not self.files:
            what = "TensorRT plan" if self.ext == ".plan" else "ONNX graph"
            fix = ("build it with `fewstep build`" if self.ext == ".plan"
                   else f"export it with `fewstep export --fused {self.kind}`"
                   if self.kind != "denoiser" else "re-export the model")
            return f"{self.art.path.name} has no {self.kind} {what}; {fix}"
        if self.files[0][1].graph.target == "ort-cuda" and self.backend != "ort-cuda":
            return VARIANT_ON_CUDA_ONLY
        if self.work.guidance is not None and not self.files[0][1].graph.guidance:
            return (f"the {self.kind} graph was exported without --guidance but the benchmark "
                    f"uses guidance={self.work.guidance}")
        return None

    def _file(self, steps: int) -> Path | None:
        if self.kind != "sampler":
            return self.files[0][0]
        for p, m in self.files:
            g = m.graph
            if g.steps == steps and g.spacing == self.work.spacing and abs(g.eta) < 1e-12:
                return p
        return None

    def supports(self, steps: int, batch: int) -> str | None:
        if self._file(steps) is None:
            have = sorted({m.graph.steps for _, m in self.files})
            return (f"no sampler graph for {steps} steps (the artifact has one for "
                    f"{', '.join(map(str, have)) or 'none'})")
        return None

    def load(self, steps: int, batch: int) -> float | None:
        file = self._file(steps)
        assert file is not None
        if file in self._pipes:
            return None
        from fewstep.runtime.pipeline import Pipeline

        t0 = time.perf_counter()
        graph = backends.load(str(file), self.backend, **self.options)
        self._pipes[file] = Pipeline.from_graphs([graph])
        return time.perf_counter() - t0

    def _pipe(self, steps: int) -> Any:
        file = self._file(steps)
        assert file is not None
        return self._pipes[file]

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        pipe = self._pipe(steps)
        g = self.work.guidance
        spacing = self.work.spacing
        cond = self.work.cond(batch) or None
        output = self.work.output

        def run(i: int) -> np.ndarray:
            out: np.ndarray = pipe.generate(batch, steps, seed=i % SEEDS, guidance=g,
                                            spacing=spacing, batch_size=batch, cond=cond,
                                            output=output)
            return out

        return run

    def load_key(self, steps: int) -> Any:
        return self._file(steps)

    def verify(self, steps: int) -> None:
        info = self._pipe(steps).last_info
        took = None if info is None else info.path
        if took != self.kind:
            raise RuntimeError(f"the pipeline ran its {took} path, not {self.kind}")

    def host_feeds(self, steps: int, batch: int) -> dict[str, np.ndarray]:
        """Real inputs of the graph at step 0 (x = seed-0 noise), like the pipeline's,
        shaped and typed by the graph I/O contract."""
        meta = self._pipe(steps).graphs[0].meta
        plan = self.work.plan(steps)
        values: dict[str, Any] = {
            "x": self.work.noise(0, batch), "t": plan.timesteps[0], "a_t": plan.a_t[0],
            "a_prev": plan.a_prev[0], "eta": plan.eta, "noise": 0.0,
            "label": self.work.labels(batch),
            "guidance": 1.0 if self.work.guidance is None else self.work.guidance,
            **self.work.cond(batch),
        }
        out = {}
        for name, spec in meta.io.inputs.items():
            out[name] = np.empty(spec.shape(batch), spec.dtype)
            out[name][...] = values[name]
        return out

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        graph = self._pipe(steps).graphs[0]
        launches = 1 if self.kind == "sampler" else steps
        net = graph.network_run(self.host_feeds(steps, batch), launches)
        return (lambda _: net.call()), net.method

    def close(self) -> None:
        for pipe in self._pipes.values():
            for g in pipe.graphs:
                closer = getattr(g, "close", None)
                if callable(closer):
                    with contextlib.suppress(Exception):
                        closer()
        self._pipes.clear()
