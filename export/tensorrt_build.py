"""ONNX -> TensorRT plan + ``.plan.json`` sidecar, for TensorRT 10.x (Jetson) and 11.x,
and for TensorRT for RTX (engine ``tensorrt-rtx``).

Precision lives in the ONNX graph, so the network is strongly typed (TensorRT 11 and
TensorRT-RTX have nothing else; TensorRT 10 through STRONGLY_TYPED), except on TensorRT 10
when ``weak`` asks for BuilderFlag.FP16/BF16 on an fp32 graph. ``prepare_build`` checks
everything before TensorRT is imported; the plan and then its sidecar are written
atomically under one file lock, so no reader sees a partial plan or another build's
sidecar.

Both engines share one build (``build_from_request``: parser, profile, workspace,
optimisation level, serialisation, sidecar); they differ where their APIs do. TensorRT
builds for the GPU it runs on (needs that GPU and cuda-python) and keeps a timing cache.
TensorRT-RTX builds ahead of time, with or without a GPU, for the compute capabilities it
``targets`` (``IBuilderConfig.set_compute_capability``; by default 8.0, 8.6, 8.9 and 12.x),
and has no weak typing, no version-compatible plans (no lean runtime) and no timing cache
(its timing-cache calls do nothing since TensorRT-RTX 1.2 and force a GPU query).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewstep.runtime import checks, fileio
from fewstep.runtime.artifact import read_onnx_meta, require_portable
from fewstep.runtime.errors import ArtifactError, BackendUnavailable
from fewstep.runtime.fileio import file_lock, locked_update
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.plan import (
    ENGINE_NAMES,
    ENGINES,
    MIB,
    PLAN_EXT,
    RTX_DEFAULT_TARGETS,
    BatchProfile,
    PlanSidecar,
    default_profile,
    default_workspace_bytes,
    new_sidecar,
    onnx_hashes,
    parse_compute_capability,
    parse_version,
    profile_shapes,
    sidecar_path,
    timing_cache_key,
    timing_cache_path,
    write_sidecar,
)

OPT_LEVELS = range(0, 6)  # IBuilderConfig.builder_optimization_level: 0..5, default 3


RTX = "tensorrt-rtx"
RTX_MISSING = "TensorRT-RTX is not installed: pip install 'fewstep[tensorrt-rtx]'"


class BuildFailed(RuntimeError):
    """TensorRT ran and did not produce a plan (exit code 1 in the CLI)."""


class ParseFailed(ArtifactError):
    """TensorRT's ONNX parser refused the graph."""


@dataclass(frozen=True)
class BuildRequest:
    """A validated build, before TensorRT is imported."""

    onnx_path: Path
    out_path: Path
    meta: ModelMeta
    profile: BatchProfile | None  # None: the default for the GPU found at build time
    precision: str
    weak: str | None  # "fp16"/"bf16": weak typing of an fp32 graph (TensorRT 10), or None
    strongly_typed: bool | None  # None: strongly typed unless weak
    opt_level: int
    workspace_bytes: int | None  # None: default_workspace_bytes of the GPU
    timing_cache: Path | None  # a file, a folder for the keyed file, or None = default folder
    use_timing_cache: bool
    version_compatible: bool
    exclude_lean_runtime: bool
    verbose: bool
    engine: str = "tensorrt"  # plan.ENGINES
    targets: tuple[str, ...] = ()  # tensorrt-rtx: compute capabilities; () = its default


WEAK_FLAGS = {"fp16": "--fp16-weak", "bf16": "--bf16-weak"}


