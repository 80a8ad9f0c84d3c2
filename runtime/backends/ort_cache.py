"""ONNX Runtime's optimised graph, saved once and reused (the ``optimized_cache`` option).

Every new session optimises its graph again (constant folding, fusions, layout changes
for the execution provider). With a cache folder set, a session that finds no entry for
its graph saves the graph as ONNX Runtime optimised it
(``SessionOptions.optimized_model_filepath``, initialisers in a weights file beside it);
later sessions load that entry with graph optimisations off.

An entry is keyed by everything the optimised graph depends on, so a stale one is never
used: the bytes of the ONNX file and of its external weights files (SHA-256), the
onnxruntime version, the backend and its provider options, the optimisation level, and
the device — the CPU (model and instruction-set flags: ONNX Runtime's CPU layout
transforms choose block sizes by instruction set) or the GPU (name, compute capability
and driver version, through the CUDA driver API). A device that cannot be identified
means no cache (with a warning).

Layout: ``<folder>/<stem>-<key>/`` holding ``model.onnx``, ``model.weights`` and
``entry.json`` (the key's inputs and the SHA-256 of the two files). ``<stem>`` is the
graph's file name reduced to ``[A-Za-z0-9_-]``, so an entry is always a direct child of
the folder. An entry is written in a staging folder inside the cache folder and renamed
into place whole. Loading checks both digests first: a damaged, partial or foreign entry
is rebuilt (written again from the original graph), and so is one that ONNX Runtime
then refuses. A folder that cannot be written leaves the session uncached, with a
warning. The cache never makes a load fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .. import artifact, fileio
from .ort_options import OrtConfig

FORMAT: Final = 1  # of an entry: bump when the layout or the key changes
GRAPH: Final = "model.onnx"
WEIGHTS: Final = "model.weights"
ENTRY: Final = "entry.json"
MIN_EXTERNAL_BYTES: Final = 1024  # initialisers this large go to the weights file
CU_COMPUTE_MAJOR, CU_COMPUTE_MINOR = 75, 76  # CUdevice_attribute values
MakeSession = Callable[[str | None, str | None], Any]  # (graph path or None, save-to path)


class OptimizedCacheWarning(UserWarning):
    """The optimised-graph cache could not be used or written; the session runs anyway."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_identity() -> str | None:
    model = flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if not model and key in ("model name", "hardware", "cpu model"):
                model = value.strip()
            elif not flags and key in ("flags", "features"):
                flags = hashlib.sha256(value.strip().encode()).hexdigest()[:16]
    model = model or platform.processor()
    if not model and not flags:
        return None
    return f"cpu {platform.machine()} {model} flags {flags}"


