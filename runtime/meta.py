"""ModelMeta: what a fewstep artifact is, stored inside every artifact.

One JSON object, written into the checkpoint, into the ONNX file (one
``metadata_props`` entry under ``META_KEY``) and into the ``.plan.json`` sidecar of a
TensorRT plan. The runtime reads it instead of guessing, and refuses a file whose
metadata is missing, from a newer schema, or inconsistent, with an ``ArtifactError``.

``graph_io`` (``ModelMeta.io``) is the graph input/output contract: the names, dtypes
and shapes of every input and output of each graph kind, conditioning inputs included.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from . import checks, ddim
from .errors import ArtifactError
from .graphio import OUTPUT_NAME as OUTPUT_NAME
from .graphio import GraphIO as GraphIO
from .graphio import TensorSpec as TensorSpec
from .graphio import graph_io

# 2: the schedule records trained_betas and timestep_spacing; a version-1 document reads
# as version 2 with no trained betas and trailing spacing (what version 1 meant).
# 3: sample_shape (any rank) and images replace channels/height/width; named conditioning
# inputs (cond) and null_label. A version-1 or 2 document reads as an image model whose
# null label is num_classes (what those versions meant).
SCHEMA_VERSION: Final = 3
META_KEY: Final = "fewstep.meta"
DEFAULT_SPACING: Final = "trailing"
MAX_TRAIN_TIMESTEPS: Final = 100_000

GRAPH_KINDS: Final = ("denoiser", "step", "sampler")
PRECISIONS: Final = ("fp32", "fp16", "bf16")
OUTPUT_FORMATS: Final = ("float", "uint8")
# What a graph file runs on: "portable" (standard ONNX: every ONNX Runtime provider,
# TensorRT, Triton), or "ort-cuda" (ONNX Runtime's com.microsoft CUDA kernels, NHWC:
# only ONNX Runtime's CUDA execution provider; see export/ort_cuda.py).
TARGETS: Final = ("portable", "ort-cuda")
MAX_CLASSES: Final = 100_000
MAX_NAME_CHARS: Final = 100  # a class name
MAX_TEXT_CHARS: Final = 200  # fewstep_version, source_hash, distilled_spacing
MAX_SAMPLE_RANK: Final = 6
MAX_DIM: Final = 65_536  # one dimension of a sample or a conditioning input
MAX_SAMPLE_ELEMENTS: Final = 1 << 26  # 64 M values: a 4-channel 4096 x 4096 image
MAX_COND_ELEMENTS: Final = 1 << 20
MAX_COND_INPUTS: Final = 16
MAX_COND_NAME: Final = 64
COND_DTYPES: Final[dict[str, type[np.generic]]] = {"float32": np.float32, "int64": np.int64}
# Names a conditioning input cannot take: the graphs' own inputs and outputs, and the
# request inputs of the Triton model.
RESERVED_NAMES: Final = frozenset({"x", "t", "label", "guidance", "a_t", "a_prev", "eta",
                                   "noise", "eps", "v", "x0", "x_prev", "image", "seed",
                                   "steps"})
AUTO: Final = -1  # null_label default: num_classes when the model has classes


def text_problem(text: str, limit: int) -> str | None:
    """What makes ``text`` unfit for metadata that is shown on terminals, or None: it must
    be printable (no control or escape characters, no newlines) and at most ``limit``
    characters."""
    if len(text) > limit:
        return f"is {len(text)} characters long, more than {limit}"
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        return f"holds the unprintable character {bad!r}"
    return None


def class_name_problem(name: str) -> str | None:
    """``text_problem`` for a class name, which also must not be empty or blank."""
    if not name.strip():
        return "is empty or blank"
    return text_problem(name, MAX_NAME_CHARS)


def _short(value: object) -> str:
    """``repr(value)``, elided in the middle past 40 characters (one readable line)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:18]}...{text[-18:]} ({len(text)} chars)"


def _fail(where: str, msg: str) -> ArtifactError:
    return ArtifactError(f"fewstep metadata field {where}: {msg}")


