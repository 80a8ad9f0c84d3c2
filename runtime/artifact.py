"""The files of one model: ``Artifact.open(path)`` reads them once.

An exported model is a set of graph files that share one base name::

    model.onnx                 the denoiser (any step count, host-side DDIM update)
    model.step.onnx            denoiser + DDIM update (state stays on the device)
    model.sampler-4.onnx       the whole 4-step loop in one graph (eta 0)
    model.sampler-8-eta1.onnx  an 8-step loop with eta 1 (noise as an input)
    model.weights.<hash>.bin   the weights they share (ONNX external data)

TensorRT plans follow the same pattern with ``.plan`` and a ``.plan.json`` sidecar each.
The ModelMeta of every ONNX file sits in its ``metadata_props`` under ``META_KEY``.
``mismatch`` is the one answer to "are these graphs of the same model?".
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .errors import ArtifactError
from .meta import META_KEY, ModelMeta

if TYPE_CHECKING:
    from .plan import PlanSidecar

ORACLE_EXT: Final = ".oracle.json"
EXTENSIONS: Final = (ORACLE_EXT, ".onnx", ".plan")

_SUFFIX = re.compile(
    r"^(?P<base>.+?)(?:\.(?P<kind>step|sampler-(?P<steps>\d+)(?:-eta(?P<eta>[0-9.]+))?))?$"
)


def _fmt_eta(eta: float) -> str:
    return f"{eta:g}"


def graph_path(base: str | Path, kind: str, steps: int = 0, eta: float = 0.0,
               ext: str = ".onnx") -> Path:
    """The file name of a graph of the artifact whose denoiser is ``base`` + ``ext``."""
    b = Path(base)
    stem = b.name[: -len(ext)] if b.name.endswith(ext) else b.name
    if kind == "denoiser":
        name = stem
    elif kind == "step":
        name = f"{stem}.step"
    elif kind == "sampler":
        name = f"{stem}.sampler-{steps}" + (f"-eta{_fmt_eta(eta)}" if eta else "")
    else:
        raise ValueError(f"kind={kind!r} is not denoiser, step or sampler")
    return b.with_name(name + ext)


def base_stem(path: str | Path, ext: str = ".onnx") -> str:
    """``model`` for model.onnx, model.step.onnx and model.sampler-4.onnx alike."""
    name = Path(path).name
    stem = name[: -len(ext)] if name.endswith(ext) else name
    m = _SUFFIX.match(stem)
    return m.group("base") if m else stem


def siblings(path: str | Path, ext: str | None = None) -> list[Path]:
    """Every graph file of the artifact ``path`` belongs to (``path`` included), sorted."""
    p = Path(path)
    ext = ext or (".plan" if p.name.endswith(".plan") else ".onnx")
    base = base_stem(p, ext)
    found = []
    for cand in sorted(p.parent.glob(f"{glob_escape(base)}*{ext}")):
        if cand.is_file() and base_stem(cand, ext) == base:
            found.append(cand)
    if p.is_file() and p not in found:
        found.append(p)
    return sorted(found)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# ---------------------------------------------------------------------------------
# Reading onnx.ModelProto far enough for metadata_props and external-data locations.
#
# Written by hand on purpose (measured on the shipped landscapes graphs, 2-core CPU):
# 10-21 ms per graph here; onnx.load(load_external_data=False) takes 0.6-4 ms, but onnx
# is not a runtime dependency (numpy, pillow, onnxruntime only) and importing it alone
# costs 0.2-0.8 s, more than reading every graph of an artifact here. An onnxruntime
# session gives the metadata too, but costs 250-540 ms per graph and reads the weights
# first, so the external-data locations could no longer be checked before any weight
# byte is read.
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxHeader:
    ir_version: int
    producer: str
    metadata: dict[str, str]
    external_data: tuple[str, ...]  # locations referenced by the graph's initializers


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, keep: frozenset[int]) -> list[tuple[int, int, int | memoryview]]:
    """Top-level (field number, wire type, value) of one protobuf message, for the field
    numbers in ``keep`` (the others are skipped without being copied)."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            if field in keep:
                out.append((field, wire, value))
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated length-delimited field")
            if field in keep:
                out.append((field, wire, buf[pos : pos + n]))
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("truncated field")
    return out


_KEY_VALUE: Final = frozenset({1, 2})  # StringStringEntryProto: key, value


def _strings(entry: memoryview) -> dict[int, str]:
    return {f: bytes(v).decode("utf-8") for f, w, v in _fields(entry, _KEY_VALUE)
            if w == 2 and isinstance(v, memoryview)}


def _external_locations(graph: memoryview) -> set[str]:
    """Locations of external data of the graph's initializers (GraphProto field 5)."""
    locations = set()
    for _f, w, v in _fields(graph, frozenset({5})):
        if w == 2 and isinstance(v, memoryview):  # TensorProto
            for _tf, tw, tv in _fields(v, frozenset({13})):
                if tw == 2 and isinstance(tv, memoryview):  # external_data entry
                    kv = _strings(tv)
                    if kv.get(1) == "location" and 2 in kv:
                        locations.add(kv[2])
    return locations


