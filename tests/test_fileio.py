"""runtime/fileio.py: locked read-modify-write updates of a shared file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fewstep.runtime import fileio

_WRITER = textwrap.dedent("""
    import sys, time
    from fewstep.runtime.fileio import locked_update
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(n):
        def merge(old, i=i):
            lines = (old or b"").decode().splitlines()
            time.sleep(0.002)  # widen the read-modify-write window
            return "\\n".join([*lines, f"{tag}-{i}"]).encode() + b"\\n"
        locked_update(path, merge)
""")


def test_two_processes_share_the_cache_file_without_losing_writes(tmp_path: Path) -> None:
    target = tmp_path / "timing-x-cc90-trt10.3.0.cache"
    n = 40
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(target), tag, str(n)])
             for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = target.read_text().splitlines()
    assert sorted(lines) == sorted([f"{t}-{i}" for t in "ab" for i in range(n)])
    assert [p.name for p in tmp_path.iterdir() if "fewstep-tmp" in p.name] == []


def test_locked_update_keeps_the_old_file_when_the_update_fails(tmp_path: Path) -> None:
    target = tmp_path / "cache.bin"
    fileio.locked_update(target, lambda old: b"one")

    def boom(old: bytes | None) -> bytes:
        raise RuntimeError("merge failed")

    with pytest.raises(RuntimeError):
        fileio.locked_update(target, boom)
    assert target.read_bytes() == b"one"
    assert fileio.locked_update(target, lambda old: (old or b"") + b"+two") == b"one+two"