def prepare_build(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    batch: str | BatchProfile | None = None,
    precision: str | None = None,
    weak: str | None = None,
    strongly_typed: bool | None = None,
    opt_level: int = 3,
    workspace_mib: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    use_timing_cache: bool = True,
    version_compatible: bool = False,
    exclude_lean_runtime: bool = False,
    verbose: bool = False,
    engine: str = "tensorrt",
    targets: str | tuple[str, ...] | None = None,
) -> BuildRequest:
    """Check every argument and read the ONNX's ModelMeta; ValueError/ArtifactError if bad.

    ``engine``: "tensorrt" or "tensorrt-rtx"; ``targets`` (tensorrt-rtx only): compute
    capabilities, "8.6,8.9" or a tuple, the plan is built for (default: TensorRT-RTX's).
    """
    checks.choice("engine", engine, ENGINES)
    wanted_targets = parse_targets(targets, engine)
    if engine == RTX:
        refuse_for_rtx(weak=weak, version_compatible=version_compatible,
                       exclude_lean_runtime=exclude_lean_runtime,
                       timing_cache=timing_cache, strongly_typed=strongly_typed)
    onnx = Path(onnx_path)
    out = Path(out_path)
    if not out.name.endswith(PLAN_EXT):
        raise ValueError(f"--out {str(out)!r} must end in {PLAN_EXT} (e.g. --out model.plan)")
    meta = read_onnx_meta(onnx)  # missing file, not ONNX, no fewstep metadata: ArtifactError
    require_portable(onnx, meta, "a TensorRT build")
    fileio.check_writable_target(out)
    profile = BatchProfile.parse(batch) if isinstance(batch, str) else batch
    if not checks.is_whole_number(opt_level) or opt_level not in OPT_LEVELS:
        raise ValueError(f"--opt-level {opt_level} must be 0..5 (3 is TensorRT's default)")
    if workspace_mib is not None and (not checks.is_whole_number(workspace_mib)
                                      or workspace_mib < 1):
        raise ValueError(f"--workspace-mib {workspace_mib} must be at least 1")
    if exclude_lean_runtime and not version_compatible:
        raise ValueError(
            "--exclude-lean-runtime only applies to version-compatible plans; "
            "add --version-compatible"
        )
    graph_precision = meta.graph.precision
    if weak is not None:
        checks.choice("weak", weak, tuple(WEAK_FLAGS))
    if weak is not None and graph_precision != "fp32":
        raise ValueError(
            f"{WEAK_FLAGS[weak]} is for fp32 graphs, and {onnx.name} is already "
            f"{graph_precision}; drop {WEAK_FLAGS[weak]}"
        )
    if weak is not None and strongly_typed:
        raise ValueError(
            f"{WEAK_FLAGS[weak]} builds a weakly typed network, which strongly_typed=True "
            "forbids; drop one of them"
        )
    wanted = weak or graph_precision
    if precision is not None and precision != wanted:
        if precision in WEAK_FLAGS and weak is None:
            raise ValueError(
                f"{onnx.name} is an {graph_precision} graph and the precision lives in the "
                f"ONNX: export it with `fewstep export --precision {precision}` (or, on "
                f"TensorRT 10 only, build with {WEAK_FLAGS[precision]})"
            )
        raise ValueError(
            f"precision={precision!r} but {onnx.name} is an {graph_precision} graph"
            f"{f' built with {WEAK_FLAGS[weak]}' if weak else ''}; export an {precision} ONNX"
        )
    for target in (wanted_targets or RTX_DEFAULT_TARGETS) if engine == RTX else ():
        if "x" not in target:
            check_device_precision(wanted, target, "the --target-cc GPU")
    return BuildRequest(
        onnx_path=onnx, out_path=out, meta=meta, profile=profile, precision=wanted,
        weak=weak, strongly_typed=strongly_typed, opt_level=opt_level,
        workspace_bytes=None if workspace_mib is None else workspace_mib * MIB,
        timing_cache=None if timing_cache is None else Path(timing_cache),
        use_timing_cache=use_timing_cache and engine != RTX,
        version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime,
        verbose=verbose, engine=engine, targets=wanted_targets,
    )


def parse_targets(targets: str | tuple[str, ...] | None, engine: str) -> tuple[str, ...]:
    """``"8.6,8.9"`` -> ("8.6", "8.9"): the compute capabilities a TensorRT-RTX plan is for."""
    if targets is None or targets == "" or targets == ():
        return ()
    if engine != RTX:
        raise ValueError(
            f"--target-cc {targets if isinstance(targets, str) else ','.join(targets)} is for "
            "--engine tensorrt-rtx (a TensorRT plan runs on the GPU that builds it); drop "
            "--target-cc or add --engine tensorrt-rtx"
        )
    items = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else targets
    out: list[str] = []
    for item in items:
        try:
            parse_compute_capability(item)
        except ValueError:
            raise ValueError(
                f"--target-cc {item!r} is not a compute capability MAJOR.MINOR; pass e.g. "
                "--target-cc 8.6,8.9 (RTX 30 and 40 series)"
            ) from None
        if item not in out:
            out.append(item)
    return tuple(out)


