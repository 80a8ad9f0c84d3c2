"""Artifact files: naming, reading the metadata of an ONNX file, finding siblings.

An exported model is a set of graph files that share one base name::

    model.onnx                 the denoiser (any step count, host-side DDIM update)
    model.step.onnx            denoiser + DDIM update (state stays on the device)
    model.sampler-4.onnx       the whole 4-step loop in one graph (eta 0)
    model.sampler-8-eta1.onnx  an 8-step loop with eta 1 (noise as an input)
    model.weights.<hash>.bin   the weights they share (ONNX external data)

TensorRT plans follow the same pattern with ``.plan`` and a ``.plan.json`` sidecar each.
The ModelMeta of every ONNX file sits in its ``metadata_props`` under ``META_KEY``;
``read_onnx_meta`` reads it with a few lines of protobuf decoding, without onnx or
onnxruntime and without touching the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .meta import META_KEY, ModelMeta

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
# Minimal protobuf reading of onnx.ModelProto: just enough for metadata_props.
# ---------------------------------------------------------------------------------

_MODEL_FIELDS = {1: "ir_version", 2: "producer_name", 7: "graph", 8: "opset_import",
                 14: "metadata_props"}


@dataclass(frozen=True)
class OnnxHeader:
    ir_version: int
    producer: str
    metadata: dict[str, str]
    external_data: tuple[str, ...]  # locations referenced by the graph's initializers


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
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


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Top-level (field number, wire type, value) of one protobuf message."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((field, wire, value))
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated length-delimited field")
            out.append((field, wire, buf[pos : pos + n]))
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
    return out


def _strings(entry: bytes) -> dict[int, str]:
    return {f: v.decode("utf-8") for f, w, v in _fields(entry) if w == 2 and isinstance(v, bytes)}


def _external_locations(graph: bytes) -> set[str]:
    """Locations of external data of the graph's initializers (GraphProto field 5)."""
    locations = set()
    for f, w, v in _fields(graph):
        if f == 5 and w == 2 and isinstance(v, bytes):  # TensorProto
            for tf, tw, tv in _fields(v):
                if tf == 13 and tw == 2 and isinstance(tv, bytes):  # external_data entry
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
        ext = next((e for e in (".oracle.json", ".onnx", ".plan") if name.endswith(e)), None)
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
    data = p.read_bytes()
    try:
        fields = _fields(data)
        ir = next((v for f, w, v in fields if f == 1 and w == 0), None)
        graph = next((v for f, w, v in fields if f == 7 and w == 2), None)
        if not isinstance(ir, int) or not isinstance(graph, bytes):
            raise ValueError("no ir_version or graph")
        producer = next((v for f, w, v in fields if f == 2 and w == 2), b"")
        meta = {}
        for f, w, v in fields:
            if f == 14 and w == 2 and isinstance(v, bytes):
                kv = _strings(v)
                meta[kv.get(1, "")] = kv.get(2, "")
        locations = _external_locations(graph)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{str(p)!r} is not an ONNX model ({e}); the file is truncated or of another kind"
        ) from None
    return OnnxHeader(
        ir_version=ir,
        producer=producer.decode("utf-8", "replace") if isinstance(producer, bytes) else "",
        metadata=meta,
        external_data=tuple(sorted(locations)),
    )


def read_onnx_meta(path: str | Path) -> ModelMeta:
    """The ModelMeta stored in an ONNX file, or an ArtifactError saying why not."""
    header = read_onnx_header(path)
    if META_KEY not in header.metadata:
        raise ArtifactError(
            f"{str(path)!r} has no fewstep metadata (metadata_props[{META_KEY!r}]); "
            f"it was not exported by fewstep: export it with `fewstep export CHECKPOINT`"
        )
    for loc in header.external_data:
        if not (Path(path).parent / loc).is_file():
            raise ArtifactError(
                f"{str(path)!r} keeps its weights in {loc!r}, which is missing beside it; "
                "copy the whole exported folder"
            )
    return ModelMeta.from_json(header.metadata[META_KEY], source=str(path))
