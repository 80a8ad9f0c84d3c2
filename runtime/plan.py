"""TensorRT plans: the ``.plan.json`` sidecar, batch profiles, timing-cache files.

A TensorRT plan has no metadata field, and it only runs on the GPU model and the
TensorRT version it was built with. So every ``model.plan`` gets a ``model.plan.json``
sidecar that records what the plan is (the ModelMeta of the ONNX it came from) and what
it is tied to (the engine that built it, TensorRT version, GPU, compute capability, the
batch profile, the build flags, and sha256 of the plan and of its source ONNX with the
ONNX's external weights). A TensorRT-RTX plan (engine ``tensorrt-rtx``) is built ahead of
time for the RTX compute capabilities it ``targets``, not for the GPU it was built on.
The input shapes come from the graph I/O contract, ``ModelMeta.io``.
``plan_check.check_compatible`` compares a sidecar with the machine about to run the
plan and says exactly why a plan must be rebuilt, and with which command.

Nothing here imports TensorRT or CUDA: the sidecar and the profile maths
(``BatchProfile``, ``profile_shapes``) are pure Python, tested without a GPU. Timing
caches and plans are written under ``fileio.file_lock``.

Notation: B batch, C/H/W image channels/height/width, S the steps of a fused sampler.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import fileio
from .artifact import contained_file, external_files, read_onnx_header
from .checks import is_whole_number
from .errors import ArtifactError
from .meta import ModelMeta

# The profile maths lives in plan_profile; these names are re-exported from here.
from .plan_profile import DEFAULT_MAX_BATCH as DEFAULT_MAX_BATCH
from .plan_profile import JETSON_MAX_BATCH as JETSON_MAX_BATCH
from .plan_profile import BatchProfile as BatchProfile
from .plan_profile import default_profile as default_profile
from .plan_profile import default_workspace_bytes as default_workspace_bytes
from .plan_profile import profile_shapes as profile_shapes

SIDECAR_SCHEMA_VERSION: Final = 2  # 2 added engine and targets; 1 is read as TensorRT
SIDECAR_SCHEMA_VERSIONS: Final = (1, 2)
SIDECAR_SUFFIX: Final = ".json"  # model.plan -> model.plan.json
PLAN_EXT: Final = ".plan"


# The engines that build plans: NVIDIA TensorRT and TensorRT for RTX (a plan of one never
# runs on the other's runtime).
ENGINES: Final = ("tensorrt", "tensorrt-rtx")
ENGINE_NAMES: Final = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
# What a TensorRT-RTX plan built without explicit targets runs on (NVIDIA's TensorRT-RTX
# docs: compute capability 8.0, 8.6, 8.9 and 12.x; not 7.5 unless asked for, not 9.0/10.0).
RTX_DEFAULT_TARGETS: Final = ("8.0", "8.6", "8.9", "12.x")

MIB: Final = 1 << 20
MAX_SIDECAR_BYTES: Final = 16 * MIB  # the ModelMeta inside is capped at 8 MiB
GIB: Final = 1 << 30


# ---------------------------------------------------------------------------------
# TensorRT versions
# ---------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.26"`` or ``"10.3.0.post1"`` -> (10, 3, 0)."""
    nums = re.findall(r"\d+", text.split("+")[0])[:3]
    if not nums or not re.match(r"\s*\d", text):
        raise ValueError(f"TensorRT version {text!r} is not of the form MAJOR.MINOR.PATCH")
    return tuple(int(n) for n in nums + ["0"] * (3 - len(nums)))  # type: ignore[return-value]


def format_version(version: tuple[int, int, int]) -> str:
    return ".".join(str(v) for v in version)


