"""Containment: fewstep reads and copies only files inside the model's own folder.

Every way a model can point out of its folder — an external-data location that is an
absolute path or a ``../`` path, a weights file or a sub-folder that is a symlink to
somewhere else, a sibling graph or a plan sidecar that is a symlink — is run through
every reader (``info``, ``sample``, ``bench``, ``build``, ``check``, ``Pipeline.load``,
the Triton exporter). Each must stop with exit 2 and one line naming the location, and
the outside target is a marker proving it was never opened: a FIFO, which a reader
cannot open without a writer, watched by a thread that notices any reader (and lets it
go, so nothing hangs). For the Triton exporter a second marker, a regular file with
unique bytes, proves nothing was copied. Needs no torch (except for ``check``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_oracle
import pytest

from fewstep.runtime import artifact, plan
from fewstep.runtime.cli import main as fewstep_main
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.pipeline import Pipeline

SECRET = b"fewstep-containment-marker-7f3a9c"
ATTACKS = ("absolute", "dotdot", "symlinked-file", "symlinked-folder", "sibling-symlink")


class FifoWatch:
    """A FIFO at ``path`` and a thread that records whether anything opened it to read."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader has it open
                raise
            return
        self.opened = True  # a reader is waiting: note it, and let it read end-of-file
        os.close(fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            time.sleep(0.002)

    def stop(self) -> bool:
        self._stop.set()
        self._thread.join(5)
        self._poll()
        return self.opened


def _external_model(path: Path, location: str, meta: object | None = None) -> Path:
    """An oracle graph whose initializers live in the external file ``location``."""
    meta = meta or onnx_oracle.make_meta("epsilon", num_classes=3)
    model = onnx_oracle.build(meta, onnx_oracle.pixel_x0(meta))  # type: ignore[arg-type]
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="w.bin", size_threshold=256)
    onnx.save_model(model, str(path))  # writes w.bin beside it
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    return path


@contextlib.contextmanager
def attacked(tmp: Path, attack: str) -> Iterator[tuple[Path, str, FifoWatch]]:
    """(model.onnx, the location it points at, the watch on the outside target)."""
    folder, outside = tmp / "model", tmp / "outside"
    folder.mkdir()
    outside.mkdir()
    watch = FifoWatch(outside / "w.bin")
    model = folder / "model.onnx"
    try:
        if attack == "absolute":
            location = str(outside / "w.bin")
            _external_model(model, location)
        elif attack == "dotdot":
            location = os.path.relpath(outside / "w.bin", folder)  # ../outside/w.bin
            _external_model(model, location)
        elif attack == "symlinked-file":
            location = "w.bin"
            _external_model(model, location)
            (folder / "w.bin").unlink()
            (folder / "w.bin").symlink_to(outside / "w.bin")
        elif attack == "symlinked-folder":
            location = "sub/w.bin"
            _external_model(model, location)
            (folder / "sub").symlink_to(outside, target_is_directory=True)
        else:  # a sibling graph that is a link to a file elsewhere
            location = "model.step.onnx"
            _external_model(model, "w.bin")
            (folder / "model.step.onnx").symlink_to(outside / "w.bin")
        yield model, location, watch
    finally:
        watch.stop()


def _run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = fewstep_main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return code, lines[0]