def refuse_for_rtx(*, weak: str | None, version_compatible: bool, exclude_lean_runtime: bool,
                   timing_cache: object, strongly_typed: bool | None) -> None:
    """ValueError naming the first option TensorRT-RTX does not have."""
    if weak is not None:
        raise ValueError(
            f"{WEAK_FLAGS.get(weak, weak)} is not available with --engine tensorrt-rtx, which "
            f"has no weak typing; export the model with --precision {weak} and build that")
    if version_compatible or exclude_lean_runtime:
        flag = "--version-compatible" if version_compatible else "--exclude-lean-runtime"
        raise ValueError(
            f"{flag} is not available with --engine tensorrt-rtx (TensorRT-RTX has no lean "
            f"runtime and no version-compatible plans); drop {flag}")
    if timing_cache is not None:
        raise ValueError(
            "--timing-cache is not available with --engine tensorrt-rtx (TensorRT-RTX "
            "ignores timing caches); drop --timing-cache")
    if strongly_typed is False:
        raise ValueError("TensorRT-RTX networks are always strongly typed; drop "
                         "strongly_typed=False")


@dataclass(frozen=True)
class TypingMode:
    strongly_typed: bool  # what the plan is
    network_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT 10 only)
    fp16_flag: bool  # set BuilderFlag.FP16 (TensorRT 10, weak typing only)
    bf16_flag: bool = False  # set BuilderFlag.BF16 (TensorRT 10, weak typing only)


def typing_mode(tensorrt_version: str, weak: str | None,
                strongly_typed: bool | None) -> TypingMode:
    """How to type the network on this TensorRT version (see the module docstring)."""
    major = parse_version(tensorrt_version)[0]
    if major < 10:
        raise ValueError(
            f"TensorRT {tensorrt_version} is too old; fewstep builds with TensorRT 10.x or "
            "11.x: pip install -U 'fewstep[tensorrt]' (JetPack 6 ships 10.x)"
        )
    if major >= 11:
        if weak is not None:
            raise ValueError(
                f"{WEAK_FLAGS[weak]} needs TensorRT 10: TensorRT {tensorrt_version} removed "
                f"weak typing (BuilderFlag.{weak.upper()}); export the model with --precision "
                f"{weak} instead (a {weak} ONNX with fp32 islands) and build that"
            )
        if strongly_typed is False:
            raise ValueError(
                f"TensorRT {tensorrt_version} networks are always strongly typed; "
                "drop strongly_typed=False"
            )
        # STRONGLY_TYPED is deprecated and ignored on 11.x: pass no flag.
        return TypingMode(strongly_typed=True, network_flag=False, fp16_flag=False)
    if weak is not None and strongly_typed:
        raise ValueError(f"{WEAK_FLAGS[weak]} needs a weakly typed network; drop "
                         "strongly_typed=True")
    st = (weak is None) if strongly_typed is None else strongly_typed
    return TypingMode(strongly_typed=st, network_flag=st, fp16_flag=weak == "fp16",
                      bf16_flag=weak == "bf16")


BF16_MIN_COMPUTE = (8, 0)  # bf16 tensor cores: Ampere and newer (Jetson Orin: 8.7)


def check_device_precision(precision: str, compute_capability: str, gpu: str = "this GPU") -> None:
    """ValueError when the plan's precision cannot run on a GPU of ``compute_capability``."""
    if precision != "bf16":
        return
    major, minor = (int(x) for x in compute_capability.split(".")[:2])
    if (major, minor) < BF16_MIN_COMPUTE:
        raise ValueError(
            f"{gpu} (compute capability {compute_capability}) has no bf16 support, which "
            f"needs {'.'.join(map(str, BF16_MIN_COMPUTE))} or newer (Ampere, Jetson Orin); "
            "export with --precision fp16 instead"
        )


def weak_builder_flags(mode: TypingMode) -> list[str]:
    """Names of the BuilderFlag members weak typing sets ([] when strongly typed)."""
    return [name for name, on in (("FP16", mode.fp16_flag), ("BF16", mode.bf16_flag)) if on]


def say(msg: str) -> None:
    print(f"fewstep build: {msg}", file=sys.stderr, flush=True)