# ---------------------------------------------------------------------------------
# The sidecar
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSidecar:
    """Everything about one plan that the plan file itself does not say."""

    meta: ModelMeta
    tensorrt_version: str  # "10.3.0"
    cuda_runtime_version: str  # "12.6"
    gpu_name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    profile: BatchProfile
    precision: str  # what the engine computes in: the ONNX's, or "fp16" with fp16_weak
    strongly_typed: bool
    fp16_weak: bool  # TensorRT 10 BuilderFlag.FP16 on an fp32 graph (weak typing)
    builder_optimization_level: int
    workspace_bytes: int  # 0 = TensorRT's default (all device memory)
    version_compatible: bool
    exclude_lean_runtime: bool
    onnx_file: str  # the source ONNX, relative to the plan's folder when beside it
    onnx_sha256: str
    external_data_sha256: Mapping[str, str]  # external weights file name -> sha256
    plan_sha256: str
    plan_bytes: int
    created: str  # ISO 8601, UTC
    fewstep_version: str
    schema_version: int = SIDECAR_SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form build notes
    engine: str = "tensorrt"  # one of ENGINES; tensorrt_version is that engine's version
    # tensorrt-rtx: the compute capabilities the plan runs on ("8.9", "12.x" = any 12.y);
    # tensorrt: () (the plan runs on the GPU it was built on)
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.schema_version not in SIDECAR_SCHEMA_VERSIONS:
            raise ValueError(f"schema_version {self.schema_version} not in "
                             f"{SIDECAR_SCHEMA_VERSIONS}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if (self.engine == "tensorrt-rtx") != bool(self.targets):
            raise ValueError(f"a {self.engine} plan has {'' if self.targets else 'no '}targets")
        for target in self.targets:
            parse_target(target)
        parse_version(self.tensorrt_version)
        if self.compute_capability or self.engine == "tensorrt":  # RTX: built with no GPU
            parse_compute_capability(self.compute_capability)
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level {self.builder_optimization_level}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ValueError("exclude_lean_runtime is only meaningful with version_compatible")
        for digest in (self.onnx_sha256, self.plan_sha256, *self.external_data_sha256.values()):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{digest!r} is not a sha256 hex digest")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "meta": self.meta.to_dict(),
            "tensorrt_version": self.tensorrt_version,
            "cuda_runtime_version": self.cuda_runtime_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "profile": {"min": self.profile.min, "opt": self.profile.opt, "max": self.profile.max},
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "fp16_weak": self.fp16_weak,
            "builder_optimization_level": self.builder_optimization_level,
            "workspace_bytes": self.workspace_bytes,
            "version_compatible": self.version_compatible,
            "exclude_lean_runtime": self.exclude_lean_runtime,
            "onnx_file": self.onnx_file,
            "onnx_sha256": self.onnx_sha256,
            "external_data_sha256": dict(self.external_data_sha256),
            "plan_sha256": self.plan_sha256,
            "plan_bytes": self.plan_bytes,
            "created": self.created,
            "fewstep_version": self.fewstep_version,
            "extra": dict(self.extra),
            "engine": self.engine,
            "targets": list(self.targets),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "sidecar") -> PlanSidecar:
        try:
            data = json.loads(text)
        except (ValueError, TypeError, RecursionError) as e:
            raise ArtifactError(
                f"{source} is not valid JSON ({e}); {_rebuild_from_sidecar_path(source)}"
            ) from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: object, source: str = "sidecar") -> PlanSidecar:
        return _parse_sidecar(data, source)

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        return parse_compute_capability(self.compute_capability)

    @property
    def engine_name(self) -> str:
        """"TensorRT" or "TensorRT-RTX"."""
        return ENGINE_NAMES[self.engine]

    def describe_target(self) -> str:
        """What the plan runs on, for messages and ``fewstep info``."""
        if self.engine == "tensorrt-rtx":
            return f"RTX GPUs of compute capability {', '.join(self.targets)}"
        return f"{self.gpu_name} (compute capability {self.compute_capability})"


