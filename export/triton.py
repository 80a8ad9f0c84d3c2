"""A Triton Inference Server model repository from an exported fewstep artifact.

``fewstep export ... --triton DIR`` or ``python -m fewstep.export.triton model.onnx --out
DIR [--plans PLANS]`` writes one model folder per fused sampler graph (ONNX Runtime
backend; plus a ``tensorrt_plan`` model where a current plan of it exists) and one
Python-backend model, ``<stem>_ddim``, that runs the DDIM loop over the step (else the
denoiser) graph at any step count per request: a Triton ensemble is a loop-free DAG, so
it could not. Each ONNX file is copied with its external weights beside it under the
name the graph records, since ONNX Runtime resolves them relative to the graph file.
Folders are staged and renamed into place; a folder fewstep did not write is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from fewstep.runtime import __version__, artifact, checks, clitools
from fewstep.runtime import plan as trt_plan
from fewstep.runtime.errors import ArtifactError, quote
from fewstep.runtime.fileio import staging_dir
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.sampling import default_spacing

from . import triton_model

VERSION: Final = "1"
MARKER: Final = "fewstep-triton.json"
MODEL_PY: Final = Path(__file__).with_name("triton_model.py")
DEFAULT_QUEUE_DELAY_US: Final = 500
KINDS: Final = ("gpu", "cpu")
TYPES: Final = {np.dtype(np.float32): "TYPE_FP32", np.dtype(np.int64): "TYPE_INT64",
                np.dtype(np.uint8): "TYPE_UINT8"}
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TritonOptions:
    """How the repository's models are configured."""

    instance_kind: str = "gpu"  # KIND_GPU, or "cpu": KIND_CPU (TensorRT models stay GPU)
    instance_count: int = 1
    max_batch: int | None = None  # default: the plan's profile max, else default_profile
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    default_steps: int | None = None  # the Python model's; default distilled steps, else 4
    prefix: str | None = None  # model names start with this; default the artifact's stem

    def __post_init__(self) -> None:
        if self.instance_kind not in KINDS:
            raise ValueError(f"instance_kind={self.instance_kind!r} must be gpu or cpu")
        for name in ("instance_count", "max_batch", "default_steps"):
            value = getattr(self, name)
            if value is not None:
                checks.whole_number(name, value, 1)
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us={self.max_queue_delay_us} must be >= 0")
        if self.prefix is not None and not _NAME.match(self.prefix):
            raise ValueError(f"prefix={self.prefix!r} may hold only letters, digits, _ . -")


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of a config.pbtxt."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None
    optional: bool = False


@dataclass(frozen=True)
class ModelEntry:
    """One model folder of the repository, before it is written."""

    name: str
    kind: str  # "onnxruntime", "tensorrt" or "python"
    config: str  # config.pbtxt text
    files: tuple[tuple[Path, str], ...]  # (source file, name in the version folder)
    marker: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------
# config.pbtxt
# ---------------------------------------------------------------------------------


def _q(text: str) -> str:
    if not _NAME.match(text):
        raise ValueError(f"{text!r} may hold only letters, digits, _ . - in a Triton config")
    return f'"{text}"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(map(str, dims)) + " ]" if dims else "[ ]"


def tensor_configs(meta: ModelMeta) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The inputs and the output of ``meta``'s graph as Triton sees them (batch left out)."""
    ins, out = meta.io.inputs, meta.io.output

    def one(name: str, dtype: type[np.generic], dims: tuple[int, ...]) -> TensorConfig:
        data_type = TYPES[np.dtype(dtype)]
        if dims:
            return TensorConfig(name, data_type, dims)
        return TensorConfig(name, data_type, (1,), reshape=())  # (B,) in the graph

    return ([one(n, ins[n].dtype, ins[n].dims) for n in meta.graph.inputs],
            [one(out.name, out.dtype, out.dims)])