def build_plan(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    batch: str | BatchProfile | None = None,
    precision: str | None = None,
    weak: str | None = None,
    strongly_typed: bool | None = None,
    opt_level: int = 3,
    workspace_mib: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    use_timing_cache: bool = True,
    version_compatible: bool = False,
    exclude_lean_runtime: bool = False,
    verbose: bool = False,
    engine: str = "tensorrt",
    targets: str | tuple[str, ...] | None = None,
) -> PlanSidecar:
    """Build ``out_path`` (+ ``out_path``.json) from ``onnx_path``; returns the sidecar.

    ``batch``: "min:opt:max", "N" or a BatchProfile (default ``plan.default_profile``).
    ``timing_cache``: a cache file, or a folder for the file named by GPU and TensorRT
    version (default ``plan.default_cache_dir()``); ``use_timing_cache=False`` for none.
    ``engine="tensorrt-rtx"``: a TensorRT-RTX plan for ``targets`` (see ``prepare_build``).
    """
    request = prepare_build(
        onnx_path, out_path, batch=batch, precision=precision, weak=weak,
        strongly_typed=strongly_typed, opt_level=opt_level, workspace_mib=workspace_mib,
        timing_cache=timing_cache, use_timing_cache=use_timing_cache,
        version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime,
        verbose=verbose, engine=engine, targets=targets,
    )
    return build_from_request(request)


def import_build_tensorrt() -> Any:
    """The full tensorrt module (the lean runtime cannot build), or BackendUnavailable."""
    from fewstep.runtime.backends.tensorrt_engine import TRT_MISSING

    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(TRT_MISSING) from None
    return tensorrt


def import_build_module(engine: str = "tensorrt") -> Any:
    """The module that builds ``engine``'s plans (tensorrt, or TensorRT-RTX's bindings),
    or BackendUnavailable saying how to install it."""
    if engine != RTX:
        return import_build_tensorrt()
    for name in ("tensorrt_rtx_bindings", "tensorrt_rtx"):  # the wheel's module; its alias
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:  # a broken install: its libraries do not load
            raise BackendUnavailable(
                f"TensorRT-RTX does not load ({type(e).__name__}: {e}); reinstall it: "
                "pip install --force-reinstall 'fewstep[tensorrt-rtx]'") from None
    raise BackendUnavailable(RTX_MISSING)


def _build_device(engine: str) -> Any:
    """The GPU a build runs on (``cuda.DeviceInfo``): required by TensorRT; for TensorRT-RTX,
    which builds without one, None when cuda-python or a GPU is missing."""
    from fewstep.runtime.backends import cuda

    try:
        cudart = cuda.import_cudart()
    except ImportError:
        if engine == RTX:
            return None
        raise BackendUnavailable(cuda.CUDA_PYTHON_MISSING) from None
    if engine != RTX:
        return cuda.device_info(cudart)
    try:
        return cuda.device_info(cudart)
    except Exception:  # no GPU, no driver: an ahead-of-time build needs neither
        return None


def _set_targets(trt: Any, config: Any, targets: tuple[str, ...], version: str) -> None:
    """IBuilderConfig.set_compute_capability for each target (TensorRT-RTX)."""
    enum = trt.ComputeCapability
    known = {f"{int(str(v.name)[2:-1])}.{str(v.name)[-1]}": v
             for v in enum.__members__.values() if str(v.name)[:2] == "SM"}
    missing = [t for t in targets if t not in known]
    if missing:
        raise ValueError(
            f"--target-cc {','.join(missing)}: TensorRT-RTX {version} builds for compute "
            f"capability {', '.join(sorted(known, key=parse_compute_capability))} only; "
            "for other GPUs (such as datacenter GPUs) build with --engine tensorrt on them")
    config.num_compute_capabilities = len(targets)
    for i, target in enumerate(targets):
        if not config.set_compute_capability(known[target], i):
            raise ValueError(f"TensorRT-RTX {version} refused --target-cc {target}")


def _cache_file(request: BuildRequest, gpu: str, cc: str, trt_version: str) -> Path:
    given = request.timing_cache
    if given is not None and not given.is_dir():
        return given
    return timing_cache_path(gpu, cc, trt_version, given)