def _check_choice(where: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(where, f"{value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Schedule:
    """The forward process the model was trained with, and the sampler's fixed choices.

    ``trained_betas`` (one β per timestep), when not empty, replaces ``beta_schedule``,
    ``beta_start`` and ``beta_end`` (which are then not used). ``clip_sample_range``
    None means no clipping of the predicted x0. ``steps_offset`` shifts leading spacing
    only. ``timestep_spacing`` is the spacing a sampler uses when none is asked for:
    trailing for fewstep's own models, the scheduler's for an imported one.
    """

    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_zero_terminal_snr: bool = False
    set_alpha_to_one: bool = True
    clip_sample_range: float | None = 1.0
    steps_offset: int = 0
    trained_betas: tuple[float, ...] = ()
    timestep_spacing: str = DEFAULT_SPACING
    prev_rule: str = "next"  # "ratio": a_prev at t - T // steps, as DDIMScheduler.step

    def __post_init__(self) -> None:
        _check_choice("schedule.beta_schedule", self.beta_schedule, ddim.BETA_SCHEDULES)
        _check_choice("schedule.timestep_spacing", self.timestep_spacing, ddim.SPACINGS)
        _check_choice("schedule.prev_rule", self.prev_rule, ddim.PREV_RULES)
        if not 1 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise _fail(
                "schedule.num_train_timesteps",
                f"{_short(self.num_train_timesteps)} not in 1..{MAX_TRAIN_TIMESTEPS}",
            )
        uses_range = not self.trained_betas and self.beta_schedule != "squaredcos_cap_v2"
        if uses_range and not (0 < self.beta_start <= self.beta_end < 1):
            raise _fail("schedule.beta_start/beta_end", f"{self.beta_start}/{self.beta_end} "
                        "must satisfy 0 < beta_start <= beta_end < 1")
        if self.trained_betas:
            try:
                ddim.check_trained_betas(self.trained_betas, self.num_train_timesteps)
            except ValueError as e:
                raise _fail("schedule.trained_betas", str(e)) from None
        if self.clip_sample_range is not None and not (
            math.isfinite(self.clip_sample_range) and self.clip_sample_range > 0
        ):
            raise _fail("schedule.clip_sample_range", f"{self.clip_sample_range} must be > 0")
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise _fail("schedule.steps_offset", f"{_short(self.steps_offset)} out of range")

    def alphas_cumprod(self) -> NDArray[np.float64]:
        return ddim.alphas_cumprod(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.rescale_zero_terminal_snr,
            self.trained_betas or None,
        )

    def timesteps(self, steps: int, spacing: str | None = None) -> NDArray[np.int64]:
        """The timesteps of a ``steps``-step sampler; ``spacing`` None = ``timestep_spacing``."""
        spacing = self.timestep_spacing if spacing is None else spacing
        offset = self.steps_offset if spacing == "leading" else 0
        return ddim.timesteps(self.num_train_timesteps, steps, spacing, offset)

    def step_alphas(
        self, steps: int, spacing: str | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
        """(timesteps, a_t, a_prev) for a ``steps``-step sampler."""
        ts = self.timesteps(steps, spacing)
        a_t, a_prev = ddim.step_alphas(self.alphas_cumprod(), ts, self.set_alpha_to_one,
                                       self.prev_rule)
        return ts, a_t, a_prev


@dataclass(frozen=True)
class GraphInfo:
    """Which computation a file holds. Checkpoints are ``denoiser``/``fp32``."""

    kind: str = "denoiser"
    precision: str = "fp32"
    inputs: tuple[str, ...] = ("x", "t")
    outputs: tuple[str, ...] = ("eps",)
    guidance: bool = False
    # Fused sampler only: the fixed loop baked into the graph.
    steps: int = 0
    spacing: str = ""
    eta: float = 0.0
    output_format: str = "float"
    target: str = "portable"  # TARGETS; written into the metadata only when not portable

    def __post_init__(self) -> None:
        _check_choice("graph.kind", self.kind, GRAPH_KINDS)
        _check_choice("graph.target", self.target, TARGETS)
        _check_choice("graph.precision", self.precision, PRECISIONS)
        _check_choice("graph.output_format", self.output_format, OUTPUT_FORMATS)
        if self.kind == "sampler":
            if self.steps < 1:
                raise _fail("graph.steps",
                            f"{_short(self.steps)}: a sampler graph needs steps >= 1")
            _check_choice("graph.spacing", self.spacing, ddim.SPACINGS)
            if not 0.0 <= self.eta <= 1.0:
                raise _fail("graph.eta", f"{self.eta} not in [0, 1]")
        elif self.steps or self.spacing or self.eta or self.output_format != "float":
            raise _fail("graph", f"steps/spacing/eta/output_format set on a {self.kind} graph")


@dataclass(frozen=True)
class CondSpec:
    """A named conditioning input beside the sample (an observation vector, ...): dtype,
    the shape of one sample's value (no batch axis), and the value meaning "no
    conditioning" for classifier-free guidance (None: the model has none)."""

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    null: float | None = None

    def __post_init__(self) -> None:
        where = f"cond[{_short(self.name)}]"
        if not (isinstance(self.name, str) and self.name.isascii() and self.name.isidentifier()
                and len(self.name) <= MAX_COND_NAME):
            raise _fail(where, f"name must be a Python identifier of at most {MAX_COND_NAME} "
                        "ASCII characters")
        if self.name in RESERVED_NAMES:
            raise _fail(where, f"{self.name!r} is a name fewstep's graphs use; rename it")
        _check_choice(f"{where}.dtype", self.dtype, tuple(COND_DTYPES))
        _check_dims(f"{where}.shape", self.shape, MAX_COND_ELEMENTS, 0)
        if self.null is not None:
            if not math.isfinite(self.null):
                raise _fail(f"{where}.null", f"{self.null!r} is not finite")
            if self.dtype == "int64" and self.null != int(self.null):
                raise _fail(f"{where}.null", f"{self.null!r} is not a whole number (int64)")

    @property
    def np_dtype(self) -> type[np.generic]:
        return COND_DTYPES[self.dtype]


def _check_dims(where: str, dims: tuple[int, ...], max_elements: int, min_rank: int) -> None:
    if not min_rank <= len(dims) <= MAX_SAMPLE_RANK:
        raise _fail(where, f"{_short(dims)} must have {min_rank} to {MAX_SAMPLE_RANK} dims")
    if not all(checks.is_whole_number(d) and 1 <= d <= MAX_DIM for d in dims):
        raise _fail(where, f"{_short(dims)}: every dim must be a whole number in 1..{MAX_DIM}")
    if math.prod(dims) > max_elements:
        raise _fail(where, f"{_short(dims)} holds more than {max_elements:,} values")


@dataclass(frozen=True)
class ModelMeta:
    prediction_type: str
    schedule: Schedule
    sample_shape: tuple[int, ...]
    images: bool = True  # samples are (C, H, W) images in [-1, 1]
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    null_label: int | None = AUTO  # the "no class" label for guidance; None: there is none
    cond: tuple[CondSpec, ...] = ()
    graph: GraphInfo = field(default_factory=GraphInfo)
    distilled_steps: tuple[int, ...] = ()
    distilled_spacing: str = ""
    train_config: Mapping[str, Any] = field(default_factory=dict)
    source_hash: str = ""
    fewstep_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_choice("prediction_type", self.prediction_type, ddim.PREDICTION_TYPES)
        if self.prediction_type == "epsilon" and self.schedule.rescale_zero_terminal_snr:
            raise _fail(
                "prediction_type",
                "'epsilon' cannot recover x0 at zero terminal SNR; "
                "train with prediction type v_prediction or sample",
            )
        _check_dims("sample_shape", self.sample_shape, MAX_SAMPLE_ELEMENTS, 1)
        if self.images and (len(self.sample_shape) != 3 or not 1 <= self.sample_shape[0] <= 4
                            or max(self.sample_shape[1:]) > 8192):
            raise _fail("sample_shape", f"{_short(self.sample_shape)} is not an image shape "
                        "(C, H, W) with C in 1..4 and H, W <= 8192; set images to false")
        if not 0 <= self.num_classes <= MAX_CLASSES:
            raise _fail("num_classes", f"{_short(self.num_classes)} not in 0..{MAX_CLASSES}")
        if self.null_label == AUTO:
            object.__setattr__(self, "null_label", self.num_classes or None)
        if self.null_label is not None and not (
                self.num_classes and 0 <= self.null_label <= self.num_classes):
            raise _fail("null_label", f"{_short(self.null_label)} not in 0..num_classes="
                        f"{self.num_classes}")
        if len(self.cond) > MAX_COND_INPUTS:
            raise _fail("cond", f"{len(self.cond)} inputs, more than {MAX_COND_INPUTS}")
        names = [c.name for c in self.cond]
        if len(set(names)) != len(names):
            raise _fail("cond", f"names {_short(names)} are not unique")
        if self.graph.output_format == "uint8" and not self.images:
            raise _fail("graph.output_format", "uint8 images from a model whose samples are "
                        "not images")
        if self.graph.steps > self.schedule.num_train_timesteps:
            raise _fail("graph.steps", f"{_short(self.graph.steps)} exceeds num_train_timesteps="
                        f"{self.schedule.num_train_timesteps}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise _fail(
                "class_names", f"{len(self.class_names)} names for {self.num_classes} classes"
            )
        for i, name in enumerate(self.class_names):
            problem = class_name_problem(name) if isinstance(name, str) else "is not a string"
            if problem:
                raise _fail(f"class_names[{i}]", f"{_short(name)} {problem}")
        for what in ("source_hash", "fewstep_version", "distilled_spacing"):
            problem = text_problem(getattr(self, what), MAX_TEXT_CHARS)
            if problem:
                raise _fail(what, f"{_short(getattr(self, what))} {problem}")
        if self.graph.guidance and not self.guidable:
            raise _fail("graph.guidance", "guidance needs conditioning with a null value "
                        "(a null label, a null for each conditioning input)")
        if self.distilled_steps:
            _check_choice("distilled_spacing", self.distilled_spacing, ddim.SPACINGS)
            if any(s < 1 or s > self.schedule.num_train_timesteps for s in self.distilled_steps):
                raise _fail("distilled_steps", f"{_short(self.distilled_steps)} out of range")
        io = self.io
        expected_in, expected_out = io.input_names, (io.output.name,)
        if self.graph.inputs != expected_in or self.graph.outputs != expected_out:
            raise _fail(
                "graph.inputs/outputs",
                f"{list(self.graph.inputs)} -> {list(self.graph.outputs)} does not match a "
                f"{self.graph.kind} graph of this model, which has "
                f"{list(expected_in)} -> {list(expected_out)}",
            )
        if self.schema_version != SCHEMA_VERSION:
            raise _fail("schema_version", f"{_short(self.schema_version)} != {SCHEMA_VERSION}")

    @classmethod
    def build(cls, graph: GraphInfo | None = None, **fields: Any) -> ModelMeta:
        """Construct with the graph's input/output names filled in from the rest."""
        g = graph or GraphInfo()
        if "channels" in fields:  # shorthand for an image model
            fields["sample_shape"] = (fields.pop("channels"), fields.pop("height"),
                                      fields.pop("width"))
        fields["sample_shape"] = tuple(fields["sample_shape"])
        fields["cond"] = tuple(fields.get("cond", ()))
        io = graph_io(fields["prediction_type"], fields["sample_shape"],
                      fields.get("num_classes", 0) > 0, fields["cond"], g)
        return cls(graph=dataclasses.replace(g, inputs=io.input_names,
                                             outputs=(io.output.name,)), **fields)

    # -- derived -------------------------------------------------------------------

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def guidable(self) -> bool:
        """Classifier-free guidance is possible: there is conditioning, and a null value
        for each part of it."""
        return (self.conditional or bool(self.cond)) and (
            not self.conditional or self.null_label is not None) and all(
            c.null is not None for c in self.cond)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of an image model; a ValueError for other samples."""
        if not self.images:
            raise ValueError(f"this model's samples are arrays of shape {self.sample_shape}, "
                             "not images; use output='samples' (fewstep sample writes .npy)")
        c, h, w = self.sample_shape
        return (c, h, w)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def height(self) -> int:
        return self.image_shape[1]

    @property
    def width(self) -> int:
        return self.image_shape[2]

    @functools.cached_property
    def io(self) -> GraphIO:
        """Names, dtypes and shapes of this graph's inputs and output (``graph_io``)."""
        return graph_io(self.prediction_type, self.sample_shape, self.conditional, self.cond,
                        self.graph)

    def for_graph(self, **changes: Any) -> ModelMeta:
        """This model's meta for another graph; inputs/outputs follow from the rest."""
        graph = dataclasses.replace(self.graph, **changes)
        io = graph_io(self.prediction_type, self.sample_shape, self.conditional, self.cond,
                      graph)
        return dataclasses.replace(self, graph=dataclasses.replace(
            graph, inputs=io.input_names, outputs=(io.output.name,)))

    # -- (de)serialisation --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train_config"] = dict(self.train_config)
        if self.graph.target == "portable":  # the metadata of a portable graph is unchanged
            del d["graph"]["target"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "metadata") -> ModelMeta:
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, TypeError, RecursionError) as e:
            raise ArtifactError(f"{source}: fewstep metadata is not valid JSON ({e})") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: object, source: str = "metadata") -> ModelMeta:
        try:
            from .meta_json import parse

            return parse(data)
        except ArtifactError as e:
            raise ArtifactError(f"{source}: {e}") from None
        except (TypeError, ValueError, OverflowError, RecursionError) as e:
            # A check above missed a kind of bad value: still one ArtifactError, never a
            # traceback (the property tests in tests/test_properties.py hunt for these).
            raise ArtifactError(f"{source}: fewstep metadata is malformed ({type(e).__name__}: "
                                f"{str(e)[:200]}); re-export the model") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


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
            "steps_offset": s.steps_offset, "timestep_spacing": s.timestep_spacing,
            "trained_betas": len(s.trained_betas), "prev_rule": s.prev_rule,
        },
        "sample_shape": list(meta.sample_shape),
        "images": meta.images,
        "num_classes": meta.num_classes,
        "class_names": list(meta.class_names),
        "null_label": meta.null_label,
        "cond": [{"name": c.name, "dtype": c.dtype, "shape": list(c.shape), "null": c.null}
                 for c in meta.cond],
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
    if g.target != "portable":
        d["target"] = g.target
    return d