def python_inputs(meta: ModelMeta) -> list[TensorConfig]:
    """The Python-backend model's request inputs (``triton_model`` documents them): seed,
    the label of a class-conditional model, each conditioning input (required, its own
    dtype and shape; [1] for a scalar), guidance of a guidance graph, steps and eta."""
    clash = triton_model.name_clashes(meta)
    if clash:
        raise ValueError(
            f"the conditioning input {clash[0]!r} has the name of an input of fewstep's Triton "
            f"model ({', '.join(triton_model.INPUTS)}); export the model with another name "
            "for it (Conditioning(name=...), mapped to the module's argument by call=)")
    inputs = [TensorConfig("seed", "TYPE_INT64", (1,))]
    if meta.conditional:
        inputs.append(TensorConfig("label", "TYPE_INT64", (1,), optional=True))
    inputs += [TensorConfig(c.name, TYPES[np.dtype(c.np_dtype)], c.shape or (1,))
               for c in meta.cond]
    if meta.graph.guidance:
        inputs.append(TensorConfig("guidance", "TYPE_FP32", (1,), optional=True))
    return [*inputs, TensorConfig("steps", "TYPE_INT64", (1,), optional=True),
            TensorConfig("eta", "TYPE_FP32", (1,), optional=True)]


def _tensor_block(key: str, tensors: Sequence[TensorConfig]) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        lines += ["  {", f"    name: {_q(t.name)}", f"    data_type: {t.data_type}",
                  f"    dims: {_dims(t.dims)}"]
        if t.reshape is not None:
            lines.append(f"    reshape: {{ shape: {_dims(t.reshape)} }}")
        if t.optional:
            lines.append("    optional: true")
        lines.append("  }," if i < len(tensors) - 1 else "  }")
    return [*lines, "]"]


