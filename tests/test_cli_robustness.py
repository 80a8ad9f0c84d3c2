"""`fewstep` under hostile input and environments: huge numbers in metadata, huge --n and
--scale, out-of-memory, a closed stdout pipe, folders where files are expected, output
formats, ONNX Runtime's own log, batch sizes over a graph's profile, the default --steps,
and `fewstep distill --help` without PyTorch.

Every failure must be one line on stderr (file descriptor 2: C libraries included), an
exit code of 2 (bad input) and no traceback.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_oracle as oo
import pytest
from PIL import Image

from fewstep.runtime import cli, cli_info, clitools, images, sampling
from fewstep.runtime.artifact import Artifact
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.pipeline import Pipeline, default_model_path

_VENV_SCRIPT = Path(sys.executable).with_name("fewstep")
FEWSTEP = str(_VENV_SCRIPT) if _VENV_SCRIPT.is_file() else (shutil.which("fewstep") or "fewstep")


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    return lines[0]


def fewstep(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cond_meta() -> ModelMeta:
    return oo.make_meta("epsilon", num_classes=3)


@pytest.fixture(scope="module")
def x0(cond_meta: ModelMeta) -> np.ndarray:
    return oo.pixel_x0(cond_meta)


def artifact(folder: Path, meta: ModelMeta, x0: np.ndarray,
             samplers: tuple[tuple[int, str, float, str], ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return oo.write_artifact(folder, meta, x0, samplers=samplers)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, cond_meta: ModelMeta, x0: np.ndarray
          ) -> Path:
    return artifact(tmp_path_factory.mktemp("plain"), cond_meta, x0)


# ---------------------------------------------------------------------------------
# 1. Malformed metadata: a number beyond float64
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "sample"])
def test_huge_number_in_metadata_is_one_error_line(command: str, tmp_path: Path,
                                                   cond_meta: ModelMeta, x0: np.ndarray,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    d = json.loads(cond_meta.to_json())
    d["graph"]["eta"] = 10**400
    path = oo.write(tmp_path / "huge.onnx", cond_meta, x0, metadata=json.dumps(d))
    argv = ["info", str(path)] if command == "info" else [
        "sample", "--model", str(path), "--out", str(tmp_path / "g.png")]
    code, out, err = fewstep(argv, capfd)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "graph.eta" in line and "is too large for a number" in line and len(line) < 400


# ---------------------------------------------------------------------------------
# 2. Uncaught exceptions: --n, --scale, MemoryError, broken pipes, distill without torch
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--n", "1000000000"], "argument --n: 1000000000 is more than 10000, the most images one "
                            "grid holds; pass at most 10000"),
    (["--n", "10001"], "argument --n: 10001 is more than 10000"),
    (["--scale", "100000"], "argument --scale: 100000 is more than 64, the largest "
                            "enlargement; pass at most 64"),
    (["--scale", "0"], "argument --scale: 0 must be at least 1"),
    (["--n", "x"], "argument --n: 'x' is not a whole number"),
])
def test_n_and_scale_are_bounded(args: list[str], message: str, model: Path, tmp_path: Path,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = fewstep(["sample", "--model", str(model), *args,
                              "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and out == ""
    assert message in one_error_line(err)
    assert "see fewstep sample --help" in err  # the one line says where the usage is


def test_grid_over_the_pixel_limit_is_refused_before_generating(
        model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("generated images for a grid that cannot be written")

    monkeypatch.setattr(Pipeline, "generate", boom)
    # 8x8 images: 9000 of them in 3 columns (one per class) at scale 64 is 2 gigapixels.
    code, out, err = fewstep(["sample", "--model", str(model), "--n", "9000", "--scale", "64",
                              "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "--n 9000 images of 8x8 at --scale 64 make a" in line
    assert "over the limit of 100 megapixels; pass --scale" in line
    code, _, err = fewstep(["sample", "--model", str(model), "--n", "64", "--scale", "64",
                            "--nrow", "64", "--out", str(tmp_path / "g.webp")], capfd)
    assert code == 2 and "over the WEBP limit of 16383 pixels a side" in one_error_line(err)
    code, _, err = fewstep(["sample", "--model", str(model), "--n", "3", "--nrow", "10000000",
                            "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and one_error_line(err).endswith("; pass --nrow 3 or less")


def test_save_image_refuses_a_huge_enlargement_without_allocating(tmp_path: Path) -> None:
    tile = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="enlarged 100000 times would be 1000000x1000000"):
        images.save_image(tile, tmp_path / "g.png", scale=100_000)
    assert not list(tmp_path.iterdir())


def test_memory_error_is_one_line_naming_n(model: Path, tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*a: Any, **k: Any) -> Any:
        raise MemoryError("Unable to allocate 2.86 TiB for an array")

    monkeypatch.setattr(Pipeline, "generate", oom)
    code, out, err = fewstep(["sample", "--model", str(model), "--n", "5000",
                              "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert "--n 5000: out of memory generating 5000 images of 3x8x8" in line
    assert "pass a smaller --n or --batch-size" in line


def test_memory_error_anywhere_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    def body(args: argparse.Namespace) -> int:
        raise MemoryError

    assert clitools.run(body, argparse.Namespace()) == clitools.EXIT_USAGE
    assert one_error_line(capsys.readouterr().err).startswith("error: out of memory")


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_in_process_is_quiet(model: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = cli_info.main([str(model)])
    monkeypatch.undo()
    assert code == clitools.EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"]])
def test_broken_pipe_like_head(argv: list[str]) -> None:
    """`fewstep info | head -0`: the reader is gone before the first write."""
    proc = subprocess.Popen([FEWSTEP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    proc.stderr.close()
    assert err == "", err  # no BrokenPipeError traceback, no "Exception ignored"
    assert code == 141


NO_TORCH = ("import sys; sys.modules['torch'] = None; "  # `import torch` raises ImportError
            "from fewstep.runtime.cli import main; sys.exit(main(sys.argv[1:]))")


def test_distill_help_needs_no_torch(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-c", NO_TORCH, "distill", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "--from-steps" in helped.stdout and "--loss-weighting" in helped.stdout
    assert "(default: [1500])" in " ".join(helped.stdout.split())
    ran = subprocess.run([sys.executable, "-c", NO_TORCH, "distill", str(tmp_path / "t.pt"),
                          "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 2
    line = one_error_line(ran.stderr)
    assert "needs the 'torch' package" in line and "fewstep[train]" in line


def test_distill_parser_defaults_match_the_config() -> None:
    pytest.importorskip("torch")
    import dataclasses

    from fewstep.train import cli_distill, distill

    config = dataclasses.asdict(distill.DistillConfig())
    for key, value in cli_distill.DEFAULTS.items():
        assert config[key] == value, key
    assert cli_distill.DEFAULT_FROM_STEPS == distill.DEFAULT_FROM_STEPS
    assert cli_distill.LOSS_WEIGHTINGS == distill.LOSS_WEIGHTINGS
    args = cli_distill.build_parser("fewstep distill").parse_args(["t.pt", "--out", "o"])
    assert args.steps_per_round == list(config["steps_per_round"])
    assert args.to_steps == config["to_steps"] and args.lr == config["lr"]


# ---------------------------------------------------------------------------------
# 3. ONNX Runtime prints nothing of its own
# ---------------------------------------------------------------------------------


def test_truncated_weights_file_is_one_line(tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    try:
        shipped = default_model_path()
    except ArtifactError:
        pytest.skip("this build ships no default model")
    for f in shipped.parent.glob("*"):
        if f.is_file() and f.suffix in (".onnx", ".bin"):
            shutil.copy(f, tmp_path / f.name)
    weights = list(tmp_path.glob("*.bin"))
    assert weights, "the shipped model keeps its weights in a .bin beside it"
    for w in weights:
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, out, err = fewstep(["sample", "--model", str(tmp_path / shipped.name), "--backend",
                              "ort-cpu", "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and out == ""
    line = one_error_line(err)  # before: ONNX Runtime's coloured [E:onnxruntime:...] line too
    assert line.startswith("error: onnxruntime cannot load") and "\x1b[" not in err


# ---------------------------------------------------------------------------------
# 4. Folders for files, files for folders, output formats
# ---------------------------------------------------------------------------------


def test_model_folder_says_which_file_to_pass(model: Path, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    folder = model.parent
    code, _, err = fewstep(["sample", "--model", str(folder), "--out",
                            str(tmp_path / "g.png")], capfd)
    assert code == 2
    assert one_error_line(err) == (
        f"error: model {str(folder)!r} is a folder, not a model file; pass the model file "
        f"inside it: --model {str(model)!r}")
    code, _, err = fewstep(["info", str(folder)], capfd)
    assert code == 2 and f"pass the model file inside it: {str(model)!r}" in one_error_line(err)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = fewstep(["info", str(empty)], capfd)
    assert code == 2 and "holds no .onnx, .plan or .oracle.json" in one_error_line(err)
    (tmp_path / "two").mkdir()
    for name in ("a.onnx", "b.onnx", "a.step.onnx"):
        (tmp_path / "two" / name).write_bytes(b"")
    code, _, err = fewstep(["info", str(tmp_path / "two")], capfd)
    assert "one of the model files inside it ('a.onnx', 'b.onnx')" in one_error_line(err)


def test_out_under_a_file_says_the_parent_is_a_file(model: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file.txt").write_text("x")
    for out in (tmp_path / "file.txt" / "x.png", tmp_path / "file.txt" / "deeper" / "x.png"):
        code, _, err = fewstep(["sample", "--model", str(model), "--out", str(out)], capfd)
        assert code == 2
        line = one_error_line(err)
        assert f"goes through {str(tmp_path / 'file.txt')!r}, which is a file, not a " \
               "folder" in line and "does not exist" not in line


@pytest.mark.parametrize(("ext", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"),
                                          (".webp", "WEBP"), (".bmp", "BMP"), (".tif", "TIFF"),
                                          (".PNG", "PNG")])
def test_out_extension_picks_the_format(ext: str, fmt: str, model: Path, tmp_path: Path,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    if not images._can_write(fmt, "RGB"):
        pytest.skip(f"this Pillow cannot write {fmt}")
    out = tmp_path / f"grid{ext}"
    code, stdout, err = fewstep(["sample", "--model", str(model), "--backend", "ort-cpu",
                                 "--n", "3", "--scale", "2", "--out", str(out)], capfd)
    assert code == 0, err
    assert stdout == f"{out}\n"
    with Image.open(out) as im:
        assert im.format == fmt
        assert im.size == (2 * (3 * 10 + 2), 2 * 10 + 4)  # 3 columns of 8 px + 2 px padding


@pytest.mark.parametrize(("name", "message"), [
    ("g.txt", "ends in '.txt', an image format this Pillow cannot write"),
    ("g.onnx", "ends in '.onnx', an image format this Pillow cannot write"),
    ("grid", "has no file extension"),
])
def test_unknown_out_extension_is_refused_before_any_work(
        name: str, message: str, model: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(Pipeline, "load", boom)
    code, _, err = fewstep(["sample", "--model", str(model), "--out", str(tmp_path / name)],
                           capfd)
    assert code == 2
    line = one_error_line(err)
    assert message in line and "end the file name in one of .png, .jpg" in line
    assert not list(tmp_path.iterdir())


def test_save_image_writes_what_the_extension_names(tmp_path: Path) -> None:
    """Pipeline.save_grid goes through save_image: a .jpg path gets JPEG bytes."""
    tile = np.full((4, 4, 3), 200, np.uint8)
    images.save_image(tile, tmp_path / "a.jpg")
    assert (tmp_path / "a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    images.save_image(tile, tmp_path / "a.png", scale=2)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="has no file extension"):
        images.save_image(tile, tmp_path / "noext")
    gray = np.zeros((4, 4, 1), np.uint8)
    images.save_image(gray, tmp_path / "g.jpg")
    with Image.open(tmp_path / "g.jpg") as im:
        assert im.mode == "L"


# ---------------------------------------------------------------------------------
# 5. A batch larger than a fixed-batch graph's profile
# ---------------------------------------------------------------------------------


def _fixed_batch_pipe(meta: ModelMeta, x0: np.ndarray, max_batch: int) -> Pipeline:
    graph = oo.toy(meta, x0, 0.0, path="/models/model.plan")
    graph.max_batch = max_batch  # a TensorRT profile's MAX
    return Pipeline.from_graphs([graph])


def test_batch_over_the_profile_is_refused(cond_meta: ModelMeta, x0: np.ndarray) -> None:
    pipe = _fixed_batch_pipe(cond_meta, x0, 2)
    with pytest.raises(ValueError) as e:
        pipe.generate(5, 4, batch_size=4)
    assert str(e.value) == (
        "batch_size=4 exceeds the largest batch model.plan accepts (2, its optimisation "
        "profile); pass batch_size <= 2, or rebuild the plan with a larger --batch "
        "MIN:OPT:MAX")
    # At the limit, and with no batch size given, the work is split into batches of 2.
    done: list[tuple[int, int]] = []
    at_limit = pipe.generate(5, 4, batch_size=2)
    default = pipe.generate(5, 4, progress=lambda d, t: done.append((d, t)))
    assert done == [(2, 5), (4, 5), (5, 5)]
    np.testing.assert_array_equal(at_limit, default)


def test_batch_over_the_profile_from_the_command_line(
        cond_meta: ModelMeta, x0: np.ndarray, model: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _fixed_batch_pipe(cond_meta, x0, 2)
    monkeypatch.setattr(Pipeline, "load", classmethod(lambda cls, *a, **k: pipe))
    code, out, err = fewstep(["sample", "--model", str(model), "--n", "6", "--batch-size",
                              "8", "--out", str(tmp_path / "g.png")], capfd)
    assert code == 2 and out == ""
    assert "error: batch_size=8 exceeds the largest batch model.plan accepts (2" in \
        one_error_line(err)
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------
# 6. The default --steps comes from the model
# ---------------------------------------------------------------------------------


def _steps_used(err: str) -> int:
    summary = next(ln for ln in err.splitlines() if " images, " in ln and " steps (" in ln)
    return int(summary.split(" images, ")[1].split(" steps")[0])


def test_default_steps_of_the_shipped_model(tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    try:
        shipped = default_model_path()
    except ArtifactError:
        pytest.skip("this build ships no default model")
    meta = Artifact.open(shipped).meta
    assert meta.distilled_steps == (4,)  # a 4-step student
    code, _, err = fewstep(["sample", "--backend", "ort-cpu", "--n", "2",
                            "--out", str(tmp_path / "g.png")], capfd)
    assert code == 0, err
    assert _steps_used(err) == 4 and "sampler path" in err


@pytest.mark.parametrize(("distilled", "samplers", "want", "path"), [
    ((2,), ((4, "trailing", 0.0, "uint8"),), 2, "step"),      # distilled steps win
    ((8, 2), (), 2, "step"),                                    # the last distilled count
    ((), ((8, "trailing", 0.0, "uint8"),), 8, "sampler"),      # else the sampler's steps
    ((), ((3, "leading", 0.0, "float"), (6, "trailing", 0.0, "float")), 6, "sampler"),
    ((), (), 4, "step"),                                        # else 4
])
def test_default_steps_from_the_metadata(distilled: tuple[int, ...],
                                         samplers: tuple[tuple[int, str, float, str], ...],
                                         want: int, path: str, tmp_path: Path, x0: np.ndarray,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    meta = oo.make_meta("epsilon", num_classes=3, distilled_steps=distilled,
                        distilled_spacing="trailing" if distilled else "")
    main = artifact(tmp_path / "m", meta, x0, samplers)
    code, _, err = fewstep(["sample", "--model", str(main), "--backend", "ort-cpu", "--n", "3",
                            "--out", str(tmp_path / "g.png")], capfd)
    assert code == 0, err
    assert _steps_used(err) == want and f"via the {path} path" in err
    # An explicit --steps still wins.
    code, _, err = fewstep(["sample", "--model", str(main), "--backend", "ort-cpu", "--n", "3",
                            "--steps", "5", "--out", str(tmp_path / "g.png")], capfd)
    assert code == 0 and _steps_used(err) == 5


def test_default_steps_prefers_a_sampler_for_the_asked_spacing_and_eta(
        cond_meta: ModelMeta) -> None:
    graphs = [{"kind": "denoiser"}, {"kind": "step"},
              {"kind": "sampler", "steps": 2, "spacing": "leading", "eta": 0.0},
              {"kind": "sampler", "steps": 8, "spacing": "trailing", "eta": 1.0},
              {"kind": "sampler", "steps": 6, "spacing": "trailing", "eta": 0.0}]
    assert sampling.default_steps(cond_meta, graphs, None, 0.0) == 6
    assert sampling.default_steps(cond_meta, graphs, None, 1.0) == 8
    assert sampling.default_steps(cond_meta, graphs, "leading", 0.0) == 2
    assert sampling.default_steps(cond_meta, graphs, "linspace", 0.0) == 2  # fewest
    assert sampling.default_steps(cond_meta, graphs[:2], None, 0.0) == 4


def test_help_explains_the_computed_defaults(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = fewstep(["sample", "--help"], capfd)
    text = " ".join(out.split())
    assert code == 0
    assert ("--steps STEPS DDIM steps (default: the step count the model was distilled for, "
            "else that of its fused sampler graph, else 4)") in text
    assert "(default: None)" not in text
    assert "at most 10000 (default: 16)" in text and "at most 64" in text