def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    p = Path(plan_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def onnx_path_for(plan_path: str | os.PathLike[str]) -> Path:
    """The ONNX file a plan is conventionally built from: model.step.plan -> model.step.onnx."""
    p = Path(plan_path)
    stem = p.name[: -len(PLAN_EXT)] if p.name.endswith(PLAN_EXT) else p.name
    return p.with_name(stem + ".onnx")


def rebuild_command(
    plan_path: str | os.PathLike[str],
    onnx: str | os.PathLike[str] | None = None,
    sidecar: PlanSidecar | None = None,
    engine: str | None = None,
) -> str:
    """The ``fewstep build`` command that makes ``plan_path`` again (same flags); with
    ``engine``, the command that builds it with that engine instead."""
    plan = Path(plan_path)
    if onnx is None:
        onnx = plan.parent / sidecar.onnx_file if sidecar is not None else onnx_path_for(plan)
    words = ["fewstep", "build", str(onnx), "--out", str(plan)]
    engine = engine or (sidecar.engine if sidecar is not None else "tensorrt")
    if engine != "tensorrt":
        words += ["--engine", engine]
    if sidecar is not None:
        words += ["--batch", str(sidecar.profile)]
        if sidecar.builder_optimization_level != 3:
            words += ["--opt-level", str(sidecar.builder_optimization_level)]
    if sidecar is not None and engine == sidecar.engine:  # the engine's own flags
        if sidecar.targets and sidecar.targets != RTX_DEFAULT_TARGETS:
            words += ["--target-cc", ",".join(sidecar.targets)]
        flags = (("--version-compatible", sidecar.version_compatible),
                 ("--exclude-lean-runtime", sidecar.exclude_lean_runtime),
                 ("--fp16-weak", sidecar.fp16_weak),
                 ("--bf16-weak", bool(sidecar.extra.get("bf16_weak"))))
        words += [flag for flag, on in flags if on]
    return " ".join(shlex.quote(w) for w in words)


def _rebuild_from_sidecar_path(source: str) -> str:
    plan = source[: -len(SIDECAR_SUFFIX)] if source.endswith(SIDECAR_SUFFIX) else source
    return f"rebuild with `{rebuild_command(plan)}`"


def write_sidecar(plan_path: str | os.PathLike[str], sidecar: PlanSidecar) -> Path:
    """Write ``model.plan.json`` atomically; returns its path."""
    return fileio.write_text(sidecar_path(plan_path), sidecar.to_json())


def load_sidecar(plan_path: str | os.PathLike[str]) -> PlanSidecar:
    """The sidecar of ``plan_path``, or one ArtifactError saying why not and how to fix it."""
    side = sidecar_path(plan_path)
    plan = Path(plan_path)
    contained_file(plan.parent, side.name, "sidecar", must_exist=False)
    if not side.is_file():
        raise ArtifactError(
            f"no sidecar {side.name} beside {str(plan)!r}: fewstep needs it to know what the "
            f"plan is (model, profile, GPU, TensorRT version); rebuild with "
            f"`{rebuild_command(plan)}`"
        )
    try:
        size = side.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise ArtifactError(
                f"{str(side)!r} is {size} bytes, more than a sidecar can be "
                f"({MAX_SIDECAR_BYTES}); it is not a fewstep sidecar: rebuild with "
                f"`{rebuild_command(plan)}`"
            )
        text = side.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{str(side)!r} cannot be read ({e.strerror})") from None
    return PlanSidecar.from_json(text, source=str(side))


# -- strict parsing ------------------------------------------------------------------

_SIDECAR_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "schema_version": int,
    "meta": dict,
    "tensorrt_version": str,
    "cuda_runtime_version": str,
    "gpu_name": str,
    "compute_capability": str,
    "profile": dict,
    "precision": str,
    "strongly_typed": bool,
    "fp16_weak": bool,
    "builder_optimization_level": int,
    "workspace_bytes": int,
    "version_compatible": bool,
    "exclude_lean_runtime": bool,
    "onnx_file": str,
    "onnx_sha256": str,
    "external_data_sha256": dict,
    "plan_sha256": str,
    "plan_bytes": int,
    "created": str,
    "fewstep_version": str,
    "extra": dict,
    "engine": str,
    "targets": list,
}
_OPTIONAL: Final = {"extra", "engine", "targets"}  # engine and targets: not in version 1