def preferred_batch_sizes(max_batch: int, opt: int | None = None) -> list[int]:
    """A few batch sizes worth waiting for: the profile's opt and max, or max/4, max/2, max."""
    sizes = {max_batch} | ({opt} if opt else {max_batch // 4, max_batch // 2})
    return sorted(s for s in sizes if 1 <= s <= max_batch)


def config_text(name: str, kind: str, inputs: Sequence[TensorConfig],
                outputs: Sequence[TensorConfig], max_batch: int, preferred: Sequence[int],
                queue_delay_us: int, instance_kind: str, instance_count: int,
                parameters: dict[str, str] | None = None, comment: str = "") -> str:
    """config.pbtxt for one model (protobuf text format of inference.ModelConfig)."""
    head = {
        "onnxruntime": ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"'],
        "tensorrt": ['platform: "tensorrt_plan"', 'backend: "tensorrt"'],
        "python": ['backend: "python"'],
    }[kind]
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"name: {_q(name)}", *head, f"max_batch_size: {max_batch}",
              "version_policy: { latest: { num_versions: 1 } }"]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    lines += ["dynamic_batching {", f"  preferred_batch_size: {_dims(preferred)}",
              f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    kind_name = "KIND_CPU" if instance_kind == "cpu" else "KIND_GPU"
    lines += ["instance_group [", "  {", f"    count: {instance_count}",
              f"    kind: {kind_name}", "  }", "]"]
    for key, value in (parameters or {}).items():
        lines += ["parameters {", f"  key: {_q(key)}", f"  value: {{ string_value: {_q(value)} }}",
                  "}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Which models an artifact becomes
# ---------------------------------------------------------------------------------


def _model_name(prefix: str, meta: ModelMeta) -> str:
    g = meta.graph
    if g.kind != "sampler":
        return f"{prefix}_ddim"
    eta = f"_eta{g.eta:g}".replace(".", "p") if g.eta else ""
    return f"{prefix}_sampler{g.steps}{eta}"


def _weights(onnx_file: Path) -> list[tuple[Path, str]]:
    """(file to copy, name in the version folder) of each weights file of the graph; each
    is inside the artifact's folder (``artifact.external_files``: an ArtifactError
    otherwise, before anything is read or copied) and keeps the name the graph records."""
    header = artifact.read_onnx_header(onnx_file)
    files = artifact.external_files(onnx_file, header)
    for loc in header.external_data:
        if Path(loc).name != loc:
            raise ArtifactError(
                f"{onnx_file.name} keeps its weights in {quote(loc)}, in a sub-folder; a "
                "Triton version folder holds the graph and its weights side by side: "
                "re-export the model with `fewstep export`"
            )
    return list(zip(files, header.external_data, strict=True))


def _marker(meta: ModelMeta, stem: str, source: Path, kind: str) -> dict[str, Any]:
    return {"generated_by": f"fewstep {__version__}", "artifact": stem, "source": source.name,
            "backend": kind, "graph": meta.graph.kind, "source_hash": meta.source_hash}


def _dir(folder: str | os.PathLike[str]) -> str:
    return str(folder).rstrip("/") + "/"


def plans_folder(onnx_path: str | os.PathLike[str],
                 plans: str | os.PathLike[str] | None = None) -> Path:
    """Where the artifact's TensorRT plans are looked up: ``plans``, else beside the ONNX."""
    if plans is None:
        return Path(onnx_path).parent
    folder = Path(plans)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--plans {str(folder)!r} {problem}; pass the folder that "
                         "`fewstep build MODEL.onnx --all --out FOLDER` wrote the plans to")
    return folder


def _find_plans(art: artifact.Artifact, folder: Path,
                log: Callable[[str], None]) -> dict[str, tuple[Path, trt_plan.PlanSidecar]]:
    """The usable plan of each sampler graph (by ONNX file name); the rest is logged."""
    samplers = {g.path.name: g.path for g in art.graphs if g.kind == "sampler"}
    main_path = art.path
    found: dict[str, tuple[Path, trt_plan.PlanSidecar]] = {}
    for plan in art.plans(folder):
        plan_file, sidecar = plan.path, plan.sidecar
        if sidecar is None:
            raise ArtifactError(str(plan.problem))
        source = Path(sidecar.onnx_file).name
        if sidecar.meta.graph.kind != "sampler":
            log(f"{plan_file}: not used (a {sidecar.meta.graph.kind} graph; only fused sampler "
                "graphs become tensorrt_plan models)")
            continue
        if plan.problem is not None:
            log(f"{plan_file}: left out: {plan.problem}")
            continue
        if sidecar.engine != "tensorrt":
            log(f"{plan_file}: left out: a {sidecar.engine_name} plan, which Triton's TensorRT "
                "backend cannot load; build it with --engine tensorrt")
            continue
        onnx_file = samplers.get(source)
        if onnx_file is None:
            log(f"{plan_file}: left out: it was built from {source}, which {main_path.name}'s "
                f"artifact does not have")
            continue
        rebuild = trt_plan.rebuild_command(plan_file, onnx_file, sidecar)
        onnx_sha, external = trt_plan.onnx_hashes(onnx_file)
        changed = [source] if onnx_sha != sidecar.onnx_sha256 else []
        changed += sorted(loc for loc, digest in external.items()
                          if sidecar.external_data_sha256.get(loc, digest) != digest)
        if changed:
            log(f"{plan_file}: left out: stale ({', '.join(changed)} changed since the plan "
                f"was built); rebuild it with `{rebuild}`")
            continue
        if (plan_file.stat().st_size != sidecar.plan_bytes
                or trt_plan.file_sha256(plan_file) != sidecar.plan_sha256):
            log(f"{plan_file}: left out: it is not the plan its sidecar "
                f"{trt_plan.sidecar_path(plan_file).name} describes (sha256 differs); rebuild "
                f"it with `{rebuild}`")
            continue
        found[source] = (plan_file, sidecar)
    return found


def plan_repository(onnx_path: str | os.PathLike[str], options: TritonOptions | None = None,
                    plans: str | os.PathLike[str] | None = None,
                    log: Callable[[str], None] | None = None) -> list[ModelEntry]:
    """The model folders that ``write_repository`` would write for this artifact.

    TensorRT plans are looked up in the folder ``plans`` (default: beside ``onnx_path``);
    ``log`` receives one line per plan taken or left out and per sampler graph without one.
    """
    o = options or TritonOptions()
    say = log or (lambda _msg: None)
    main_path = Path(onnx_path)
    folder = plans_folder(main_path, plans)
    art = artifact.Artifact.open(main_path)
    artifact.require_portable(main_path, art.meta, "a Triton model repository")
    if art.rejected:
        bad = art.rejected[0]
        raise ArtifactError(f"{bad.path.name}: {bad.problem}")
    main = art.meta
    stem = artifact.base_stem(main_path)
    prefix = o.prefix or re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    graphs: dict[str, artifact.GraphFile] = {
        (g.kind if g.kind != "sampler" else g.path.name): g for g in art.graphs}
    found_plans = _find_plans(art, folder, say)
    if not any(g.kind == "sampler" for g in graphs.values()):
        say(f"no tensorrt_plan model: only fused sampler graphs are served from TensorRT "
            f"plans and {main_path.name}'s artifact has none (fewstep export --fused sampler)")

    entries: list[ModelEntry] = []
    for _key, graph in sorted(graphs.items()):
        path, meta = graph.path, graph.meta
        assert meta is not None
        if meta.graph.kind != "sampler":
            continue
        name = _model_name(prefix, meta)
        ins, outs = tensor_configs(meta)
        found = found_plans.get(path.name)
        max_batch = o.max_batch or (found[1].profile.max if found
                                    else trt_plan.default_profile(meta).max)
        g = meta.graph
        about = (f"fewstep {g.steps}-step sampler ({g.spacing} spacing, eta {g.eta:g}, "
                 f"{g.precision}) from {path.name}; inputs: x = initial noise N(0, 1)")
        entries.append(ModelEntry(
            name, "onnxruntime",
            config_text(name, "onnxruntime", ins, outs, max_batch,
                        preferred_batch_sizes(max_batch), o.max_queue_delay_us,
                        o.instance_kind, o.instance_count, comment=about),
            ((path, "model.onnx"), *_weights(path)),
            _marker(meta, stem, path, "onnxruntime"),
        ))
        if found:
            plan_file, sidecar = found
            profile = sidecar.profile
            if profile.min != 1:
                raise ValueError(
                    f"{plan_file.name} has the batch profile {profile}; Triton's dynamic "
                    "batcher sends any batch from 1 up, so rebuild it with a profile from 1: "
                    f"fewstep build {path.name} --batch 1:{profile.opt}:{profile.max}"
                )
            trt_ins, trt_outs = tensor_configs(sidecar.meta)
            trt_name = f"{name}_trt"
            note = (f"TensorRT {sidecar.tensorrt_version} plan for {sidecar.gpu_name} (compute "
                    f"capability {sidecar.compute_capability}) from {plan_file.name}: serve it "
                    f"with a tritonserver image of the same TensorRT version")
            say(f"{plan_file}: included as {trt_name} (TensorRT {sidecar.tensorrt_version} "
                f"plan for {sidecar.gpu_name}, batch {profile})")
            entries.append(ModelEntry(
                trt_name, "tensorrt",
                config_text(trt_name, "tensorrt", trt_ins, trt_outs, profile.max,
                            preferred_batch_sizes(profile.max, profile.opt),
                            o.max_queue_delay_us, "gpu", o.instance_count, comment=note),
                ((plan_file, "model.plan"),),
                _marker(sidecar.meta, stem, plan_file, "tensorrt"),
            ))
        else:
            say(f"no usable TensorRT plan of {path.name} in {_dir(folder)}: {name}_trt "
                "(tensorrt_plan) left out")

    loop = graphs.get("step") or graphs.get("denoiser")
    if loop is not None:
        path, meta = loop.path, loop.meta
        assert meta is not None
        name = _model_name(prefix, meta)
        max_batch = o.max_batch or trt_plan.default_profile(meta).max
        out_name, out_dtype, out_dims = triton_model.output_spec(meta)
        steps = o.default_steps or (main.distilled_steps[-1] if main.distilled_steps else 4)
        params = {"graph": path.name, "default_steps": str(steps),
                  "spacing": default_spacing(main), "backend": "auto"}
        about = (f"fewstep DDIM loop over {path.name} ({meta.graph.kind} graph): one row per "
                 f"{'image' if meta.images else 'sample'}; needs fewstep + onnxruntime in "
                 "Triton's Python environment")
        entries.append(ModelEntry(
            name, "python",
            config_text(name, "python", python_inputs(meta),
                        [TensorConfig(out_name, TYPES[np.dtype(out_dtype)], out_dims)],
                        max_batch, preferred_batch_sizes(max_batch), o.max_queue_delay_us,
                        o.instance_kind, o.instance_count, params, comment=about),
            ((MODEL_PY, "model.py"), (path, path.name), *_weights(path)),
            _marker(meta, stem, path, "python"),
        ))
    return entries


# ---------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------


def check_repository_target(repo: str | os.PathLike[str]) -> Path:
    """The repository folder as a Path, or a ValueError before any export work."""
    target = Path(repo)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--triton {str(target)!r} is a file; pass a folder (it is created)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--triton {str(target)!r}: its parent folder {str(parent)!r} is "
                         "missing or not writable; create it or pass another folder")
    return target


def _ours(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return None


def _write_model(entry: ModelEntry, folder: Path) -> None:
    version = folder / VERSION
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(entry.config, encoding="utf-8")
    (folder / MARKER).write_text(json.dumps(entry.marker, indent=2) + "\n", encoding="utf-8")
    for src, name in entry.files:
        shutil.copyfile(src, version / name)
    for _src, name in entry.files:  # the copy must still find its weights beside it
        if name.endswith(".onnx"):
            artifact.read_onnx_meta(version / name)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def write_repository(onnx_path: str | os.PathLike[str], repo: str | os.PathLike[str],
                     options: TritonOptions | None = None,
                     plans: str | os.PathLike[str] | None = None,
                     log: Callable[[str], None] = _stderr) -> list[Path]:
    """Write the artifact's models into the Triton model repository ``repo``.

    Returns the model folders written. See the module docstring for the layout. TensorRT
    plans are looked up in ``plans`` (default: beside ``onnx_path``); ``log`` (default:
    stderr) says which were included, which were left out and how to include them.
    """
    target = check_repository_target(repo)
    entries = plan_repository(onnx_path, options, plans, log)
    samplers = {e.name for e in entries if e.kind == "onnxruntime"}
    if samplers - {e.name.removesuffix("_trt") for e in entries if e.kind == "tensorrt"}:
        where = "plans/" if plans is None else _dir(plans)
        log(f"to include the tensorrt_plan model, build the plans with the TensorRT version "
            f"of your tritonserver image, on the serving GPU: `fewstep build {onnx_path} --all "
            f"--out {where}`, then `python -m fewstep.export.triton {onnx_path} --out {repo} "
            f"--plans {where}`")
    stem = artifact.base_stem(Path(onnx_path))
    target.mkdir(exist_ok=True)
    for e in entries:
        existing = target / e.name
        if existing.exists() and _ours(existing) is None:
            raise ValueError(f"{str(existing)!r} exists and was not written by fewstep; "
                             "remove it or pass another --triton folder")
    written = []
    # Staged beside the repository, not in it: Triton would take a folder in it for a model.
    with staging_dir(target.parent, f"triton-{stem}") as staging:
        for e in entries:
            _write_model(e, staging / e.name)
        for e in entries:
            final = target / e.name
            if final.exists():
                final.replace(staging / f"{e.name}.old")
            (staging / e.name).replace(final)
            written.append(final)
    names = {e.name for e in entries}
    for folder in sorted(target.iterdir()):
        mark = _ours(folder) if folder.is_dir() else None
        if mark is not None and mark.get("artifact") == stem and folder.name not in names:
            shutil.rmtree(folder)
            print(f"removed {folder}: the artifact no longer has its graph", file=sys.stderr)
    return written


def describe(entries: Iterable[ModelEntry]) -> str:
    return "\n".join(f"  {e.name}: {e.kind}, " + ", ".join(n for _, n in e.files)
                     for e in entries)


# ---------------------------------------------------------------------------------
# python -m fewstep.export.triton MODEL.onnx --out DIR  (an artifact that exists)
# ---------------------------------------------------------------------------------


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = clitools.parser(prog, __doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("model", type=Path, help="model.onnx of an artifact made by fewstep export")
    p.add_argument("--out", type=Path, required=True, help="the Triton model repository folder")
    p.add_argument("--plans", type=Path, default=None, metavar="DIR",
                   help="folder of TensorRT plans + .plan.json sidecars (what `fewstep build "
                        "MODEL.onnx --all --out DIR` wrote); default: beside MODEL.onnx")
    add_options(p, prefix="")
    return p


def add_options(p: argparse.ArgumentParser, prefix: str = "triton-") -> None:
    """The repository options, for this command and (prefixed) for fewstep export."""
    p.add_argument(f"--{prefix}cpu", action="store_true",
                   help="instance_group KIND_CPU for the ONNX Runtime and Python models")
    p.add_argument(f"--{prefix}max-batch", type=clitools.positive_int, default=None,
                   help="max_batch_size (default: the TensorRT profile's max, else 16 at "
                        "<= 128x128 px)")
    p.add_argument(f"--{prefix}queue-delay-us", type=clitools.nonneg_int,
                   default=DEFAULT_QUEUE_DELAY_US,
                   help="dynamic batching: max_queue_delay_microseconds")


def options_from(args: argparse.Namespace, prefix: str = "triton_") -> TritonOptions:
    return TritonOptions(
        instance_kind="cpu" if getattr(args, f"{prefix}cpu") else "gpu",
        max_batch=getattr(args, f"{prefix}max_batch"),
        max_queue_delay_us=getattr(args, f"{prefix}queue_delay_us"),
    )


def body(args: argparse.Namespace) -> int:
    for folder in write_repository(args.model, args.out, options_from(args, prefix=""),
                                   plans=args.plans):
        print(folder)
    return 0


main = clitools.main_of(build_parser, body)

if __name__ == "__main__":
    sys.exit(main(prog="python -m fewstep.export.triton"))
