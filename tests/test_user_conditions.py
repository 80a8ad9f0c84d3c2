"""The CLI walked through every user-caused condition that used to end in a traceback,
an escape sequence on the terminal or an unbounded allocation.

Each case asserts the exit code, exactly one line on stderr (read at the file-descriptor
level) with the fix, and no traceback. A full disk (ENOSPC) and a read-only file system
(EROFS) are simulated by monkeypatching at the OS-call boundary inside an in-process CLI
call: ``os.fsync`` raises ENOSPC (where file systems that allocate late report a full
disk) and ``os.open`` raises EROFS for files in the output folder. File names over the
OS limit (ENAMETOOLONG), decompression bombs, hostile class names and damaged
checkpoints are real files.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx_oracle as oo
import pytest
from PIL import Image

from fewstep.runtime.cli import main as fewstep_main

LONG = "n" * 300  # one name over the usual 255-byte limit


def run(argv: list[str], capfd: pytest.CaptureFixture[str], code: int = 2,
        after_progress: bool = False) -> str:
    """Run the CLI in-process; the one error line (asserted: exit code, no traceback, and
    nothing else on stderr but, with ``after_progress``, the progress lines before it)."""
    got = fewstep_main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, err
    if after_progress:  # the failure came when writing the result
        assert [ln for ln in lines if "error" in ln] == lines[-1:], err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert "\x1b" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = oo.make_meta("epsilon", num_classes=3)
    return oo.write_artifact(tmp_path_factory.mktemp("m"), meta, oo.pixel_x0(meta))


@pytest.fixture(scope="module")
def init_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("img") / "init.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    return p


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb's
    header: Pillow learns the size from it before decoding anything)."""
    raw = zlib.compress(b"\0" * 64)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw)
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------
# Images: decompression bombs and pixel counts, checked before decoding
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "message"), [
    (40_000, 40_000, "decompression bomb"),  # past Pillow's own limit
    (10_000, 6_000, "is 10000x6000 pixels, over the limit of 50,000,000"),
])
@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
def test_image_bombs_are_one_line(flag: str, width: int, height: int, message: str,
                                  model: Path, init_png: Path, tmp_path: Path,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", width, height)
    extra = ["--init-image", str(init_png), "--mask", str(bomb)] if flag == "--mask" else [
        "--init-image", str(bomb)]
    line = run(["sample", "--model", str(model), *extra, "--out", str(tmp_path / "g.png")],
               capfd)
    assert message in line and "pass a smaller image" in line, line
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------
# File names over the OS limit, a full disk, a read-only file system
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "{model}", "--out", "{tmp}/" + LONG + ".png"],
    ["sample", "--model", "{tmp}/" + LONG + ".onnx", "--out", "{tmp}/g.png"],
    ["info", "{tmp}/" + LONG + ".onnx"],
], ids=["sample-out", "sample-model", "info-model"])
def test_name_too_long_is_one_line(argv: list[str], model: Path, tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    line = run([a.format(model=model, tmp=tmp_path) for a in argv], capfd)
    assert "too long" in line and "pass a shorter path" in line, line


def test_a_long_but_legal_output_name_is_written(model: Path, tmp_path: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """250 bytes is a legal name: its temporary file must not push it over the limit."""
    out = tmp_path / ("g" * 246 + ".png")
    assert fewstep_main(["sample", "--model", str(model), "--n", "1", "--out", str(out)]) == 0
    assert out.is_file()
    assert not list(tmp_path.glob(".fewstep-tmp-*"))


def _enospc(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("out", ["g.png", "g.jpg"])
def test_full_disk_during_sample(out: str, model: Path, tmp_path: Path,
                                 capfd: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _enospc(monkeypatch)
    line = run(["sample", "--model", str(model), "--n", "1", "--out", str(tmp_path / out)],
               capfd, after_progress=True)
    assert "No space left on device" in line and "free some space" in line, line
    assert "write a .png" not in line  # the disk is full: another format would not help
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(".fewstep-tmp-*"))


def test_read_only_file_system_during_sample(model: Path, tmp_path: Path,
                                             capfd: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open
    folder = str(tmp_path)

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(folder) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    line = run(["sample", "--model", str(model), "--n", "1", "--out",
                str(tmp_path / "g.png")], capfd, after_progress=True)
    assert "Read-only file system" in line and "write to a writable folder" in line, line


def test_full_disk_and_long_names_during_export(tiny_checkpoint: Path, tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    line = run(["export", str(tiny_checkpoint), "--out", str(tmp_path / (LONG + ".onnx"))],
               capfd)
    assert "too long" in line and "pass a shorter path" in line, line
    with monkeypatch.context() as m:
        _enospc(m)
        line = run(["export", str(tiny_checkpoint), "--no-check", "--out",
                    str(tmp_path / "m.onnx")], capfd, after_progress=True)
    assert "No space left on device" in line and "free some space" in line, line
    assert not list(tmp_path.iterdir())  # no graph, no weights, no staging folder left


def test_full_disk_during_train(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    _enospc(monkeypatch)
    line = run(["train", "--preset", "tiny", "--image-size", "16", "--steps", "1",
                "--batch-size", "2", "--out", str(tmp_path / "run")], capfd,
               after_progress=True)
    assert "No space left on device" in line and "free some space" in line, line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------
# Checkpoints: malformed fields, configs beyond sane limits, metadata vs network
# ---------------------------------------------------------------------------------


def _edited(tiny_checkpoint: Path, out: Path, edit: Any) -> Path:
    torch = pytest.importorskip("torch")
    raw = torch.load(tiny_checkpoint, weights_only=True)
    edit(raw)
    torch.save(raw, out)
    return out


def _set_config(key: str, value: Any) -> Any:
    return lambda raw: raw["unet_config"].__setitem__(key, value)


def _set_train(key: str, value: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        meta = json.loads(raw["meta"])
        meta["train_config"][key] = value
        raw["meta"] = json.dumps(meta)
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda raw: raw.__setitem__("step", [1, 2]), "step=[1, 2] must be a whole number"),
    (_set_config("groups", 0), "groups=0 must be a whole number in 1..1024"),
    (_set_config("base_channels", 8192), "base_channels=8192 must be a whole number"),
    (lambda raw: raw["unet_config"].update(base_channels=512, channel_mults=[1, 16]),
     "more than 4096; use a smaller network"),
    (_set_config("channel_mults", "12"), "channel_mults='12' is not a list"),
    (_set_config("dropout", "high"), "dropout='high' must be a number"),
    (_set_config("widths", 3), "unet_config has unknown keys ['widths']"),
    (_set_train("preset", "base"),
     "preset 'base' in the metadata has base_channels=128 vs 24 in the model"),
    (_set_train("preset", "huge"), "preset 'huge' in its training settings is not one of"),
], ids=["step-list", "groups-zero", "base-channels-8192", "too-wide", "mults-string",
        "dropout-string", "unknown-key", "preset-disagrees", "preset-unknown"])
def test_damaged_checkpoint_fields_are_one_line(edit: Any, message: str, tiny_checkpoint: Path,
                                                tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    bad = _edited(tiny_checkpoint, tmp_path / "bad.pt", edit)
    line = run(["export", str(bad), "--out", str(tmp_path / "m.onnx")], capfd)
    assert message in line, line
    assert not (tmp_path / "m.onnx").exists()


def test_damaged_weights_under_check_are_one_line(tiny_artifact: Path, tiny_checkpoint: Path,
                                                  tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(tiny_artifact.parent, tmp_path / "a")
    for w in (tmp_path / "a").glob("*.bin"):
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    line = run(["check", str(tmp_path / "a" / "model.onnx"), "--against", str(tiny_checkpoint),
                "--providers", "cpu"], capfd)
    assert "cannot load model.onnx" in line and "re-export the model" in line, line


# ---------------------------------------------------------------------------------
# Untrusted strings: inert when shown, refused when written, lists bounded
# ---------------------------------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\r\nALL CHECKS PASSED"


def test_info_shows_file_strings_inert(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                       ) -> None:
    meta = oo.make_meta("epsilon", num_classes=3)
    data = json.loads(meta.to_json())
    data["train_config"] = {"data": ESCAPES, "preset": "tiny"}
    path = oo.write(tmp_path / "model.onnx", meta, oo.pixel_x0(meta), metadata=json.dumps(data))
    assert fewstep_main(["info", str(path)]) == 0
    out, _ = capfd.readouterr()
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "data=\\x1b]0;pwned\\x07\\x1b[2J\\r\\nALL CHECKS PASSED" in out
    assert not any(line.startswith("ALL CHECKS") for line in out.splitlines())


def test_unprintable_class_names_are_refused_in_one_inert_line(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    meta = oo.make_meta("epsilon", num_classes=3)
    data = json.loads(meta.to_json())
    data["class_names"] = ["ok", ESCAPES, "x"]
    path = oo.write(tmp_path / "model.onnx", meta, oo.pixel_x0(meta), metadata=json.dumps(data))
    for argv in (["info", str(path)], ["sample", "--model", str(path), "--out",
                                      str(tmp_path / "g.png")]):
        line = run(argv, capfd)
        assert "class_names[1]" in line and "unprintable character" in line, line


def test_labels_error_lists_a_few_of_many_classes(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    names = tuple(f"class{i}" for i in range(5000))
    meta = dataclasses.replace(oo.make_meta("epsilon", num_classes=5000), class_names=names)
    path = oo.write(tmp_path / "model.onnx", meta, oo.pixel_x0(meta))
    line = run(["sample", "--model", str(path), "--labels", "volcano\x1b[2J", "--out",
                str(tmp_path / "g.png")], capfd)
    assert len(line) < 600, len(line)
    assert "class0, class1" in line and "(5000 in all)" in line and "class4999" not in line
    assert "volcano\\x1b[2J" in line


def test_training_folder_with_unprintable_class_names(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]
                                                      ) -> None:
    pytest.importorskip("torch")
    for name in ("lake", "bad\x1b[31mname"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / name / "a.png")
    line = run(["train", "--data", str(tmp_path / "data"), "--preset", "tiny", "--steps", "1",
                "--out", str(tmp_path / "run")], capfd)
    assert "class folder 'bad\\x1b[31mname'" in line and "rename the folder" in line, line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_onnx_file_size_is_checked_before_reading(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A file larger than any ONNX can be is refused from its size alone (a sparse file:
    nothing is written or read); one that is merely not ONNX is refused from its first
    bytes."""
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(3 * 1024**3)
    line = run(["info", str(big)], capfd)
    assert "more than an ONNX file can hold" in line, line
    garbage = tmp_path / "garbage.onnx"
    with open(garbage, "wb") as f:
        f.write(b"\x0a\xff\xff\xff\xff\x0f")  # a field claiming 4 GiB
        f.truncate(64 * 1024**2)
    tracemalloc.start()
    try:
        line = run(["info", str(garbage)], capfd)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "is not an ONNX model" in line, line
    assert peak < 8 * 1024**2, peak  # the 64 MiB file was not read whole
