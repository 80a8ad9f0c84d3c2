"""May this TensorRT plan run here? Compare a plan's sidecar with the machine.

``check_compatible`` says exactly why a plan must be rebuilt (replaced or stale files,
another engine, another GPU, another TensorRT version) and with which ``fewstep build``
command; nothing here imports TensorRT or CUDA. ``engine_problem`` is the refusal of a
plan that another engine built (a TensorRT-RTX plan offered to TensorRT's runtime), which
the ``tensorrt`` backend checks before it imports anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .plan import (
    ENGINE_NAMES,
    PlanSidecar,
    file_sha256,
    format_version,
    onnx_hashes,
    parse_compute_capability,
    parse_target,
    parse_version,
    rebuild_command,
    sidecar_path,
    sidecar_source,
)


@dataclass(frozen=True)
class RuntimeInfo:
    """The machine about to run a plan: the TensorRT it has and the GPU it runs on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    cuda_runtime_version: str = ""
    lean: bool = False  # only tensorrt_lean (the lean runtime) is installed
    engine: str = "tensorrt"  # the runtime about to deserialize the plan (plan.ENGINES)


def runs_on(targets: tuple[str, ...], compute_capability: str) -> bool:
    """Whether a GPU of ``compute_capability`` is one of ``targets`` ("12.x": any 12.y)."""
    major, minor = parse_compute_capability(compute_capability)
    return any(parse_target(t) in ((major, minor), (major, None)) for t in targets)


def engine_problem(sidecar: PlanSidecar, plan_path: str | os.PathLike[str],
                   engine: str = "tensorrt", gpu: tuple[str, str] | None = None,
                   onnx_path: str | os.PathLike[str] | None = None) -> str | None:
    """Why ``engine``'s runtime cannot load this plan (another engine built it), or None.

    ``gpu``: (name, compute capability) of the GPU here, when known, to say whether it is
    one of the plan's targets.
    """
    if sidecar.engine == engine:
        return None
    plan = Path(plan_path)
    source = Path(onnx_path) if onnx_path is not None else plan.parent / sidecar.onnx_file
    here = ""
    if gpu is not None and sidecar.targets:
        one = runs_on(sidecar.targets, gpu[1])
        here = (f"; this GPU ({gpu[0]}, compute capability {gpu[1]}) is "
                f"{'one' if one else 'not one'} of its targets")
    built = (f"{plan.name} was built by {sidecar.engine_name} {sidecar.tensorrt_version} "
             f"for {sidecar.describe_target()}{here}")
    fix = f"`{rebuild_command(plan, source, sidecar, engine=engine)}`"
    if sidecar.engine == "tensorrt-rtx":
        return (f"{built}, and {ENGINE_NAMES[engine]}'s runtime cannot load a TensorRT-RTX "
                f"plan: build one for this GPU with {fix}, or run this plan on an RTX GPU "
                "with TensorRT-RTX's own runtime (fewstep has no TensorRT-RTX backend)")
    return f"{built}, which {ENGINE_NAMES[engine]} cannot load: build one with {fix}"


def tensorrt_version_problem(
    built: str, running: str, version_compatible: bool, exclude_lean_runtime: bool,
    lean: bool,
) -> str | None:
    """Why a plan built with TensorRT ``built`` cannot run on ``running``, or None.

    * A plain plan runs only on the exact TensorRT version it was built with.
    * A version-compatible plan runs on the same or a newer TensorRT of the same major
      version, and a TensorRT 10 one also on TensorRT 11 (NVIDIA's support matrix); one
      built with EXCLUDE_LEAN_RUNTIME carries no lean runtime, so it needs the very
      TensorRT version that built it.
    * The lean runtime (``tensorrt_lean``) runs version-compatible plans only.
    """
    b, r = parse_version(built), parse_version(running)
    where = f"TensorRT {format_version(b)}"
    here = f"this is {'tensorrt-lean ' if lean else 'TensorRT '}{format_version(r)}"
    if lean and not version_compatible:
        return (f"was built with {where} without --version-compatible, and the lean runtime "
                f"runs only version-compatible plans ({here})")
    if not version_compatible:
        if b != r:
            return f"was built with {where} but {here}; plans are tied to the TensorRT version"
        return None
    if exclude_lean_runtime:
        if b != r:
            return (f"was built with {where} --version-compatible --exclude-lean-runtime, so it "
                    f"needs exactly that version's runtime, but {here}")
        return None
    if r < b:
        return (f"was built with {where} (version-compatible) and runs only on that version "
                f"or newer, but {here}")
    if r[0] == b[0] or (b[0], r[0]) == (10, 11):
        return None
    return (f"was built with {where} (version-compatible, good for later {b[0]}.x"
            f"{' and 11.x' if b[0] == 10 else ''}) but {here}")