def _gpu_identity(device_id: int) -> str | None:
    """Name, compute capability and driver version of CUDA device ``device_id``."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor, driver = (ctypes.c_int() for _ in range(4))
        name = ctypes.create_string_buffer(256)
        ok = (cuda.cuInit(0) == 0
              and cuda.cuDeviceGet(ctypes.byref(dev), device_id) == 0
              and cuda.cuDeviceGetName(name, len(name), dev) == 0
              and cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_COMPUTE_MAJOR, dev) == 0
              and cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_COMPUTE_MINOR, dev) == 0
              and cuda.cuDriverGetVersion(ctypes.byref(driver)) == 0)
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    return (f"gpu {name.value.decode('utf-8', 'replace')} sm_{major.value}{minor.value} "
            f"driver {driver.value}")


def device_identity(config: OrtConfig) -> str | None:
    """What the optimised graph may depend on of the device, or None if unknown."""
    if config.backend == "ort-cpu":
        return _cpu_identity()
    return _gpu_identity(config.device_id)


def model_digest(path: str) -> str:
    """SHA-256 over the ONNX file and its external weights files, in order."""
    h = hashlib.sha256()
    for file in [Path(path), *artifact.external_files(path)]:
        h.update(file.name.encode() + b"\0" + _sha256(file).encode())
    return h.hexdigest()


def _stem(path: str) -> str:
    name = Path(path).name
    name = name[:-5] if name.endswith(".onnx") else name
    return (re.sub(r"[^A-Za-z0-9_-]", "_", name) or "graph")[:48]


@dataclass(frozen=True)
class CacheEntry:
    folder: Path   # the cache folder
    path: Path     # <folder>/<stem>-<key>
    key: dict[str, Any]

    @property
    def graph(self) -> Path:
        return self.path / GRAPH


def entry_for(path: str, config: OrtConfig, providers: Any, ort_version: str) -> CacheEntry:
    """The cache entry of graph ``path`` under ``config``; a ValueError saying why there
    is none (no device identity)."""
    device = device_identity(config)
    if device is None:
        raise ValueError(f"the {'CPU' if config.backend == 'ort-cpu' else 'GPU'} cannot be "
                         "identified")
    key = {"format": FORMAT, "onnxruntime": ort_version, "backend": config.backend,
           "providers": providers, "graph_optimization_level": config.graph_optimization_level,
           "device": device, "model": model_digest(path)}
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    folder = Path(config.optimized_cache)
    # Compared with what entry.json holds, so in the form JSON gives back (lists).
    return CacheEntry(folder, folder / f"{_stem(path)}-{digest}", json.loads(text))


def _valid(entry: CacheEntry) -> str | None:
    """None when the entry on disk is complete, for this key, and undamaged; else why not."""
    if not entry.path.is_dir():
        return "missing"
    root = os.path.realpath(entry.folder)
    if os.path.dirname(os.path.realpath(entry.path)) != root:
        return "outside the cache folder"
    try:
        record = json.loads((entry.path / ENTRY).read_text())
        if not isinstance(record, dict) or record.get("key") != entry.key:
            return "written for another key"
        digests = record.get("sha256")
        if not isinstance(digests, dict) or GRAPH not in digests:
            return "written for another key"
        for name in (GRAPH, WEIGHTS):
            file = entry.path / name
            if name not in digests and not file.exists():
                continue  # a graph whose initialisers are all small has no weights file
            if file.is_symlink() or _sha256(file) != digests.get(name):
                return f"{name} does not match its digest"
    except (OSError, ValueError, AttributeError) as e:
        return f"unreadable ({type(e).__name__})"
    return None


def _write(entry: CacheEntry, make: MakeSession, source: str) -> Any:
    """A session on ``source`` that also saves its optimised graph as ``entry``."""
    entry.folder.mkdir(parents=True, exist_ok=True)
    with fileio.staging_dir(entry.folder, entry.path.name) as stage:
        session = make(None, str(stage / GRAPH))
        files = [n for n in (GRAPH, WEIGHTS) if (stage / n).is_file()]
        for name in files:
            fileio.fsync_file(stage / name)
        record = {"key": entry.key, "source": os.path.basename(source),
                  "sha256": {n: _sha256(stage / n) for n in files}}
        fileio.write_text(stage / ENTRY, json.dumps(record, indent=1, sort_keys=True))
        old = None
        if entry.path.exists() or entry.path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f"{fileio.TMP_MARK}{entry.path.name}.old.",
                                        dir=entry.folder))
            os.replace(entry.path, old / "entry")
        with contextlib.suppress(OSError):  # another process's entry got there first
            os.rename(stage, entry.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return session


def open_session(path: str, config: OrtConfig, providers: Any, ort_version: str,
                 make: MakeSession) -> tuple[Any, str]:
    """(session, what the cache did): ``hit``, ``written``, ``rebuilt (why)`` or ``off
    (why)``. ``make(graph, save_to)`` creates the session: on the original graph with
    the configured optimisation level (``graph`` None), saving the optimised graph to
    ``save_to`` when given, or on the cached ``graph`` with optimisations off."""
    if config.graph_optimization_level == "disable":
        return make(None, None), "off (nothing to cache at graph_optimization_level=disable)"
    try:
        entry = entry_for(path, config, providers, ort_version)
    except (ValueError, OSError) as e:
        warnings.warn(f"optimized_cache is off for {Path(path).name}: {e}",
                      OptimizedCacheWarning, stacklevel=5)
        return make(None, None), f"off ({e})"
    problem = _valid(entry)
    if problem is None:
        try:
            return make(str(entry.graph), None), "hit"
        except Exception as e:  # onnxruntime's errors derive from Exception only
            problem = f"onnxruntime refused it: {_first_line(e)}"
    try:
        session = _write(entry, make, path)
    except Exception as e:  # a full disk, a read-only folder, a graph ORT cannot save
        why = (e.strerror or str(e)) if isinstance(e, OSError) else _first_line(e)
        session = make(None, None)  # onnxruntime's own error if the graph cannot load
        warnings.warn(f"cannot write the optimized_cache entry of {Path(path).name} in "
                      f"{str(entry.folder)!r} ({why}); running uncached",
                      OptimizedCacheWarning, stacklevel=5)
        return session, f"off (cannot write: {why})"
    return session, "written" if problem == "missing" else f"rebuilt ({problem})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
