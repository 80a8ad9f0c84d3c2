"""Placement is atomic as a whole: two exports placing the same artifact into one folder
take turns (a file lock in the folder), and the last one leaves a complete artifact.

The interleaving is made deterministic: placement A is stopped inside its critical
section (after moving its files in, before removing what they replace) while placement B
is started; B must wait for A's lock instead of moving its files in (otherwise A would
then delete B's weights and leave B's model.onnx pointing at nothing).
"""

from __future__ import annotations

import threading
from pathlib import Path

import onnx
import onnx_oracle as oo
import pytest

from fewstep.runtime import artifact
from fewstep.runtime.pipeline import Pipeline

onnx_export = pytest.importorskip("fewstep.export.onnx_export")


def _staged(folder: Path, tag: str, bias: float) -> list[Path]:
    """model.onnx + model.step.onnx sharing model.weights.<tag>.bin, as an export stages."""
    folder.mkdir()
    meta = oo.make_meta("epsilon", num_classes=3)
    x0 = oo.pixel_x0(meta)
    location = f"model.weights.{tag}.bin"
    files = []
    for name, m in (("model.onnx", meta), ("model.step.onnx", meta.for_graph(kind="step"))):
        model = oo.build(m, x0, bias_x=bias)
        onnx.external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location=location, size_threshold=256)
        onnx.save_model(model, str(folder / name))
        files.append(folder / name)
    return [folder / location, *files]


def test_concurrent_placements_take_turns(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    a = _staged(tmp_path / "a", "aaaaaaaaaaaa", 0.0)
    b = _staged(tmp_path / "b", "bbbbbbbbbbbb", 0.5)
    inside_a, release_a = threading.Event(), threading.Event()
    real_siblings = artifact.siblings

    def paused_siblings(path: Path, ext: str | None = None) -> list[Path]:
        if threading.current_thread().name == "A":  # A, inside its lock: wait here
            inside_a.set()
            assert release_a.wait(30)
        return real_siblings(path, ext)

    monkeypatch.setattr(onnx_export.artifact, "siblings", paused_siblings)
    errors: list[BaseException] = []

    def place(files: list[Path]) -> None:
        try:
            onnx_export.place(files, out, "model", "sha256:same")
        except BaseException as e:  # reported below
            errors.append(e)

    ta = threading.Thread(target=place, args=(a,), name="A")
    tb = threading.Thread(target=place, args=(b,), name="B")
    ta.start()
    assert inside_a.wait(30)
    tb.start()
    tb.join(1.0)
    # B is blocked on A's lock: none of its files has moved in.
    assert tb.is_alive()
    assert all(p.exists() for p in b)
    assert not (out / "model.weights.bbbbbbbbbbbb.bin").exists()
    release_a.set()
    ta.join(30)
    tb.join(30)
    assert not errors, errors
    # B came last: the folder is exactly B's artifact, every reference present.
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["model.onnx", "model.step.onnx", "model.weights.bbbbbbbbbbbb.bin"]
    for g in artifact.siblings(out / "model.onnx"):
        assert artifact.external_files(g)  # raises if a weights file is missing
    pipe = Pipeline.load(out / "model.onnx", backend="ort-cpu")
    assert pipe.generate(1, steps=2).shape[0] == 1
    assert (out / ".model.onnx.lock").exists()  # the lock file stays (see fileio.file_lock)