def _refused(line: str, location: str) -> None:
    assert "outside the model's folder" in line or "not a plain path" in line, line
    assert repr(location) in line, line


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "info": lambda m, tmp: ["info", str(m)],
    "sample": lambda m, tmp: ["sample", "--model", str(m), "--n", "1", "--out",
                              str(tmp / "g.png")],
    "build": lambda m, tmp: ["build", str(m), "--all", "--out", str(tmp)],
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_runtime_commands_read_nothing_outside(
        attack: str, command: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with attacked(tmp_path, attack) as (model, location, watch):
        code, line = _run_cli(COMMANDS[command](model, tmp_path), capfd)
    assert not watch.opened, "the file outside the model's folder was opened"
    assert code == 2, line
    assert line.startswith("error: ")
    _refused(line, location)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("attack", ATTACKS)
def test_pipeline_load_reads_nothing_outside(attack: str, tmp_path: Path) -> None:
    with attacked(tmp_path, attack) as (model, location, watch), pytest.raises(
            ArtifactError) as e:
        Pipeline.load(model, backend="ort-cpu")
    assert not watch.opened
    _refused(str(e.value), location)


@pytest.mark.parametrize("attack", ["absolute", "symlinked-folder", "sibling-symlink"])
def test_bench_and_check_read_nothing_outside(attack: str, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")  # `check` compares against a PyTorch checkpoint
    pytest.importorskip("matplotlib")  # `bench` draws its plots
    with attacked(tmp_path, attack) as (model, location, watch):
        runs = [_run_cli(["check", str(model), "--against", str(tmp_path / "none.pt")], capfd),
                _run_cli(["bench", "--model", str(model), "--baselines", "--steps", "1",
                          "--batch", "1", "--out", str(tmp_path / "bench")], capfd)]
    assert not watch.opened
    for code, line in runs:
        assert code == 2, line
        _refused(line, location)


@pytest.mark.parametrize("attack", ATTACKS)
def test_triton_export_copies_nothing_from_outside(
        attack: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from fewstep.export import triton

    # The FIFO proves nothing was opened; a regular marker with unique bytes beside it
    # (where the "symlinked-folder" and "dotdot" cases would also reach) proves nothing
    # was copied, should a reader skip the FIFO.
    with attacked(tmp_path, attack) as (model, location, watch):
        (tmp_path / "outside" / "id_rsa").write_bytes(SECRET)
        for init_target in ("w.bin",):
            assert (tmp_path / "outside" / init_target).exists()
        code = triton.main([str(model), "--out", str(tmp_path / "repo")])
        _, err = capfd.readouterr()
    assert not watch.opened
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    _refused(lines[0], location)
    repo = tmp_path / "repo"
    copied = [p for p in repo.rglob("*") if p.is_file()] if repo.exists() else []
    assert not copied, copied
    assert not list(tmp_path.glob(".fewstep-tmp-*"))


def test_triton_export_refuses_a_copied_secret(tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    """An absolute location naming a readable regular file (the case that was copied into
    the repository before): refused, and its bytes are nowhere in the repository."""
    from fewstep.export import triton

    (tmp_path / "model").mkdir()
    secret = tmp_path / "id_rsa"
    secret.write_bytes(SECRET * 100)
    model = _external_model(tmp_path / "model" / "model.onnx", str(secret))
    step = onnx_oracle.make_meta("epsilon", num_classes=3).for_graph(kind="step")
    _external_model(tmp_path / "model" / "model.step.onnx", "../id_rsa", step)
    code = triton.main([str(model), "--out", str(tmp_path / "repo")])
    err = capfd.readouterr().err
    assert code == 2, err
    assert "outside the model's folder" in err or "not a plain path" in err
    for p in (tmp_path / "repo").rglob("*") if (tmp_path / "repo").exists() else []:
        assert not p.is_file() or SECRET not in p.read_bytes(), p


def test_contained_file_rule(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "w.bin").write_bytes(b"x")
    (folder / "sub" / "v.bin").write_bytes(b"x")
    (folder / "inner").symlink_to(folder / "w.bin")  # a link inside the folder is fine
    (tmp_path / "out.bin").write_bytes(b"x")
    assert artifact.contained_file(folder, "w.bin") == (folder / "w.bin").resolve()
    assert artifact.contained_file(folder, "sub/v.bin") == (folder / "sub/v.bin").resolve()
    assert artifact.contained_file(folder, "sub/../w.bin") == (folder / "w.bin").resolve()
    assert artifact.contained_file(folder, "inner") == (folder / "w.bin").resolve()
    missing = artifact.contained_file(folder, "later.bin", must_exist=False)
    assert missing == (folder / "later.bin").resolve()
    for bad, why in [("../out.bin", "outside"), (str(tmp_path / "out.bin"), "not a plain"),
                     ("", "not a plain"), ("a\x00b", "not a plain"), (".", "outside"),
                     ("sub", "not a regular file"), ("nope.bin", "is missing")]:
        with pytest.raises(ArtifactError, match=why):
            artifact.contained_file(folder, bad)


def test_escape_sequences_in_a_location_are_shown_inert(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    model = _external_model(tmp_path / "m" / "model.onnx", "../\x1b[2J\nALL CHECKS PASSED")
    with pytest.raises(ArtifactError) as e:
        artifact.read_onnx_meta(model)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)
    assert "\\x1b[2J\\nALL CHECKS PASSED" in str(e.value)


def test_external_data_in_node_attributes_is_found(tmp_path: Path) -> None:
    """Not only initializers: a Constant node's tensor (and one in a subgraph) can name
    external data too, and ONNX Runtime would read it."""
    meta = onnx_oracle.make_meta("epsilon", num_classes=3)
    model = onnx_oracle.build(meta, onnx_oracle.pixel_x0(meta))
    const = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [4], np.zeros(4, np.float32))
    const.ClearField("float_data")
    const.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "/etc/hostname"), ("offset", "0"), ("length", "16")):
        entry = const.external_data.add()
        entry.key, entry.value = k, v
    inner = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["k"], value=const)], "inner", [],
        [onnx.helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [4])])
    model.graph.node.append(onnx.helper.make_node(
        "If", ["cond"], ["unused"], then_branch=inner, else_branch=inner))
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "model.onnx"
    path.write_bytes(model.SerializeToString())
    assert artifact.read_onnx_header(path).external_data == ("/etc/hostname",)
    with pytest.raises(ArtifactError, match="not a plain path"):
        artifact.read_onnx_meta(path)


def test_plan_sidecar_is_contained(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A plan's sidecar that links out of the folder is refused unread, and a sidecar's
    onnx_file is followed only inside the plan's folder."""
    (tmp_path / "plans").mkdir()
    (tmp_path / "outside").mkdir()
    watch = FifoWatch(tmp_path / "outside" / "side.json")
    try:
        (tmp_path / "plans" / "model.plan").write_bytes(b"\0" * 64)
        (tmp_path / "plans" / "model.plan.json").symlink_to(tmp_path / "outside" / "side.json")
        code, line = _run_cli(["info", str(tmp_path / "plans" / "model.plan")], capfd)
    finally:
        opened = watch.stop()
    assert not opened
    assert code == 2 and "outside the model's folder" in line, line

    class _Sidecar:
        onnx_file = ""

    s = _Sidecar()
    for outside in ("../model.onnx", str(tmp_path / "model.onnx"), "/dev/zero"):
        s.onnx_file = outside
        assert plan.sidecar_source(tmp_path / "plans" / "model.plan", s) is None  # type: ignore[arg-type]
    s.onnx_file = "model.onnx"
    assert plan.sidecar_source(tmp_path / "plans" / "model.plan", s) == (  # type: ignore[arg-type]
        tmp_path / "plans" / "model.onnx").resolve()
