"""Strict parsing of ModelMeta JSON: anything but well-formed metadata of schema 1 to
``SCHEMA_VERSION`` becomes one ArtifactError naming the field."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from . import checks
from .errors import ArtifactError
from .meta import (
    DEFAULT_SPACING,
    MAX_COND_INPUTS,
    MAX_SAMPLE_RANK,
    SCHEMA_VERSION,
    CondSpec,
    GraphInfo,
    ModelMeta,
    Schedule,
    _fail,
    _short,
)

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


def parse(data: object) -> ModelMeta:
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
    if version < 3:
        top = (top - {"sample_shape", "images", "null_label", "cond"}) | {
            "channels", "height", "width"}
    _no_extra(data, top, "")

    s = _get(data, "schedule", dict, "")
    later = ({"trained_betas", "timestep_spacing"} if version < 2 else set()) | (
        {"prev_rule"} if version < 3 else set())
    _no_extra(s, {f.name for f in dataclasses.fields(Schedule)} - later, "schedule")
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
        prev_rule=_get(s, "prev_rule", str, "schedule.", "next"),
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
        target=_get(g, "target", str, "graph.", "portable"),
    )
    distilled = _get(data, "distilled_steps", list, "", [])
    if not all(checks.is_whole_number(v) for v in distilled):
        raise _fail("distilled_steps", "must be a list of whole numbers")
    if version < 3:
        sample: dict[str, Any] = dict(sample_shape=tuple(
            _get(data, k, int, "") for k in ("channels", "height", "width")))
    else:
        shape = _get(data, "sample_shape", list, "")
        if len(shape) > MAX_SAMPLE_RANK or not all(checks.is_whole_number(d) for d in shape):
            raise _fail("sample_shape", f"{_short(shape)} is not a list of up to "
                        f"{MAX_SAMPLE_RANK} whole numbers")
        sample = dict(sample_shape=tuple(shape), images=_get(data, "images", bool, ""),
                      null_label=_get(data, "null_label", (int, type(None)), ""),
                      cond=_cond(_get(data, "cond", list, "", [])))
    return ModelMeta(
        prediction_type=_get(data, "prediction_type", str, ""),
        schedule=schedule,
        **sample,
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


def _cond(items: list[Any]) -> tuple[CondSpec, ...]:
    if len(items) > MAX_COND_INPUTS:
        raise _fail("cond", f"{len(items)} inputs, more than {MAX_COND_INPUTS}")
    out = []
    for i, d in enumerate(items):
        where = f"cond.{i}."
        if not isinstance(d, dict):
            raise _fail(f"cond.{i}", f"expected a JSON object, got {type(d).__name__}")
        _no_extra(d, {f.name for f in dataclasses.fields(CondSpec)}, f"cond.{i}")
        shape = _get(d, "shape", list, where, [])
        if len(shape) > MAX_SAMPLE_RANK or not all(checks.is_whole_number(v) for v in shape):
            raise _fail(f"{where}shape", f"{_short(shape)} is not a list of whole numbers")
        out.append(CondSpec(name=_get(d, "name", str, where),
                            dtype=_get(d, "dtype", str, where, "float32"),
                            shape=tuple(shape),
                            null=_get(d, "null", (float, type(None)), where, None)))
    return tuple(out)