def _main_files(folder: Path) -> list[Path]:
    """The model files a folder holds: model.onnx, model.plan, *.oracle.json (no
    .step/.sampler-N siblings)."""
    found = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for f in entries:
        name = f.name
        ext = next((e for e in EXTENSIONS if name.endswith(e)), None)
        if ext and f.is_file() and base_stem(name, ext) + ext == name:
            found.append(f)
    return found


def check_model_path(path: Path | None, flag: str = "") -> None:
    """An ArtifactError when ``path`` is a folder (naming the model file to pass instead)
    or lies under a file; a path that simply does not exist is left to the loader.
    ``flag``: how the message asks for the path (``"--model "`` in the CLI, else "")."""
    if path is None:
        return
    if path.is_dir():
        files = _main_files(path)
        if len(files) == 1:
            fix = f"pass the model file inside it: {flag}{str(files[0])!r}"
        elif files:
            shown = ", ".join(repr(f.name) for f in files[:4]) + (", ..." if len(files) > 4
                                                                  else "")
            fix = f"pass one of the model files inside it ({shown}): {flag}{path!s}/NAME"
        else:
            fix = (f"it holds no .onnx, .plan or .oracle.json; pass {flag}a model.onnx made "
                   "by `fewstep export`")
        raise ArtifactError(f"model {str(path)!r} is a folder, not a model file; {fix}")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ArtifactError(f"model {str(path)!r} cannot exist: {str(parent)!r} is a file, "
                                f"not a folder; pass {flag}the path of a model.onnx")


def read_onnx_header(path: str | Path) -> OnnxHeader:
    p = Path(path)
    check_model_path(p)
    if not p.is_file():
        raise ArtifactError(f"model file {str(p)!r} does not exist")
    data = memoryview(p.read_bytes())
    try:
        fields = _fields(data, frozenset({1, 2, 7, 14}))
        ir = next((v for f, w, v in fields if f == 1 and w == 0), None)
        graph = next((v for f, w, v in fields if f == 7 and w == 2), None)
        if not isinstance(ir, int) or not isinstance(graph, memoryview):
            raise ValueError("no ir_version or graph")
        producer = next((v for f, w, v in fields if f == 2 and w == 2), None)
        meta = {}
        for f, w, v in fields:
            if f == 14 and w == 2 and isinstance(v, memoryview):
                kv = _strings(v)
                meta[kv.get(1, "")] = kv.get(2, "")
        locations = _external_locations(graph)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{str(p)!r} is not an ONNX model ({e}); the file is truncated or of another kind"
        ) from None
    return OnnxHeader(
        ir_version=ir,
        producer=bytes(producer).decode("utf-8", "replace")
        if isinstance(producer, memoryview) else "",
        metadata=meta,
        external_data=tuple(sorted(locations)),
    )


def _meta_of_header(path: Path, header: OnnxHeader) -> ModelMeta:
    if META_KEY not in header.metadata:
        raise ArtifactError(
            f"{str(path)!r} has no fewstep metadata (metadata_props[{META_KEY!r}]); "
            f"it was not exported by fewstep: export it with `fewstep export CHECKPOINT`"
        )
    for loc in header.external_data:
        if not (path.parent / loc).is_file():
            raise ArtifactError(
                f"{str(path)!r} keeps its weights in {loc!r}, which is missing beside it; "
                "copy the whole exported folder"
            )
    return ModelMeta.from_json(header.metadata[META_KEY], source=str(path))


def read_onnx_meta(path: str | Path) -> ModelMeta:
    """The ModelMeta stored in an ONNX file, or an ArtifactError saying why not."""
    return _meta_of_header(Path(path), read_onnx_header(path))


# ---------------------------------------------------------------------------------
# The artifact: every graph file of one model, read once
# ---------------------------------------------------------------------------------


def extension(path: str | Path) -> str:
    """``.oracle.json``, ``.plan`` or ``.onnx`` (any other name is read as ONNX)."""
    name = Path(path).name
    return next((e for e in EXTENSIONS if name.endswith(e)), ".onnx")


def mismatch(main: ModelMeta, other: ModelMeta, *, precision: bool = True) -> str | None:
    """What makes ``other`` another model than ``main`` ("source_hash ('b' vs 'a')"), or
    None for the same model. Graphs of one artifact also share their precision; pass
    ``precision=False`` to compare artifacts of one model exported at other precisions."""
    checks: list[tuple[str, object, object]] = [
        ("source_hash", main.source_hash, other.source_hash),
        ("schedule", main.schedule, other.schedule),
        ("prediction type", main.prediction_type, other.prediction_type),
        ("image shape", main.image_shape, other.image_shape),
    ]
    if precision:
        checks.append(("precision", main.graph.precision, other.graph.precision))
    checks.append(("classes", main.class_names or main.num_classes,
                   other.class_names or other.num_classes))
    for what, a, b in checks:
        if a != b:
            return f"{what} ({b!r} vs {a!r})"
    return None