def build_from_request(request: BuildRequest) -> PlanSidecar:
    """Run TensorRT (or TensorRT-RTX) on a validated request (see ``build_plan``)."""
    from fewstep.runtime.backends.tensorrt_engine import make_logger

    rtx = request.engine == RTX
    trt = import_build_module(request.engine)
    trt_version = str(trt.__version__)
    label = f"{ENGINE_NAMES[request.engine]} {trt_version}"
    mode = (TypingMode(strongly_typed=True, network_flag=False, fp16_flag=False) if rtx
            else typing_mode(trt_version, request.weak, request.strongly_typed))
    dev = _build_device(request.engine)
    if not rtx:
        check_device_precision(request.precision, dev.compute_capability, dev.name)
    meta = request.meta
    profile = request.profile or default_profile(meta, jetson=bool(dev and dev.integrated
                                                                   and not rtx))
    # TensorRT-RTX: the workspace limit only where asked for (its build needs no GPU).
    workspace = request.workspace_bytes or (0 if rtx else default_workspace_bytes(
        dev.free_memory, dev.total_memory, dev.integrated))
    targets = (request.targets or RTX_DEFAULT_TARGETS) if rtx else ()
    name = request.onnx_path.name
    started = time.monotonic()

    logger = make_logger(trt, request.verbose)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.network_flag else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {name} with {label} "
        + (f"(strongly typed, {meta.graph.precision} from the graph)" if mode.strongly_typed
           else f"(weakly typed, {request.precision} allowed)"))
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ParseFailed(
            f"{label} could not parse {name}: "
            + ("; ".join(errors) or "; ".join(logger.errors) or "no message")
            + "; re-export it with `fewstep export` (check the ONNX opset is supported)"
        )
    _check_network(network, meta, profile, name)

    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = request.opt_level
    if request.targets:
        _set_targets(trt, config, request.targets, trt_version)
    for flag_name in weak_builder_flags(mode):
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is None:
            raise ValueError(
                f"TensorRT {trt_version} has no BuilderFlag.{flag_name}; export the model "
                f"with --precision {request.precision} and build without "
                f"{WEAK_FLAGS[request.precision]}"
            )
        config.set_flag(flag)
    if request.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if request.exclude_lean_runtime:
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    opt_profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in profile_shapes(meta, profile).items():
        opt_profile.set_shape(tensor, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise BuildFailed(f"{label} rejected the profile {profile}: "
                          f"{'; '.join(logger.errors)}")

    cache_file = None
    if request.use_timing_cache and not rtx:
        cache_file = _cache_file(request, dev.name, dev.compute_capability, trt_version)
        blob = cache_file.read_bytes() if cache_file.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None and blob:
            say(f"timing cache {cache_file} is unreadable; starting an empty one")
            cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            say(f"timing cache {cache_file} was made on another device; starting an empty one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    where = (f"for RTX GPUs of compute capability {', '.join(targets)}"
             + (f" (ahead of time, on {dev.name})" if dev else " (ahead of time, no GPU here)")
             if rtx else f"on {dev.name} (compute {dev.compute_capability})")
    say(f"building batch {profile} {where}, opt level {request.opt_level}"
        + (f", workspace {workspace // MIB} MiB" if workspace else "")
        + (", version-compatible" if request.version_compatible else "")
        + (" (without lean runtime)" if request.exclude_lean_runtime else ""))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildFailed(
            f"{label} could not build {name}: "
            + ("; ".join(logger.errors[-5:]) or "no error message (try --verbose)")
        )
    plan = bytes(memoryview(serialized))
    del serialized

    onnx_sha, ext = onnx_hashes(request.onnx_path)
    onnx_file = os.path.relpath(request.onnx_path.resolve(), request.out_path.resolve().parent)
    sidecar = new_sidecar(
        meta=meta, tensorrt_version=trt_version,
        cuda_runtime_version=dev.cuda_runtime_version if dev else "",
        gpu_name=dev.name if dev else "", compute_capability=dev.compute_capability if dev
        else "", profile=profile, engine=request.engine, targets=targets,
        precision=request.precision, strongly_typed=mode.strongly_typed,
        fp16_weak=request.weak == "fp16", builder_optimization_level=request.opt_level,
        workspace_bytes=workspace, version_compatible=request.version_compatible,
        exclude_lean_runtime=request.exclude_lean_runtime, onnx_file=onnx_file,
        onnx_sha256=onnx_sha, external_data_sha256=ext,
        plan_sha256=hashlib.sha256(plan).hexdigest(), plan_bytes=len(plan),
        extra={"timing_cache": timing_cache_key(dev.name, dev.compute_capability, trt_version)
               if cache_file is not None else "",
               "build_seconds": round(time.monotonic() - started, 2),
               # PlanSidecar has a field for --fp16-weak only; --bf16-weak is noted here.
               **({"bf16_weak": True} if request.weak == "bf16" else {})},
    )
    write_plan(request.out_path, plan, sidecar)
    if cache_file is not None:
        _save_timing_cache(config, cache_file)
    say(f"wrote {request.out_path} ({len(plan) / MIB:.1f} MiB) and "
        f"{sidecar_path(request.out_path).name} in {time.monotonic() - started:.1f} s")
    return sidecar


def write_plan(out_path: Path, plan: bytes, sidecar: PlanSidecar) -> None:
    """The plan, then its sidecar, each atomically, under one lock: readers see either the
    old pair, a new plan with the old sidecar (refused: its sha256 differs) or the new pair."""
    if hashlib.sha256(plan).hexdigest() != sidecar.plan_sha256:
        raise AssertionError("sidecar does not describe this plan")
    with file_lock(out_path):
        fileio.write_bytes(out_path, plan)
        write_sidecar(out_path, sidecar)


def _save_timing_cache(config: Any, cache_file: Path) -> None:
    """Merge this build's timings into the cache file (another build may have added some)."""
    cache = config.get_timing_cache()
    if cache is None:
        return

    def merge(old: bytes | None) -> bytes:
        if old:
            on_disk = config.create_timing_cache(old)
            if on_disk is not None:
                cache.combine(on_disk, ignore_mismatch=True)
        return bytes(memoryview(cache.serialize()))

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        locked_update(cache_file, merge)
    except (OSError, ValueError) as e:  # a cache is an optimisation, never a failure
        say(f"could not save the timing cache {cache_file}: {e}")


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _check_network(network: Any, meta: ModelMeta, profile: BatchProfile, name: str) -> None:
    """The parsed network has the graph's inputs/outputs, with shapes the profile fits."""
    inputs = {network.get_input(i).name: _dims(network.get_input(i).shape)
              for i in range(network.num_inputs)}
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    g = meta.graph
    if sorted(inputs) != sorted(g.inputs) or outputs != list(g.outputs):
        raise ArtifactError(
            f"{name} has inputs {sorted(inputs)} -> {outputs} but its fewstep metadata says "
            f"{sorted(g.inputs)} -> {list(g.outputs)}; re-export it with `fewstep export`"
        )
    for tensor, shapes in profile_shapes(meta, profile).items():
        dims = inputs[tensor]
        for shape in (shapes[0], shapes[2]):
            if len(dims) != len(shape) or any(
                d not in (-1, s) for d, s in zip(dims, shape, strict=True)
            ):
                fixed = dims[0] if dims and dims[0] > 0 else None
                hint = (f"; it was exported with a fixed batch of {fixed}: pass --batch {fixed} "
                        "or re-export with a dynamic batch") if fixed else ""
                raise ArtifactError(
                    f"{name}: input {tensor!r} has shape {dims} (-1 = dynamic), which does not "
                    f"fit {shape} needed for batch {profile}{hint}"
                )


def plan_name_for(onnx_path: Path, out: Path, meta: ModelMeta) -> Path:
    """Where ``--all`` puts the plan of one sibling graph: same naming as the ONNX files."""
    from fewstep.runtime.artifact import base_stem, graph_path

    g = meta.graph
    base = out if out.name.endswith(PLAN_EXT) else out / (base_stem(onnx_path) + PLAN_EXT)
    return graph_path(base, g.kind, g.steps, g.eta, ext=PLAN_EXT)


__all__ = [
    "RTX",
    "RTX_MISSING",
    "BuildFailed",
    "BuildRequest",
    "ParseFailed",
    "TypingMode",
    "build_from_request",
    "build_plan",
    "check_device_precision",
    "import_build_module",
    "parse_targets",
    "plan_name_for",
    "prepare_build",
    "typing_mode",
    "weak_builder_flags",
    "write_plan",
]
