"""An ONNX file's header: ir_version, producer, metadata_props and the external-data
location of every tensor, read from the protobuf wire format without onnx and without
reading any external weight.

Bounded for hostile files: a file over protobuf's 2 GiB is refused unread, each top-level
field's length is checked against the file before its bytes are read, fields the runtime
does not need are skipped unread, metadata_props are capped, nested graphs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .errors import ArtifactError

# Why a reader of its own rather than onnx.load(..., load_external_data=False) or an
# onnxruntime session's get_modelmeta(): measured with
# `python benchmarks/lab/onnx_header_load.py` (2-core CPU; onnx 1.23, onnxruntime 1.32;
# first read, and the peak memory it adds):
#   shipped graphs (0.1-0.26 MB, 7 MB of external weights): this reader 4-15 ms, < 1 MiB;
#     onnx 1-3 ms after 95-170 ms for `import onnx`; a session 140-550 ms, 20-26 MiB.
#   200 MB of weights as external data: this reader 1 ms, 0 MiB; onnx 0.1 ms (+ import);
#     a session 21 ms, 10 MiB.
#   200 MB of weights inline: this reader 180 ms, 191 MiB; onnx 373 ms, 381 MiB; a
#     session 431 ms, 204 MiB (freed before a session loads the same bytes; fewstep's
#     exports keep their weights external).
# Reading all three shipped graphs costs less than importing onnx, and onnx is no runtime
# dependency: the runtime installs numpy, pillow and onnxruntime only, lean on a Jetson
# (onnx adds 31 MB and protobuf). A session costs 10-50 times more per graph, opens the
# external weights before their locations could be checked to lie inside the model's
# folder, and does not report those locations at all.

MAX_ONNX_BYTES: Final = 2 * 1024**3  # protobuf's limit for one message
MAX_METADATA_BYTES: Final = 8 * 1024**2  # all metadata_props together
_MAX_NESTING: Final = 32  # graphs inside attributes inside graphs ...

# Where TensorProtos can sit (field numbers of onnx.proto3), for the external-data walk.
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTR, _FUNCTION_NODE = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_EXTERNAL = 13
# The key of an external-data entry. Protobuf stores strings verbatim, so a message whose
# bytes do not contain it holds no external-data location at any depth.
_LOCATION: Final = b"location"


@dataclass(frozen=True)
class OnnxHeader:
    ir_version: int
    producer: str
    metadata: dict[str, str]
    external_data: tuple[str, ...]  # locations referenced by any tensor of the model


Buf = bytes | memoryview


def _varint(buf: Buf, pos: int) -> tuple[int, int]:
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


def _fields(buf: Buf) -> list[tuple[int, int, int | memoryview]]:
    """Top-level (field number, wire type, value) of one protobuf message."""
    view = memoryview(buf)
    out: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    while pos < len(view):
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(view, pos)
            out.append((field, wire, value))
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _varint(view, pos)
            if pos + n > len(view):
                raise ValueError("truncated length-delimited field")
            out.append((field, wire, view[pos : pos + n]))
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(view):
            raise ValueError("truncated field")
    return out


def _messages(buf: Buf, *numbers: int) -> list[memoryview]:
    return [v for f, w, v in _fields(buf) if f in numbers and w == 2
            and isinstance(v, memoryview)]


def _strings(entry: Buf) -> dict[int, str]:
    return {f: bytes(v).decode("utf-8") for f, w, v in _fields(entry)
            if w == 2 and isinstance(v, memoryview)}


def _tensor_locations(tensor: Buf, out: set[str]) -> None:
    for entry in _messages(tensor, _TENSOR_EXTERNAL):
        kv = _strings(entry)
        if kv.get(1) == "location" and 2 in kv:
            out.add(kv[2])


def _graph_locations(graph: Buf, out: set[str], depth: int) -> None:
    """External-data locations of every tensor in a GraphProto: initializers, sparse
    initializers and tensors in node attributes, in nested graphs too."""
    if depth > _MAX_NESTING:
        raise ValueError(f"graphs nested more than {_MAX_NESTING} deep")
    for f, w, v in _fields(graph):
        if w != 2 or not isinstance(v, memoryview):
            continue
        if f == _GRAPH_INIT:
            _tensor_locations(v, out)
        elif f == _GRAPH_SPARSE:
            for t in _messages(v, 1, 2):  # SparseTensorProto values, indices
                _tensor_locations(t, out)
        elif f == _GRAPH_NODE:
            _node_locations(v, out, depth)


def _node_locations(node: Buf, out: set[str], depth: int) -> None:
    if _LOCATION not in bytes(node):  # no tensor inside names a file: nothing to walk
        return
    for attr in _messages(node, _NODE_ATTR):
        for f, w, v in _fields(attr):
            if w != 2 or not isinstance(v, memoryview):
                continue
            if f in (_ATTR_T, _ATTR_TENSORS):
                _tensor_locations(v, out)
            elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
                for t in _messages(v, 1, 2):
                    _tensor_locations(t, out)
            elif f in (_ATTR_G, _ATTR_GRAPHS):
                _graph_locations(v, out, depth + 1)


def _read_top_level(path: Path, size: int) -> list[tuple[int, int, int | bytes]]:
    """The model's top-level fields, read from the file one at a time: each length is
    checked against the file before its bytes are read, and the fields that can hold
    nothing the runtime reads without a session are skipped, not read."""
    wanted = {2, 14, _MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS}
    out: list[tuple[int, int, int | bytes]] = []
    metadata = 0
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(20)
            key, used = _varint(head, 0)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise ValueError("field number 0")
            if wire == 0:
                value, end = _varint(head, used)
                out.append((field, wire, value))
                pos += end
            elif wire in (1, 5):
                pos += used + (8 if wire == 1 else 4)
            elif wire == 2:
                n, end = _varint(head, used)
                start = pos + end
                if start + n > size:
                    raise ValueError("truncated length-delimited field")
                if field == 14:
                    metadata += n
                    if metadata > MAX_METADATA_BYTES:
                        raise ValueError(f"metadata_props over {MAX_METADATA_BYTES} bytes")
                if field in wanted:
                    f.seek(start)
                    out.append((field, wire, f.read(n)))
                pos = start + n
            else:
                raise ValueError(f"wire type {wire}")
            if pos > size:
                raise ValueError("truncated field")
            f.seek(pos)
    return out


def read(path: Path) -> OnnxHeader:
    """ir_version, producer, metadata_props and every external-data location of the ONNX
    file ``path`` (an existing file; nothing is checked about the locations here)."""
    p = path
    size = p.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise ArtifactError(
            f"{str(p)!r} is {size} bytes, more than an ONNX file can hold ({MAX_ONNX_BYTES}); "
            "it is not an ONNX model: pass the model.onnx made by `fewstep export`"
        )
    try:
        fields = _read_top_level(p, size)
        ir = next((v for f, w, v in fields if f == 1 and w == 0), None)
        graph = next((v for f, w, v in fields if f == _MODEL_GRAPH and w == 2), None)
        if not isinstance(ir, int) or not isinstance(graph, bytes):
            raise ValueError("no ir_version or graph")
        producer = next((v for f, w, v in fields if f == 2 and w == 2), None)
        meta = {}
        for f, w, v in fields:
            if f == 14 and w == 2 and isinstance(v, bytes):
                kv = _strings(v)
                meta[kv.get(1, "")] = kv.get(2, "")
        locations: set[str] = set()
        _graph_locations(graph, locations, 0)
        for f, _w, v in fields:
            if f == _MODEL_TRAINING and isinstance(v, bytes):
                for g in _messages(v, 1, 2):  # initialization, algorithm
                    _graph_locations(g, locations, 1)
            elif f == _MODEL_FUNCTIONS and isinstance(v, bytes):
                for node in _messages(v, _FUNCTION_NODE):
                    _node_locations(node, locations, 1)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{str(p)!r} is not an ONNX model ({e}); the file is truncated or of another kind"
        ) from None
    return OnnxHeader(
        ir_version=ir,
        producer=bytes(producer).decode("utf-8", "replace")
        if isinstance(producer, bytes) else "",
        metadata=meta,
        external_data=tuple(sorted(locations)),
    )