def check_compatible(
    sidecar: PlanSidecar,
    runtime: RuntimeInfo,
    plan_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    verify_plan_hash: bool = True,
    check_source: bool = True,
) -> None:
    """Raise an ArtifactError saying exactly why ``plan_path`` must be rebuilt, if it must.

    Checked in this order: the engine that built the plan is ``runtime``'s, the plan file
    is the one the sidecar describes (sha256), the source ONNX (``onnx_path``, else the
    sidecar's ``onnx_file`` beside the plan, when it is there) has not changed since the
    build, the GPU (for a TensorRT-RTX plan: one of its targets), and the version.
    ``verify_plan_hash=False`` skips hashing the plan, ``check_source=False`` the ONNX.
    """
    plan = Path(plan_path)
    name = plan.name
    source = Path(onnx_path) if onnx_path is not None else plan.parent / sidecar.onnx_file
    followed = Path(onnx_path) if onnx_path is not None else sidecar_source(plan, sidecar)
    wanted = sidecar
    if runtime.lean and not sidecar.version_compatible:  # the lean runtime needs a VC plan
        wanted = dataclasses.replace(sidecar, version_compatible=True)
    cmd = f"`{rebuild_command(plan, source, wanted)}`"
    wrong_engine = engine_problem(sidecar, plan, runtime.engine,
                                  (runtime.gpu_name, runtime.compute_capability), onnx_path)
    if wrong_engine is not None:
        raise ArtifactError(wrong_engine)
    if verify_plan_hash:
        if not plan.is_file():
            raise ArtifactError(f"plan file {str(plan)!r} does not exist; build it with {cmd}")
        if plan.stat().st_size != sidecar.plan_bytes or file_sha256(plan) != sidecar.plan_sha256:
            raise ArtifactError(
                f"{name} is not the plan its sidecar {sidecar_path(plan).name} describes "
                "(sha256 differs: the plan was replaced or is corrupt); rebuild with " + cmd
            )
    if check_source and followed is not None and followed.is_file():
        onnx_sha, ext = onnx_hashes(followed)
        changed = [source.name] if onnx_sha != sidecar.onnx_sha256 else []
        changed += sorted(
            loc for loc, digest in ext.items()
            if loc in sidecar.external_data_sha256 and digest != sidecar.external_data_sha256[loc]
        )
        if changed:
            raise ArtifactError(
                f"{name} is stale: {', '.join(changed)} changed since the plan was built "
                f"({sidecar.created}); rebuild with {cmd}"
            )
    elif check_source and onnx_path is not None:
        raise ArtifactError(f"model file {str(source)!r} does not exist")
    if sidecar.targets:
        if not runs_on(sidecar.targets, runtime.compute_capability):
            raise ArtifactError(
                f"{name} was built by {sidecar.engine_name} for {sidecar.describe_target()}, "
                f"and this GPU ({runtime.gpu_name}, compute capability "
                f"{runtime.compute_capability}) is not one of them: rebuild it with "
                f"--target-cc {runtime.compute_capability} if {sidecar.engine_name} supports "
                f"that GPU, else build a TensorRT plan: "
                f"`{rebuild_command(plan, source, sidecar, engine='tensorrt')}`"
            )
    elif sidecar.compute_capability_tuple != parse_compute_capability(
            runtime.compute_capability) or sidecar.gpu_name != runtime.gpu_name:
        raise ArtifactError(
            f"{name} was built for GPU {sidecar.gpu_name!r} (compute "
            f"{sidecar.compute_capability}) but this is {runtime.gpu_name!r} (compute "
            f"{runtime.compute_capability}); plans are tied to the GPU: rebuild with {cmd}"
        )
    problem = tensorrt_version_problem(
        sidecar.tensorrt_version, runtime.tensorrt_version, sidecar.version_compatible,
        sidecar.exclude_lean_runtime, runtime.lean,
    )
    if problem is not None:
        extra = "" if wanted.version_compatible else (
            " (a plan built with --version-compatible also runs on later TensorRT versions)")
        raise ArtifactError(f"{name} {problem}: rebuild with {cmd}{extra}")