@dataclass(frozen=True)
class GraphFile:
    """One file named like a graph of the artifact, and what it says about itself.

    ``problem`` is None for a graph of the artifact; else why it is not one (unreadable,
    or a graph of another model), and ``meta`` is None when it could not be read.
    """

    path: Path
    meta: ModelMeta | None
    problem: str | None = None
    external_data: tuple[str, ...] = ()  # weight files an ONNX graph references
    sidecar: PlanSidecar | None = None  # a plan's sidecar

    @property
    def kind(self) -> str:
        return self.meta.graph.kind if self.meta is not None else "?"


def locate(path: str | os.PathLike[str]) -> Path:
    """``path`` as a model file, or the ArtifactError that says what to pass instead."""
    p = Path(path)
    check_model_path(p)  # a folder: names the model file inside it
    if not p.is_file():
        raise ArtifactError(
            f"model file {str(p)!r} does not exist; pass --model PATH to a model.onnx "
            "made by `fewstep export`"
        )
    return p


def _read(path: Path, ext: str) -> GraphFile:
    """The GraphFile of ``path``; an ArtifactError when its metadata cannot be read."""
    if ext == ORACLE_EXT:
        from .backends.oracle import read_oracle_file

        return GraphFile(path, read_oracle_file(path)[0])
    if ext == ".plan":
        from .plan import load_sidecar  # reads the .plan.json, not the plan

        sidecar = load_sidecar(path)
        return GraphFile(path, sidecar.meta, sidecar=sidecar)
    header = read_onnx_header(path)
    return GraphFile(path, _meta_of_header(path, header), external_data=header.external_data)


def _read_sibling(path: Path, ext: str, main: GraphFile) -> GraphFile:
    """Like ``_read``, but a problem is recorded instead of raised."""
    try:
        found = _read(path, ext)
    except (ArtifactError, OSError) as e:
        external: tuple[str, ...] = ()
        if ext == ".onnx":
            with contextlib.suppress(ArtifactError, OSError):
                external = read_onnx_header(path).external_data
        return GraphFile(path, None, str(e), external)
    assert found.meta is not None and main.meta is not None
    different = mismatch(main.meta, found.meta)
    if different:
        why = (f"its {different} differs from {main.path.name}; re-export the whole artifact "
               "together")
        return GraphFile(path, found.meta, why, found.external_data, found.sidecar)
    return found


@dataclass(frozen=True)
class Artifact:
    """A model file and every file named like one of its graphs, each read once.

    ``files`` holds them all, sorted, the main file included; ``graphs`` those that are
    graphs of this model (same source, schedule, shape, classes and precision);
    ``rejected`` the others, each with the reason.
    """

    path: Path
    ext: str
    files: tuple[GraphFile, ...]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Artifact:
        """Read the main file (an ArtifactError when it is unreadable) and its siblings
        (never raises for them: see ``rejected``). No weights and no sessions."""
        p = locate(path)
        ext = extension(p)
        main = _read(p, ext)
        files = [main if f == p else _read_sibling(f, ext, main) for f in siblings(p, ext)]
        return cls(p, ext, tuple(files))

    @property
    def main(self) -> GraphFile:
        return next(f for f in self.files if f.path == self.path)

    @property
    def meta(self) -> ModelMeta:
        """The main file's ModelMeta."""
        meta = self.main.meta
        assert meta is not None
        return meta

    @property
    def graphs(self) -> tuple[GraphFile, ...]:
        """The graphs of this model, the main file first."""
        return (self.main, *(f for f in self.files if f.problem is None and f.path != self.path))

    @property
    def rejected(self) -> tuple[GraphFile, ...]:
        return tuple(f for f in self.files if f.problem is not None)

    def same_model(self, other: Artifact | ModelMeta) -> str | None:
        """What makes ``other`` another model than this one (precision may differ), or None."""
        meta = other.meta if isinstance(other, Artifact) else other
        return mismatch(self.meta, meta, precision=False)

    def weights(self) -> dict[str, int]:
        """Every external-data file the ONNX graphs reference: its size, or -1 if missing."""
        locations = sorted({loc for f in self.files for loc in f.external_data})
        out = {}
        for loc in locations:
            data = self.path.parent / loc
            out[loc] = data.stat().st_size if data.is_file() else -1
        return out

    def plans(self, folder: str | Path | None = None) -> tuple[GraphFile, ...]:
        """The TensorRT plans of this artifact's graphs in ``folder`` (default: beside the
        main file), each with its sidecar; a plan whose sidecar is unreadable or describes
        another model comes with its ``problem``."""
        where = Path(folder) if folder is not None else self.path.parent
        base = base_stem(self.path, self.ext)
        return tuple(_read_sibling(f, ".plan", self.main)
                     for f in siblings(where / f"{base}.plan", ".plan") if f.is_file())
