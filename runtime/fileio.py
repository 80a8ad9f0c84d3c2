"""Atomic file writes: a temporary file in the target's directory, then a rename.

A crash or Ctrl-C mid-write leaves the previous file intact and no stray temporary.
``file_lock`` and ``locked_update`` keep two processes from interleaving their writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX only; fewstep targets Linux x86-64 and Jetson
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

TMP_MARK = ".fewstep-tmp-"
NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def check_name_lengths(path: Path, what: str) -> None:
    """A ValueError when a name in ``path`` is longer than file systems allow (checked
    up front: Python versions differ in whether ``exists()`` raises or says False)."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise ValueError(f"{what} {str(path)[:60]!r}... has a name of {size} bytes, too "
                             f"long for the file system (at most {NAME_MAX}); pass a shorter "
                             "path")


def check_writable_target(path: str | os.PathLike[str]) -> Path:
    """The target as a Path, or a ValueError naming what is wrong with its folder."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    check_name_lengths(target, "output path")
    if not folder.is_dir():
        # The nearest part of the path that exists: a file there means no folder can be made.
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ValueError(
                f"output path {str(target)!r} goes through {str(blocker)!r}, which is a file, "
                "not a folder; pass --out a path inside a folder"
            )
        raise ValueError(
            f"output folder {str(folder)!r} does not exist; create it or pass another --out"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {str(folder)!r} is not writable; pass another --out")
    if target.is_dir():
        raise ValueError(f"output path {str(target)!r} is a directory; pass a file name")
    return target


def _tmp_name(target: Path) -> str:
    """The target's name as its temporaries carry it: cut so that a temporary's name
    stays within the usual 255-byte limit even when the target's name is that long."""
    return target.name.encode("utf-8")[:120].decode("utf-8", "ignore")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (KeyboardInterrupt included) the temporary is removed and the old
    file, if any, is left as it was.
    """
    target = check_writable_target(path)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{TMP_MARK}{_tmp_name(target)}.{os.getpid()}.",
        dir=target.parent if str(target.parent) else ".",
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file to the disk: where a full disk or a failing device shows on
    file systems that allocate late (an OSError: ENOSPC, EDQUOT, EIO)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Delete ``prefix<pid>.*`` files or folders in ``folder`` whose pid is not alive."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split(".", 1)[0]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
    return removed


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete temporaries of ``target`` left by writers that died (SIGKILL, power loss).

    A temporary is named ``.fewstep-tmp-<name>.<pid>.<random>``; it is stale when no
    process with that pid is alive. Live writers' temporaries are left alone.
    """
    folder = target.parent if str(target.parent) else Path(".")
    return _remove_stale(folder, f"{TMP_MARK}{_tmp_name(target)}.")


@contextlib.contextmanager
def staging_dir(folder: str | os.PathLike[str], label: str) -> Iterator[Path]:
    """A temporary folder inside ``folder`` (same file system: renames are atomic).

    Removed on exit, whatever happens; one left by a killed process is removed the next
    time a staging folder with the same label is made there.
    """
    parent = Path(folder)
    _remove_stale(parent, f"{TMP_MARK}{label}.")
    path = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{label}.{os.getpid()}.", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def lock_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) on ``.<name>.lock`` beside ``path``.

    Held across a read-modify-write so that two processes (two ``fewstep build`` runs)
    never interleave their writes of the same timing cache or plan + sidecar pair. The
    lock file stays behind (deleting it would race with a waiting process).
    """
    lp = lock_path(path)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
        yield
    finally:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_UN)
        os.close(fd)


def locked_update(path: str | os.PathLike[str], update: Callable[[bytes | None], bytes]) -> bytes:
    """Read ``path`` (None when absent), write ``update(old)`` atomically, under a file lock.

    The byte-level writer behind the timing cache: ``update`` merges what another
    process may have written since this one read the file.
    """
    target = Path(path)
    with file_lock(target):
        old = target.read_bytes() if target.is_file() else None
        new = update(old)
        write_bytes(target, new)
        return new
