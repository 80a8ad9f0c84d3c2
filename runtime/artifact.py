"""The files of one model: ``Artifact.open(path)`` reads them once.

An exported model is a set of graph files that share one base name::

    model.onnx                 the denoiser (any step count, host-side DDIM update)
    model.step.onnx            denoiser + DDIM update (state stays on the device)
    model.sampler-4.onnx       the whole 4-step loop in one graph (eta 0)
    model.sampler-8-eta1.onnx  an 8-step loop with eta 1 (noise as an input)
    model.weights.<hash>.bin   the weights they share (ONNX external data)

``fewstep export --target ort-cuda`` adds the ORT-CUDA variant beside them, an artifact of
its own named ``model.ort-cuda.onnx``, ``model.ort-cuda.step.onnx``, ... with its own
``model.ort-cuda.weights.<hash>.bin`` (NHWC weights); ``graph.target`` in its metadata
says what it is, and ``Pipeline.load`` prefers it on ONNX Runtime's CUDA provider.

TensorRT plans follow the same pattern with ``.plan`` and a ``.plan.json`` sidecar each.
The ModelMeta of every ONNX file sits in its ``metadata_props`` under ``META_KEY``.
``mismatch`` is the one answer to "are these graphs of the same model?".

Every file an artifact references lies inside the folder of the model file: weights,
sibling graphs, sidecars. ``contained_file`` is that rule, and every reader (the
runtime, ``info``, ``check``, ``build``, ``bench``, the Triton exporter) goes through
it before opening anything: ``read_onnx_meta`` for external data, ``siblings`` for
sibling graphs.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from . import onnx_header
from .errors import ArtifactError, quote
from .fileio import check_name_lengths
from .meta import META_KEY, TARGETS, ModelMeta
from .onnx_header import OnnxHeader

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


def variant_path(path: str | Path, target: str) -> Path:
    """The main file of the ``target`` variant of the artifact whose main file is ``path``:
    model.onnx → model.ort-cuda.onnx (its graphs and weights share that base name, so
    they are an artifact of their own beside the portable one)."""
    p = Path(path)
    if target not in TARGETS or target == "portable":
        raise ValueError(f"target={target!r} is not one of {', '.join(TARGETS[1:])}")
    return p.with_name(f"{base_stem(p)}.{target}.onnx")


def find_variant(path: str | Path, target: str) -> Path | None:
    """The main file of the ``target`` variant beside ``path`` when there is one; it must
    lie inside the folder like every file an artifact references (``contained_file``:
    an ArtifactError for one that leads out of it)."""
    v = variant_path(path, target)
    found = contained_file(v.parent, v.name, f"{target} variant", must_exist=False)
    return v if found.is_file() else None


def require_portable(path: str | Path, meta: ModelMeta, what: str) -> None:
    """An ArtifactError when ``path`` is a variant graph (``graph.target`` not portable):
    ``what`` (TensorRT, Triton, ...) reads only the portable graphs."""
    if meta.graph.target == "portable":
        return
    p = Path(path)
    base = base_stem(p)
    portable = base[: -len(f".{meta.graph.target}")] if base.endswith(
        f".{meta.graph.target}") else base
    raise ArtifactError(
        f"{p.name} is an {meta.graph.target.upper()} variant graph (ONNX Runtime's CUDA "
        f"contrib kernels, NHWC), which only ONNX Runtime's CUDA provider runs; {what} "
        f"takes the portable graphs: pass {quote(portable + '.onnx')} (or its step/sampler "
        "graph) instead"
    )


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
        if base_stem(cand, ext) != base:
            continue
        if cand != p:  # the file the user named is theirs; the others must be contained
            contained_file(p.parent, cand.name, "graph file", must_exist=False)
        if cand.is_file():
            found.append(cand)
    if p.is_file() and p not in found:
        found.append(p)
    return sorted(found)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# ---------------------------------------------------------------------------------
# Containment: every file an artifact references lies inside the model's own folder.
# ---------------------------------------------------------------------------------


def contained_file(folder: str | Path, location: str, what: str = "file",
                   must_exist: bool = True) -> Path:
    """The file ``location`` names relative to the model folder ``folder``.

    The one rule for every file an artifact references (external weights of any graph,
    sibling graphs, a plan's sidecar and source ONNX): ``location``, with symlinks
    resolved, is a regular file inside ``folder``. Anything else (an absolute path, a
    ``../`` that leaves the folder, a symlinked file or folder pointing out of it, a
    device or a folder) is an ArtifactError naming the location; it is raised before
    anything at that location is opened. A missing file is an ArtifactError too, unless
    ``must_exist`` is false (then the caller decides what missing means).
    """
    base = Path(folder)
    shown = quote(location)
    if not location or "\x00" in location or os.path.isabs(location) or location.startswith(
            ("\\", "//")):
        raise ArtifactError(
            f"{what} {shown} of {str(base)!r} is not a plain path inside the model's "
            "folder (absolute or empty); fewstep reads only files inside that folder: "
            "re-export the model"
        )
    root = Path(os.path.realpath(base))
    target = Path(os.path.realpath(base / location))
    if target == root or not target.is_relative_to(root):
        raise ArtifactError(
            f"{what} {shown} of {str(base)!r} resolves to {quote(target)}, outside "
            "the model's folder; fewstep reads only files inside that folder: put the file "
            "there (a copy, not a link) or re-export the model"
        )
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        if must_exist:
            raise ArtifactError(
                f"{what} {shown} is missing from {str(base)!r}; copy the whole exported "
                "folder"
            ) from None
        return target
    except OSError as e:
        raise ArtifactError(f"{what} {shown} of {str(base)!r} cannot be read "
                            f"({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{what} {shown} of {str(base)!r} is not a regular file; "
                            "re-export the model")
    return target


def external_files(path: str | Path, header: OnnxHeader | None = None) -> list[Path]:
    """The external data files of an ONNX file, each checked by ``contained_file``."""
    p = Path(path)
    h = header if header is not None else read_onnx_header(p)
    files = []
    for loc in h.external_data:
        file = contained_file(p.parent, loc, f"weights file of {p.name}", must_exist=False)
        if not file.exists():
            raise ArtifactError(
                f"{str(p)!r} keeps its weights in {quote(loc)}, which is missing beside it; "
                "copy the whole exported folder"
            )
        files.append(file)
    return files


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
    check_name_lengths(path, "model path")
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
    """ir_version, producer, metadata_props and every external-data location of an ONNX
    file (nothing is checked about the locations here: see ``external_files``)."""
    p = Path(path)
    check_model_path(p)
    if not p.is_file():
        raise ArtifactError(f"model file {str(p)!r} does not exist")
    return onnx_header.read(p)


def _meta_of_header(path: Path, header: OnnxHeader) -> ModelMeta:
    if META_KEY not in header.metadata:
        raise ArtifactError(
            f"{str(path)!r} has no fewstep metadata (metadata_props[{META_KEY!r}]); "
            f"it was not exported by fewstep: export it with `fewstep export CHECKPOINT`"
        )
    external_files(path, header)  # every weights file inside the folder, present
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
    None for the same model. Graphs of one artifact also share their precision and
    target; pass ``precision=False`` to compare artifacts of one model exported at other
    precisions or for other targets (the ORT-CUDA variant beside the portable graphs)."""
    checks: list[tuple[str, object, object]] = [
        ("source_hash", main.source_hash, other.source_hash),
        ("schedule", main.schedule, other.schedule),
        ("prediction type", main.prediction_type, other.prediction_type),
        ("sample shape", main.sample_shape, other.sample_shape),
        ("images", main.images, other.images), ("conditioning", main.cond, other.cond),
    ]
    if precision:
        checks.append(("precision", main.graph.precision, other.graph.precision))
        checks.append(("target", main.graph.target, other.graph.target))
    checks.append(("classes", main.class_names or main.num_classes,
                   other.class_names or other.num_classes))
    checks.append(("null label", main.null_label, other.null_label))
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
            # Only a file inside the model's folder is looked at (contained_file raises
            # for any other location).
            data = contained_file(self.path.parent, loc, "weights file", must_exist=False)
            out[loc] = data.stat().st_size if data.is_file() else -1
        return out

    def plans(self, folder: str | Path | None = None) -> tuple[GraphFile, ...]:
        """The TensorRT plans of this artifact's graphs in ``folder`` (default: beside the
        main file), each with its sidecar; a plan whose sidecar is unreadable or describes
        another model comes with its ``problem``."""
        return self.files_of(".plan", folder)

    def files_of(self, ext: str, folder: str | Path | None = None) -> tuple[GraphFile, ...]:
        """The files of this artifact's graphs with extension ``ext`` in ``folder`` (default:
        beside the main file): the plans of an ONNX model, the ONNX graphs of a plan. Each
        lies inside ``folder`` (an ArtifactError otherwise, before it is opened); one that
        is unreadable or describes another model comes with its ``problem``."""
        where = Path(folder) if folder is not None else self.path.parent
        base = base_stem(self.path, self.ext)
        found = []
        for f in siblings(where / f"{base}{ext}", ext):
            if f == self.path:
                found.append(self.main)
                continue
            contained_file(where, f.name, "graph file", must_exist=False)
            if f.is_file():
                found.append(_read_sibling(f, ext, self.main))
        return tuple(found)
