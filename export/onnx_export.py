"""Checkpoint → ONNX: the denoiser, the fused step graph and fused sampler graphs.

``export_artifact`` traces the torch modules of ``export.graphs`` with the
torch.export-based exporter (opset ≥ 17, dynamic batch only), stores the ModelMeta of
each graph in ``metadata_props``, lets the graphs share one external weights file,
validates every file with ``onnx.checker`` (full check) and writes atomically.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import io
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fewstep.runtime import artifact, checks
from fewstep.runtime.clitools import Progress
from fewstep.runtime.fileio import file_lock, fsync_file
from fewstep.runtime.meta import META_KEY, ModelMeta
from fewstep.runtime.sampling import SamplingPlan, default_spacing

from .graphs import DenoiserGraph, SamplerGraph, StepGraph

DEFAULT_OPSET = 18
# ONNX accepts bfloat16 in Conv (and Round) only from opset 22: a bf16 export needs it.
BF16_MIN_OPSET = 22
PRECISIONS = ("fp32", "fp16", "bf16")
# Initializers at least this large go to the shared weights file; smaller stay inline.
EXTERNAL_MIN_BYTES = 1024
# Graph variants beside the portable graphs (``--target``), each an artifact of its own.
VARIANTS = ("ort-cuda",)


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    guidance: bool = False
    fused: tuple[str, ...] = ()
    sampler_steps: tuple[int, ...] = (4,)
    spacing: str | None = None
    eta: float = 0.0
    sampler_output: str = "uint8"
    opset: int | None = None  # None: DEFAULT_OPSET, or BF16_MIN_OPSET for bf16
    shared_weights: bool = True
    # Graph variants written beside the portable graphs: "ort-cuda" (export/ort_cuda.py).
    variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be fp32, fp16 or bf16")
        for f in self.fused:
            if f not in ("step", "sampler"):
                raise ValueError(f"fused={f!r} must be step or sampler")
        if self.sampler_output not in ("uint8", "float"):
            raise ValueError(f"sampler_output={self.sampler_output!r} must be uint8 or float")
        if self.opset is not None and not 17 <= self.opset <= 23:
            raise ValueError(f"opset={self.opset} must be in 17..23")
        if self.precision == "bf16" and self.opset is not None and self.opset < BF16_MIN_OPSET:
            raise ValueError(
                f"--precision bf16 needs --opset >= {BF16_MIN_OPSET} (ONNX Conv accepts "
                f"bfloat16 from opset {BF16_MIN_OPSET}); pass --opset {BF16_MIN_OPSET} or "
                "leave --opset out"
            )
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"target={v!r} must be one of {', '.join(VARIANTS)} (the "
                                 "portable graphs are always written)")
        if "ort-cuda" in self.variants and self.precision == "bf16":
            raise ValueError(
                "--target ort-cuda needs --precision fp32 or fp16: ONNX Runtime's fused "
                "GroupNorm and NhwcConv kernels have no bfloat16 version"
            )
        checks.eta(self.eta)

    @property
    def target_opset(self) -> int:
        """The opset the graphs are exported with."""
        if self.opset is not None:
            return self.opset
        return BF16_MIN_OPSET if self.precision == "bf16" else DEFAULT_OPSET


@dataclass
class GraphReport:
    path: Path
    meta: ModelMeta
    nodes: int
    fp32_islands: dict[str, int] = field(default_factory=dict)  # op type -> node count
    seconds: float = 0.0
    # op type -> "node_name (torch module)" of every node computing in float32 (fp16/bf16)
    fp32_nodes: dict[str, list[str]] = field(default_factory=dict)
    fused: str = ""  # a variant graph: the fused kernels it uses (ort_cuda.Rewrite.summary)


def check_options_against(meta: ModelMeta, options: ExportOptions) -> None:
    """Refuse options the model cannot honour, before any work."""
    if options.guidance and not meta.guidable:
        raise ValueError(
            "--guidance needs a conditional model with null conditioning (a null label, a "
            "null value for every conditioning input); this one has none (train without "
            "--unconditional, or give each Conditioning a null)"
        )
    if "sampler" in options.fused:
        for s in options.sampler_steps:
            SamplingPlan.create(meta, s, options.spacing or _spacing(meta), options.eta)


def _spacing(meta: ModelMeta) -> str:
    return default_spacing(meta)


# ---------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------


def example_inputs(meta: ModelMeta, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs in graph order, shaped and typed as ``meta.io`` says, of a batch that avoids
    0/1 specialisation."""
    g = torch.Generator().manual_seed(0)
    special: dict[str, Callable[[], torch.Tensor]] = {
        "t": lambda: torch.rand(batch, generator=g) * (meta.schedule.num_train_timesteps - 1),
        "label": lambda: torch.arange(batch) % max(1, meta.num_classes),
        "guidance": lambda: torch.full((batch,), 2.0),
        "a_t": lambda: torch.full((batch,), 0.3),
        "a_prev": lambda: torch.full((batch,), 0.6),
        "eta": lambda: torch.zeros(batch),
    }
    out: dict[str, torch.Tensor] = {}
    for name, spec in meta.io.inputs.items():
        if name in special:
            out[name] = special[name]()
        elif spec.dtype == np.int64:
            out[name] = torch.zeros(spec.shape(batch), dtype=torch.int64)
        else:
            out[name] = torch.randn(spec.shape(batch), generator=g)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's chatter (it prints progress and warnings we don't need)."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        import logging

        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def trace(module: torch.nn.Module, meta: ModelMeta, opset: int,
          scopes: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export ``module`` to an in-memory ModelProto with the batch as the only free dim.

    ``scopes``, when given, receives node name → the torch module it came from (the
    exporter's annotation, which is then stripped from the file).
    """
    inputs = example_inputs(meta)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # One spec per positional parameter of forward; a *args parameter takes a tuple of
    # the remaining inputs' specs (torch.export matches the signature's structure; it
    # leaves out an empty *args).
    fixed = [p for p in inspect.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    specs = [{0: batch} for _ in inputs]
    dynamic: tuple[Any, ...] = tuple(specs[:len(fixed)])
    if len(specs) > len(fixed):
        dynamic += (tuple(specs[len(fixed):]),)
    module.eval()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            module, tuple(inputs.values()), None, input_names=list(inputs),
            output_names=list(meta.graph.outputs), dynamic_shapes=dynamic,
            opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )
    assert program is not None
    model: onnx.ModelProto = program.model_proto
    actual = [i.name for i in model.graph.input]
    if actual != list(meta.graph.inputs):
        raise RuntimeError(f"exported inputs {actual} differ from {list(meta.graph.inputs)}")
    model.producer_name = "fewstep"
    # The exporter annotates every node with its torch stack and module path: useful for
    # debugging the exporter, 85 % of the file size for us.
    for node in model.graph.node:
        if scopes is not None:
            scopes[node.name] = _module_path(node)
        del node.metadata_props[:]
        node.doc_string = ""
    for value in model.graph.value_info:
        del value.metadata_props[:]
    onnx.helper.set_model_props(model, {META_KEY: meta.to_json()})
    return model


def _module_path(node: onnx.NodeProto) -> str:
    """The torch module a node was traced from ("unet.down.0.0.norm1"), or ""."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            # [..., "unet.down.0.0", "unet.down.0.0.norm1", "layer_norm"]: the last entry
            # names the op, the one before it the innermost module.
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
    return ""


_NOT_COMPUTE = {"Cast", "Shape", "Constant", "Reshape", "Unsqueeze", "Squeeze", "Concat",
                "Gather", "Slice", "Expand", "Identity", "Transpose", "Split"}


def fp32_island_nodes(model: onnx.ModelProto,
                      scopes: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Op type → names of the nodes that compute in float32 inside an fp16/bf16 graph.

    A name is followed by its torch module in parentheses when ``scopes`` (from
    ``trace``) knows it: ``node_layer_norm_3 (unet.down.2.0.norm1)``. Data movement
    (Cast, Reshape, Gather, ...) is not computation and is left out.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    nodes: dict[str, list[str]] = {}
    for node in inferred.graph.node:
        if node.op_type in _NOT_COMPUTE:
            continue
        if any(types.get(o) == onnx.TensorProto.FLOAT for o in node.output):
            where = (scopes or {}).get(node.name, "")
            nodes.setdefault(node.op_type, []).append(
                f"{node.name} ({where})" if where else node.name)
    return dict(sorted(nodes.items()))


def fp32_islands(model: onnx.ModelProto) -> dict[str, int]:
    """Op types (and counts) of nodes that compute in float32 inside an fp16/bf16 graph."""
    return {op: len(names) for op, names in fp32_island_nodes(model).items()}


def describe_islands(nodes: dict[str, list[str]], first: int | None = 3) -> list[str]:
    """One line per op type: the count and the first ``first`` node names (None: all)."""
    lines = []
    for op, names in nodes.items():
        n = len(names) if first is None else first
        shown = ", ".join(names[:n])
        more = f", ... (+{len(names) - n} more; --verbose lists all)" if len(names) > n else ""
        lines.append(f"{op} x{len(names)}: {shown}{more}")
    return lines


# ---------------------------------------------------------------------------------
# Writing: shared external weights, full check, atomic placement
# ---------------------------------------------------------------------------------


def _externalise(models: list[onnx.ModelProto], location: str) -> bytes:
    """Move large initializers of all models into one deduplicated blob; returns it."""
    blob = bytearray()
    offsets: dict[str, tuple[int, int]] = {}
    for model in models:
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = hashlib.sha256(
                f"{init.data_type}:{tuple(init.dims)}:".encode() + raw
            ).hexdigest()
            if key not in offsets:
                align = 4096 if len(raw) >= 1 << 20 else 64
                blob.extend(b"\0" * (-len(blob) % align))
                offsets[key] = (len(blob), len(raw))
                blob.extend(raw)
            offset, length = offsets[key]
            dims, name, dtype = list(init.dims), init.name, init.data_type
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)),
                         ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v
    return bytes(blob)


def write_graphs(graphs: dict[str, onnx.ModelProto], folder: Path, stem: str,
                 shared: bool, progress: Progress | None = None) -> list[Path]:
    """Write ``graphs`` (file name → model) into ``folder``; check each file fully
    (``progress``: one stage per graph)."""
    written = []
    models = list(graphs.values())
    if shared:
        blob = _externalise(models, "")
        if blob:
            location = f"{stem}.weights.{hashlib.sha256(blob).hexdigest()[:12]}.bin"
            for m in models:
                for init in m.graph.initializer:
                    for entry in init.external_data:
                        if entry.key == "location":
                            entry.value = location
            (folder / location).write_bytes(blob)
            fsync_file(folder / location)
            written.append(folder / location)
    for name, model in graphs.items():
        path = folder / name
        if progress is not None:
            progress.stage(f"check {name}")
        onnx.save_model(model, path)
        fsync_file(path)  # on the disk before it is renamed into place (a full disk: here)
        onnx.checker.check_model(str(path), full_check=True)
        written.append(path)
        if progress is not None:
            progress.advance()
    return written


def place(staged: list[Path], out_folder: Path, stem: str, source_hash: str) -> list[Path]:
    """Move staged files into ``out_folder`` (weights first), then remove what they replace.

    The variants of ``stem`` (``stem.ort-cuda.onnx`` and its graphs and weights) are part
    of the export: staged ones are placed, and any this export did not write are removed
    with the rest (an older variant beside new portable graphs would be another model's).

    Only after every new file is in place, every other graph of the artifact ``stem``
    (a step or sampler graph this export did not write, whichever checkpoint it came
    from) and every ``stem.weights.*.bin`` this export did not write is removed: the
    folder then holds exactly this export. Until then the old graphs keep their weights,
    so an interrupted export leaves old files beside new ones, never a graph without its
    weights. Concurrent placements of ``stem`` into one folder are serialised by a file
    lock (``.stem.onnx.lock`` in the folder): whichever comes last leaves its complete
    artifact.
    """
    # Two exports into one folder take turns for the whole placement: otherwise one could
    # remove the weights the other's just-placed graphs reference.
    with file_lock(out_folder / f"{stem}.onnx"):
        return _place(staged, out_folder, stem, source_hash)


def _place(staged: list[Path], out_folder: Path, stem: str, source_hash: str) -> list[Path]:
    artifact.siblings(out_folder / f"{stem}.onnx")  # a link out of the folder: refused now,
    for v in VARIANTS:  # before anything moves
        artifact.find_variant(out_folder / f"{stem}.onnx", v)
    final = []
    for src in sorted(staged, key=lambda p: not p.name.endswith(".bin")):
        dst = out_folder / src.name
        src.replace(dst)
        final.append(dst)
    names = {p.name for p in final}
    main = out_folder / f"{stem}.onnx"
    for base in (main, *(artifact.variant_path(main, v) for v in VARIANTS)):
        _remove_unwritten(base, names, source_hash)
    return final


def _remove_unwritten(main: Path, names: set[str], source_hash: str) -> None:
    """Remove every graph and weights file of the artifact ``main`` not in ``names``."""
    folder, stem = main.parent, main.name[: -len(".onnx")]
    graphs: list[tuple[Path, str]] = []
    if main.is_file() or main.name in names:
        for f in artifact.Artifact.open(main).files:
            if f.meta is None:
                why = "it is not a readable fewstep graph"
            elif f.meta.source_hash != source_hash:
                why = "it came from another checkpoint"
            else:
                why = "this export did not write it"
            graphs.append((f.path, why))
    else:  # no main file: its orphaned siblings still go
        graphs = [(f, "this export did not write it")
                  for f in artifact.siblings(main) if f != main]
    for path, why in graphs:
        if path.name in names or not path.is_file():
            continue
        path.unlink()
        _log(f"removed {path.name}: {why}")
    for w in folder.glob(f"{artifact.glob_escape(stem)}.weights.*.bin"):
        if w.name not in names and w.is_file():
            w.unlink()
            _log(f"removed {w.name}: weights of an earlier export")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# The whole export
# ---------------------------------------------------------------------------------


def graph_modules(
    unet: torch.nn.Module, meta: ModelMeta, options: ExportOptions
) -> Iterator[tuple[str, torch.nn.Module, ModelMeta]]:
    """(file suffix kind, module, its meta) for every graph the options ask for."""
    base = meta.for_graph(kind="denoiser", precision=options.precision,
                          guidance=options.guidance)
    denoiser = DenoiserGraph(unet, base, options.guidance, precision=options.precision)
    yield "denoiser", denoiser, base
    if "step" in options.fused:
        yield "step", StepGraph(denoiser, base), base.for_graph(kind="step")
    if "sampler" in options.fused:
        spacing = options.spacing or _spacing(meta)
        uint8 = options.sampler_output == "uint8"
        for steps in options.sampler_steps:
            plan = SamplingPlan.create(base, steps, spacing, options.eta)
            smeta = base.for_graph(kind="sampler", steps=steps, spacing=spacing,
                                   eta=options.eta,
                                   output_format="uint8" if uint8 else "float")
            yield "sampler", SamplerGraph(denoiser, plan, uint8), smeta


def graph_count(options: ExportOptions) -> int:
    """How many graph files an export with ``options`` writes (variants included)."""
    per_target = (1 + ("step" in options.fused)
                  + (len(options.sampler_steps) if "sampler" in options.fused else 0))
    return per_target * (1 + len(options.variants))


def export_to_folder(unet: torch.nn.Module, meta: ModelMeta, folder: Path, stem: str,
                     options: ExportOptions, progress: Progress | None = None
                     ) -> tuple[list[Path], list[GraphReport]]:
    """Trace every asked-for graph and write them (checked) into ``folder``.

    ``progress``: two stages per graph (traced, checked) and the log lines."""
    check_options_against(meta, options)
    graphs: dict[str, onnx.ModelProto] = {}
    variants: dict[str, dict[str, onnx.ModelProto]] = {v: {} for v in options.variants}
    reports = []
    for kind, module, gmeta in graph_modules(unet, meta, options):
        name = artifact.graph_path(folder / f"{stem}.onnx", kind, gmeta.graph.steps,
                                   gmeta.graph.eta).name
        t0 = time.perf_counter()
        (progress.line if progress is not None else _log)(
            f"exporting {name} ({kind}, {options.precision})")
        if progress is not None:
            progress.stage(f"trace {name}")
        scopes: dict[str, str] = {}
        model = trace(module, gmeta, options.target_opset, scopes)
        nodes = fp32_island_nodes(model, scopes) if options.precision != "fp32" else {}
        islands = {op: len(names) for op, names in nodes.items()}
        reports.append(GraphReport(folder / name, gmeta, len(model.graph.node), islands,
                                   time.perf_counter() - t0, nodes))
        graphs[name] = model
        if progress is not None:
            progress.advance()
        for target in options.variants:
            vname = artifact.graph_path(artifact.variant_path(folder / f"{stem}.onnx", target),
                                        kind, gmeta.graph.steps, gmeta.graph.eta).name
            if progress is not None:
                progress.stage(f"rewrite {vname}")
            t0 = time.perf_counter()
            vmeta = gmeta.for_graph(target=target)
            rewritten = _variant(model, vmeta, target)
            reports.append(GraphReport(folder / vname, vmeta, len(rewritten.model.graph.node),
                                       seconds=time.perf_counter() - t0,
                                       fused=rewritten.summary()))
            variants[target][vname] = rewritten.model
            if progress is not None:
                progress.advance()
    files = []
    for target, vgraphs in variants.items():  # before the portable graphs lose their weights
        vstem = artifact.variant_path(folder / f"{stem}.onnx", target).name[: -len(".onnx")]
        files += write_graphs(vgraphs, folder, vstem, options.shared_weights, progress)
    files = write_graphs(graphs, folder, stem, options.shared_weights, progress) + files
    return files, reports


def _variant(model: onnx.ModelProto, meta: ModelMeta, target: str) -> Any:
    """The ``target`` variant of a traced portable graph (``model`` is left as it is)."""
    assert target == "ort-cuda"
    from . import ort_cuda

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        rewritten = ort_cuda.rewrite(copy)
    except ValueError as e:
        raise ValueError(f"--target ort-cuda: {e}") from None
    onnx.helper.set_model_props(rewritten.model, {META_KEY: meta.to_json()})
    return rewritten