def _parse_sidecar(data: object, source: str) -> PlanSidecar:
    fix = _rebuild_from_sidecar_path(source)

    def fail(where: str, msg: str) -> ArtifactError:
        return ArtifactError(f"{source}: plan sidecar field {where}: {msg}; {fix}")

    if not isinstance(data, dict):
        raise ArtifactError(
            f"{source}: a plan sidecar is a JSON object, got {type(data).__name__}; {fix}"
        )
    version = data.get("schema_version")
    if version == 1 and ("engine" in data or "targets" in data):
        raise fail("(top level)", "engine and targets need schema_version 2")
    if is_whole_number(version) and version > SIDECAR_SCHEMA_VERSION:
        raise ArtifactError(
            f"{source}: plan sidecar schema version {version} is newer than this fewstep "
            f"supports ({SIDECAR_SCHEMA_VERSION}); upgrade fewstep (pip install -U fewstep) "
            f"or {fix}"
        )
    extra_keys = sorted(set(data) - set(_SIDECAR_TYPES))
    if extra_keys:
        raise fail("(top level)", f"unknown keys {extra_keys}")
    for key, kind in _SIDECAR_TYPES.items():
        if key not in data:
            if key in _OPTIONAL:
                continue
            raise fail(key, "missing")
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise fail(key, f"{value!r} is not {' or '.join(k.__name__ for k in kinds)}")
    if version is None or version < 1:
        raise fail("schema_version", f"{version} is not a valid version")
    prof = data["profile"]
    if sorted(prof) != ["max", "min", "opt"] or not all(is_whole_number(v) for v in prof.values()):
        raise fail("profile", f"{prof!r} is not {{'min': int, 'opt': int, 'max': int}}")
    ext = data["external_data_sha256"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in ext.items()):
        raise fail("external_data_sha256", "must map file names to sha256 strings")
    targets = data.get("targets", [])
    if not all(isinstance(t, str) for t in targets):
        raise fail("targets", f"{targets!r} is not a list of compute capabilities")
    try:
        meta = ModelMeta.from_dict(data["meta"], source=f"{source} (meta)")
    except ArtifactError as e:
        raise ArtifactError(f"{e}; {fix}") from None
    try:
        profile = BatchProfile(prof["min"], prof["opt"], prof["max"])
        return PlanSidecar(
            meta=meta,
            profile=profile,
            external_data_sha256=dict(ext),
            extra=dict(data.get("extra", {})),
            engine=data.get("engine", "tensorrt"),
            targets=tuple(targets),
            **{k: data[k] for k in _SIDECAR_TYPES if k not in (
                "meta", "profile", "external_data_sha256", "extra", "engine", "targets")},
        )
    except ValueError as e:
        raise fail("(values)", str(e)) from None


def file_sha256(path: str | os.PathLike[str], chunk: int = 8 * MIB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def onnx_hashes(onnx_path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """sha256 of an ONNX file and of each external data file it references beside it."""
    p = Path(onnx_path)
    header = read_onnx_header(p)
    ext = {loc: file_sha256(data)
           for loc, data in zip(header.external_data, external_files(p, header), strict=True)}
    return file_sha256(p), ext


def parse_compute_capability(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"compute capability {text!r} is not MAJOR.MINOR (e.g. '8.7')")
    return int(m.group(1)), int(m.group(2))


def parse_target(text: str) -> tuple[int, int | None]:
    """A plan's target: ``"8.9"`` -> (8, 9); ``"12.x"`` (any 12.y) -> (12, None)."""
    m = re.fullmatch(r"(\d+)\.(\d+|x)", text)
    if not m:
        raise ValueError(f"target {text!r} is not a compute capability MAJOR.MINOR (e.g. "
                         "'8.9') or MAJOR.x")
    return int(m.group(1)), None if m.group(2) == "x" else int(m.group(2))



def sidecar_source(plan_path: str | os.PathLike[str], sidecar: PlanSidecar) -> Path | None:
    """The plan's source ONNX named by the sidecar when it lies inside the plan's folder
    (``artifact.contained_file``), else None: a source elsewhere (``fewstep build
    model.onnx --out plans/`` records ``../model.onnx``) is never opened from what a
    sidecar says; pass it explicitly to check it."""
    plan = Path(plan_path)
    try:
        return contained_file(plan.parent, sidecar.onnx_file, "source ONNX of the plan",
                              must_exist=False)
    except ArtifactError:
        return None


def new_sidecar(**fields: Any) -> PlanSidecar:
    """A PlanSidecar stamped with the current UTC time and this fewstep's version."""
    from . import __version__

    fields.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    fields.setdefault("fewstep_version", __version__)
    return PlanSidecar(**fields)


# ---------------------------------------------------------------------------------
# Timing cache files (written with fileio.locked_update)
# ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FEWSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``."""
    env = os.environ.get("FEWSTEP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fewstep"


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def timing_cache_key(gpu_name: str, compute_capability: str, tensorrt_version: str) -> str:
    major, minor = parse_compute_capability(compute_capability)
    trt = format_version(parse_version(tensorrt_version))
    return f"timing-{gpu_slug(gpu_name)}-cc{major}{minor}-trt{trt}.cache"


def timing_cache_path(
    gpu_name: str, compute_capability: str, tensorrt_version: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``<cache dir>/timing-<gpu slug>-cc<major><minor>-trt<version>.cache``."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / timing_cache_key(gpu_name, compute_capability, tensorrt_version)
