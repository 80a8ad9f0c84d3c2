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

# 2: the schedule records trained_betas and timestep_spacing; a version-1 document reads
# as version 2 with no trained betas and trailing spacing (what version 1 meant).
SCHEMA_VERSION: Final = 2
META_KEY: Final = "fewstep.meta"
DEFAULT_SPACING: Final = "trailing"
MAX_TRAIN_TIMESTEPS: Final = 100_000

GRAPH_KINDS: Final = ("denoiser", "step", "sampler")
PRECISIONS: Final = ("fp32", "fp16", "bf16")
OUTPUT_FORMATS: Final = ("float", "uint8")
OUTPUT_NAME: Final = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
MAX_CLASSES: Final = 100_000
MAX_NAME_CHARS: Final = 100  # a class name
MAX_TEXT_CHARS: Final = 200  # fewstep_version, source_hash, distilled_spacing


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

    def __post_init__(self) -> None:
        _check_choice("schedule.beta_schedule", self.beta_schedule, ddim.BETA_SCHEDULES)
        _check_choice("schedule.timestep_spacing", self.timestep_spacing, ddim.SPACINGS)
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
        a_t, a_prev = ddim.step_alphas(self.alphas_cumprod(), ts, self.set_alpha_to_one)
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

    def __post_init__(self) -> None:
        _check_choice("graph.kind", self.kind, GRAPH_KINDS)
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
class ModelMeta:
    prediction_type: str
    schedule: Schedule
    channels: int
    height: int
    width: int
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
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
        for name in ("channels", "height", "width"):
            value = getattr(self, name)
            if not 1 <= value <= 8192:
                raise _fail(name, f"{_short(value)} not in 1..8192")
        if not 0 <= self.num_classes <= MAX_CLASSES:
            raise _fail("num_classes", f"{_short(self.num_classes)} not in 0..{MAX_CLASSES}")
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
        if self.graph.guidance and not self.num_classes:
            raise _fail("graph.guidance", "guidance needs a class-conditional model")
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
        io = graph_io(fields["prediction_type"], fields.get("num_classes", 0) > 0,
                      (fields["channels"], fields["height"], fields["width"]), g)
        return cls(graph=dataclasses.replace(g, inputs=io.input_names,
                                             outputs=(io.output.name,)), **fields)

    # -- derived -------------------------------------------------------------------

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_label(self) -> int:
        """The label index that means "no class" (classifier-free guidance)."""
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.height, self.width)

    @functools.cached_property
    def io(self) -> GraphIO:
        """Names, dtypes and shapes of this graph's inputs and output (``graph_io``)."""
        return graph_io(self.prediction_type, self.conditional, self.image_shape, self.graph)

    def for_graph(self, **changes: Any) -> ModelMeta:
        """This model's meta for another graph; inputs/outputs follow from the rest."""
        graph = dataclasses.replace(self.graph, **changes)
        io = graph_io(self.prediction_type, self.conditional, self.image_shape, graph)
        return dataclasses.replace(self, graph=dataclasses.replace(
            graph, inputs=io.input_names, outputs=(io.output.name,)))

    # -- (de)serialisation --------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train_config"] = dict(self.train_config)
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
            return _parse(data)
        except ArtifactError as e:
            raise ArtifactError(f"{source}: {e}") from None
        except (TypeError, ValueError, OverflowError, RecursionError) as e:
            # A check above missed a kind of bad value: still one ArtifactError, never a
            # traceback (the property tests in tests/test_properties.py hunt for these).
            raise ArtifactError(f"{source}: fewstep metadata is malformed ({type(e).__name__}: "
                                f"{str(e)[:200]}); re-export the model") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph: name, dtype and the dims after the batch axis."""

    name: str
    dtype: type[np.generic]
    dims: tuple[int, ...]  # without the batch axis: () for a (B,) input

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)

    def describe(self) -> str:
        dims = ", ".join(["B", *map(str, self.dims)])
        return f"{np.dtype(self.dtype).name} ({dims})"


@dataclass(frozen=True)
class GraphIO:
    """The inputs (in graph order) and the single output of one graph."""

    inputs: Mapping[str, TensorSpec]
    output: TensorSpec

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """The shape of every input at batch size ``batch``."""
        if batch < 1:
            raise ValueError(f"batch={batch} must be at least 1")
        return {name: spec.shape(batch) for name, spec in self.inputs.items()}


def graph_io(prediction_type: str, conditional: bool, image_shape: tuple[int, int, int],
             g: GraphInfo) -> GraphIO:
    """The inputs and output a graph of kind ``g.kind`` must have (``g``'s own names are
    ignored): the one definition of names, dtypes and shapes that the backends, the
    TensorRT build, the Triton configs and the benchmarks read.

    x, out and a step graph's noise are (B, C, H, W); t, a_t, a_prev, eta, guidance are
    (B,) float32 and label (B,) int64; a stochastic sampler's noise is (B, S, C, H, W);
    a uint8 sampler's image is (B, H, W, C).
    """
    c, h, w = image_shape
    dims: dict[str, tuple[int, ...]] = {"x": image_shape}
    cond = ("label",) if conditional else ()
    guid = ("guidance",) if g.guidance else ()
    if g.kind == "denoiser":
        names: tuple[str, ...] = ("x", "t", *cond, *guid)
        out = TensorSpec(OUTPUT_NAME[prediction_type], np.float32, image_shape)
    elif g.kind == "step":
        names = ("x", "t", "a_t", "a_prev", "eta", "noise", *cond, *guid)
        dims["noise"] = image_shape
        out = TensorSpec("x_prev", np.float32, image_shape)
    else:
        names = ("x", *cond, *guid, *(("noise",) if g.eta > 0 else ()))
        dims["noise"] = (g.steps, *image_shape)
        out = (TensorSpec("image", np.uint8, (h, w, c)) if g.output_format == "uint8"
               else TensorSpec("x0", np.float32, image_shape))
    inputs = {n: TensorSpec(n, np.int64 if n == "label" else np.float32, dims.get(n, ()))
              for n in names}
    return GraphIO(inputs, out)


# ---------------------------------------------------------------------------------
# Strict parsing: anything but well-formed metadata becomes one ArtifactError.
# ---------------------------------------------------------------------------------

_MISSING = object()


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: object = _MISSING) -> Any:
    if key not in d:
        if default is _MISSING:
            raise _fail(f"{where}{key}", "missing")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a whole number beyond float range, e.g. 10**400
            raise _fail(f"{where}{key}", f"{_short(value)} is too large for a number "
                        "(float64)") from None
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(f"{where}{key}", f"{_short(value)} is not {_names(kinds)}")
    if not isinstance(value, kinds):
        raise _fail(f"{where}{key}", f"{_short(value)} is not {_names(kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"{where}{key}", f"{value!r} is not finite")
    return value


def _short(value: object) -> str:
    """``repr(value)``, elided in the middle past 40 characters (one readable line)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:18]}...{text[-18:]} ({len(text)} chars)"


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _str_tuple(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _get(d, key, list, where, [])
    if not all(isinstance(s, str) for s in items):
        raise _fail(f"{where}{key}", "must be a list of strings")
    return tuple(items)


def _no_extra(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise _fail(where or "(top level)", f"unknown keys {extra}")


def _parse(data: object) -> ModelMeta:
    if not isinstance(data, dict):
        raise _fail("(top level)", f"expected a JSON object, got {type(data).__name__}")
    version = _get(data, "schema_version", int, "")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"metadata schema version {_short(version)} is newer than this fewstep supports "
            f"({SCHEMA_VERSION}); upgrade fewstep (pip install -U fewstep)"
        )
    if version < 1:
        raise _fail("schema_version", f"{_short(version)} is not a valid version")
    top = {f.name for f in dataclasses.fields(ModelMeta)}
    _no_extra(data, top, "")

    s = _get(data, "schedule", dict, "")
    added_in_2 = {"trained_betas", "timestep_spacing"} if version < 2 else set()
    _no_extra(s, {f.name for f in dataclasses.fields(Schedule)} - added_in_2, "schedule")
    trained = _get(s, "trained_betas", list, "schedule.", [])
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained):
        raise _fail("schedule.trained_betas", "must be a list of numbers")
    schedule = Schedule(
        beta_schedule=_get(s, "beta_schedule", str, "schedule."),
        num_train_timesteps=_get(s, "num_train_timesteps", int, "schedule."),
        beta_start=_get(s, "beta_start", float, "schedule."),
        beta_end=_get(s, "beta_end", float, "schedule."),
        rescale_zero_terminal_snr=_get(s, "rescale_zero_terminal_snr", bool, "schedule."),
        set_alpha_to_one=_get(s, "set_alpha_to_one", bool, "schedule."),
        clip_sample_range=_get(s, "clip_sample_range", (float, type(None)), "schedule."),
        steps_offset=_get(s, "steps_offset", int, "schedule.", 0),
        trained_betas=tuple(float(b) for b in trained),
        timestep_spacing=_get(s, "timestep_spacing", str, "schedule.", DEFAULT_SPACING),
    )
    g = _get(data, "graph", dict, "")
    _no_extra(g, {f.name for f in dataclasses.fields(GraphInfo)}, "graph")
    graph = GraphInfo(
        kind=_get(g, "kind", str, "graph."),
        precision=_get(g, "precision", str, "graph."),
        inputs=_str_tuple(g, "inputs", "graph."),
        outputs=_str_tuple(g, "outputs", "graph."),
        guidance=_get(g, "guidance", bool, "graph.", False),
        steps=_get(g, "steps", int, "graph.", 0),
        spacing=_get(g, "spacing", str, "graph.", ""),
        eta=_get(g, "eta", float, "graph.", 0.0),
        output_format=_get(g, "output_format", str, "graph.", "float"),
    )
    distilled = _get(data, "distilled_steps", list, "", [])
    if not all(checks.is_whole_number(v) for v in distilled):
        raise _fail("distilled_steps", "must be a list of whole numbers")
    return ModelMeta(
        prediction_type=_get(data, "prediction_type", str, ""),
        schedule=schedule,
        channels=_get(data, "channels", int, ""),
        height=_get(data, "height", int, ""),
        width=_get(data, "width", int, ""),
        num_classes=_get(data, "num_classes", int, "", 0),
        class_names=_str_tuple(data, "class_names", ""),
        graph=graph,
        distilled_steps=tuple(distilled),
        distilled_spacing=_get(data, "distilled_spacing", str, "", ""),
        train_config=_get(data, "train_config", dict, "", {}),
        source_hash=_get(data, "source_hash", str, "", ""),
        fewstep_version=_get(data, "fewstep_version", str, "", ""),
        schema_version=SCHEMA_VERSION,  # an older document is read as its current equivalent
    )


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
