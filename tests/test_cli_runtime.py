"""`fewstep sample` and `fewstep info`: exit codes, stdout/stderr, --json; runtime/jetson.py.

Most cases call the subcommand's ``main`` in-process (fast); a few run the installed
``fewstep`` console script to check what a user sees, tracebacks included.
"""

from __future__ import annotations

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

from fewstep.runtime import cli, cli_info, cli_sample, jetson
from fewstep.runtime.images import to_uint8_nhwc
from fewstep.runtime.meta import ModelMeta

_VENV_SCRIPT = Path(sys.executable).with_name("fewstep")  # the console script of this install
FEWSTEP = str(_VENV_SCRIPT) if _VENV_SCRIPT.is_file() else (shutil.which("fewstep") or "fewstep")


@pytest.fixture(scope="module")
def meta() -> ModelMeta:
    return oo.make_meta("v_prediction", num_classes=3, class_names=("mountains", "lake", "snow"),
                        train_config={"preset": "tiny", "lr": 0.001, "ignored": 1},
                        distilled_steps=(4,), distilled_spacing="trailing")


@pytest.fixture(scope="module")
def x0(meta: ModelMeta) -> np.ndarray:
    return oo.pixel_x0(meta)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, meta: ModelMeta, x0: np.ndarray) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    return oo.write_artifact(folder, meta, x0, samplers=((4, "trailing", 0.0, "uint8"),))


def run_main(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]
             ) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help, usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def grid_pixels(path: Path, n: int, size: int, scale: int, nrow: int) -> list[np.ndarray]:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    cell = size + 2
    tiles = []
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = (2 + r * cell) * scale, (2 + c * cell) * scale
        tiles.append(arr[y: y + size * scale: scale, x: x + size * scale: scale])
    return tiles


# ---------------------------------------------------------------------------------
# fewstep sample
# ---------------------------------------------------------------------------------


def test_sample_writes_the_grid_and_prints_only_its_path(
        model: Path, x0: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    code, stdout, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "5", "--steps", "4",
        "--nrow", "5", "--scale", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert stdout == f"{out}\n"
    assert "ort-cpu" in stderr and "sampler path" in stderr and "model.sampler-4.onnx" in stderr
    assert "5/5 images" in stderr
    tiles = grid_pixels(out, 5, 8, 2, 5)
    want = to_uint8_nhwc(x0[[0, 1, 2, 0, 1]].astype(np.float32))
    for tile, w in zip(tiles, want, strict=True):
        np.testing.assert_array_equal(tile, w)


def test_sample_labels_by_name_and_other_paths(model: Path, x0: np.ndarray, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.png"
    code, _, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "3", "--steps", "6",
        "--labels", "snow", "--eta", "1", "--spacing", "leading", "--seed", "5",
        "--nrow", "3", "--scale", "1", "--batch-size", "2", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "step path" in stderr and "model.step.onnx" in stderr
    assert "warning: model was distilled for 4 steps; 6 steps may look worse" in stderr
    want = to_uint8_nhwc(x0[[2, 2, 2]].astype(np.float32))
    for tile, w in zip(grid_pixels(out, 3, 8, 1, 3), want, strict=True):
        np.testing.assert_array_equal(tile, w)
    code, _, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "3", "--steps", "4",
        "--labels", "0", "lake", "2", "--out", str(out)], capsys)
    assert code == 0, stderr


def test_sample_inpainting_from_files(model: Path, x0: np.ndarray, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    init = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "inpaint.png"
    code, _, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "2", "--steps", "4",
        "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
        "--nrow", "2", "--scale", "1", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "step-blend path" in stderr
    for i, tile in enumerate(grid_pixels(out, 2, 8, 1, 2)):
        np.testing.assert_array_equal(tile[4:], init[4:])
        np.testing.assert_array_equal(tile[:4], to_uint8_nhwc(x0[[i]].astype(np.float32))[0][:4])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "2000"], "error: steps=2000 exceeds num_train_timesteps=1000 recorded in "
                              "model.onnx; pass steps <= 1000"),
        (["--eta", "1.5"], "error: eta=1.5 is outside [0, 1]"),
        (["--labels", "desert"], "error: label 'desert' is not a class of this model; use one "
                                 "of mountains, lake, snow"),
        (["--labels", "0", "1"], "error: 2 labels given for n=4 images"),
        (["--guidance", "2"], "error: guidance=2.0 needs a graph exported with --guidance"),
        (["--backend", "cuda"], "error: backend='cuda' is unknown; use one of auto, ort, "
                                "ort-cpu"),
        (["--mask", "m.png"], "error: --mask needs --init-image"),
        (["--strength", "0.5"], "error: --strength 0.5 needs --init-image"),
        (["--init-image", "missing.png"], "error: cannot read image 'missing.png'"),
        (["--n", "0"], "argument --n: 0 must be at least 1"),
        (["--spacing", "middle"], "argument --spacing: invalid choice: 'middle'"),
    ],
)
def test_sample_bad_input_exits_2_without_traceback(
        args: list[str], message: str, model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.png"
    code, stdout, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "4", *args, "--out", str(out)],
        capsys)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()


def test_sample_starts_quickly_on_ort_cuda(model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`fewstep sample` is one process for a few images: on ort-cuda (named, or what auto
    picks) its default --cudnn-search heuristic passes the quick-start CUDA EP options,
    and its default --graph auto the step graph first; exhaustive, and every other
    backend, pass none of the options, and --graph KIND passes that kind anywhere."""
    from fewstep.runtime.backends import ort_options
    from fewstep.runtime.pipeline import Pipeline

    seen: list[dict[str, Any]] = []
    real = Pipeline.load.__func__  # type: ignore[attr-defined]

    def load(cls: Any, path: Any = None, backend: str = "auto", **options: Any) -> Any:
        seen.append({"backend": backend, **options})
        return real(cls, path, "ort-cpu")  # this machine has no CUDA: run on the CPU

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    quick = ort_options.quick_start_options((1, 31, 1))
    assert quick == {"cudnn_conv_algo_search": "HEURISTIC", "fuse_conv_bias": "0"}
    assert ort_options.quick_start_options((1, 19, 0)) == {"cudnn_conv_algo_search": "HEURISTIC"}
    quick_step = {"cuda_options": cli_sample.quick_start_options_here(), "prefer": "step"}
    for extra, want in (([], quick_step),
                        (["--cudnn-search", "exhaustive"], {"prefer": "step"}),
                        (["--graph", "sampler"], {**quick_step, "prefer": "sampler"}),
                        (["--cudnn-search", "exhaustive", "--graph", "denoiser"],
                         {"prefer": "denoiser"})):
        code, _, err = run_main(cli_sample.main, [
            "--model", str(model), "--backend", "ort-cuda", "--n", "1", *extra,
            "--out", str(tmp_path / "a.png")], capsys)
        assert code == 0, err
        assert seen.pop() == {"backend": "ort-cuda", **want}
    monkeypatch.setattr(cli_sample, "_resolve", lambda backend, path: "ort-cuda")
    assert cli_sample.start_options("auto", model, "heuristic") == quick_step
    monkeypatch.setattr(cli_sample, "_resolve", lambda backend, path: "ort-cpu")
    assert cli_sample.start_options("auto", model, "heuristic") == {}
    assert cli_sample.start_options("auto", model, "heuristic", "step") == {"prefer": "step"}
    code, _, err = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "1", "--graph", "fused",
        "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and "--graph" in err and "Traceback" not in err
    code, _, err = run_main(cli_sample.main, [
        "--model", str(model), "--backend", "ort-cpu", "--n", "1", "--cudnn-search", "fast",
        "--out", str(tmp_path / "b.png")], capsys)
    assert code == 2 and "--cudnn-search" in err and "Traceback" not in err


def test_sample_checks_out_before_any_work(model: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fewstep.runtime import pipeline

    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(pipeline.Pipeline, "load", boom)
    code, _, stderr = run_main(cli_sample.main, [
        "--model", str(model), "--out", str(tmp_path / "missing" / "g.png")], capsys)
    assert code == 2
    assert "error: output folder" in stderr and "does not exist; create it or pass another " \
                                                "--out" in stderr
    code, _, stderr = run_main(cli_sample.main, ["--model", str(model), "--out", str(tmp_path)],
                               capsys)
    assert code == 2 and "is a directory; pass a file name" in stderr


def test_sample_on_a_broken_model_and_debug(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    argv = ["--model", str(bad), "--backend", "ort-cpu", "--out", str(tmp_path / "g.png")]
    code, _, stderr = run_main(cli_sample.main, argv, capsys)
    assert code == 2 and "is not an ONNX model" in stderr and "Traceback" not in stderr
    from fewstep.runtime.errors import ArtifactError

    with pytest.raises(ArtifactError):
        cli_sample.main([*argv, "--debug"])


def test_console_script_end_to_end(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    done = subprocess.run([FEWSTEP, "sample", "--model", str(model), "--backend", "ort-cpu",
                           "--n", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n" and out.is_file()
    bad = subprocess.run([FEWSTEP, "sample", "--model", str(model), "--steps", "0",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: steps=0 must be a whole number >= 1" in bad.stderr
    debug = subprocess.run([FEWSTEP, "sample", "--model", str(model), "--steps", "0",
                            "--out", str(out), "--debug"], capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "info" in out
    code, out, _ = run_main(cli_sample.main, ["--help"], capsys)
    assert code == 0
    assert "Generate images with an exported model" in out
    for flag in ("--init-image", "--batch-size", "--out", "--labels", "--guidance"):
        assert flag in out
    assert "(default: 4)" in out  # ArgumentDefaultsHelpFormatter
    assert "(default: the step count the model was distilled for" in " ".join(out.split())
    assert "(default: None)" not in out  # computed defaults are explained, not shown as None
    code, out, _ = run_main(cli_info.main, ["--help"], capsys)
    assert code == 0 and "--json" in out
    helped = subprocess.run([FEWSTEP, "sample", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--out" in helped.stdout


# ---------------------------------------------------------------------------------
# fewstep info
# ---------------------------------------------------------------------------------


def test_info_text(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(cli_info.main, [str(model)], capsys)
    assert code == 0, err
    for text in ("prediction   v_prediction", "linear, T=1000", "image        3x8x8",
                 "classes      3 (0=mountains, 1=lake, 2=snow)", "precision    fp32",
                 "distilled    4 steps (trailing)", "sha256:oracle", "preset=tiny",
                 "model.step.onnx", "step", "model.sampler-4.onnx", "steps=4 spacing=trailing",
                 "-> uint8", "ort-cpu       available", "ort-cuda", "onnxruntime  1."):
        assert text in out, text
    assert "ignored" not in out


def test_info_json(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(cli_info.main, [str(model), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["model"]["class_names"] == ["mountains", "lake", "snow"]
    assert info["model"]["train_config"] == {"preset": "tiny", "lr": 0.001}
    files = {g["file"]: g for g in info["graphs"]}
    assert set(files) == {"model.onnx", "model.step.onnx", "model.sampler-4.onnx"}
    assert files["model.sampler-4.onnx"]["output_format"] == "uint8"
    assert all(g["size_bytes"] > 0 for g in info["graphs"])
    assert info["backends"]["ort-cpu"] is None and info["backends"]["oracle"] is None
    assert "CPUExecutionProvider" in info["device"]["providers"]


def test_info_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x12\x34")
    code, out, err = run_main(cli_info.main, [str(bad)], capsys)
    assert code == 2 and "is not an ONNX model" in err and "Traceback" not in err and out == ""
    code, _, err = run_main(cli_info.main, [str(tmp_path / "none.onnx")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_main(cli_info.main, [str(tmp_path)], capsys)
    assert code == 2 and "is a folder, not a model file" in err and "does not exist" not in err


def test_info_default_model(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.runtime.errors import ArtifactError
    from fewstep.runtime.pipeline import default_model_path

    try:
        default_model_path()
    except ArtifactError:
        code, _, err = run_main(cli_info.main, [], capsys)
        assert code == 2 and "ships no default model" in err and "--model" in err
    else:
        code, out, _ = run_main(cli_info.main, [], capsys)
        assert code == 0 and "landscapes.onnx" in out


def test_info_on_jetson(model: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    board = jetson.JetsonInfo("NVIDIA Jetson Orin Nano Developer Kit", "36.4.3", "15W (0)",
                              "pinned to maximum (jetson_clocks on)")
    monkeypatch.setattr(jetson, "detect", lambda: board)
    code, out, _ = run_main(cli_info.main, [str(model)], capsys)
    assert code == 0
    assert "Jetson       NVIDIA Jetson Orin Nano Developer Kit, L4T 36.4.3" in out
    assert "power mode   15W (0)" in out and "jetson_clocks on" in out
    code, out, _ = run_main(cli_info.main, [str(model), "--json"], capsys)
    assert json.loads(out)["device"]["jetson"]["l4t_release"] == "36.4.3"


# ---------------------------------------------------------------------------------
# runtime/jetson.py with fake boards
# ---------------------------------------------------------------------------------

ORIN_RELEASE = ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: "
                "aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"
                "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
NVPMODEL = "NV Power Mode: MAXN_SUPER\n2\n"
CLOCKS_ON = ("SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit\n"
             "cpu0: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 "
             "CurrentFreq=1728000 IdleStates: WFI=0 c7=0\n"
             "GPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=1020000000\n"
             "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1\n")
CLOCKS_OFF = CLOCKS_ON.replace("MinFreq=1728000", "MinFreq=115200")


def fake_board(tmp_path: Path, release: str | None = ORIN_RELEASE,
               model: bytes | None = b"NVIDIA Jetson Orin Nano Developer Kit\x00"
               ) -> tuple[Path, Path]:
    rel, dt = tmp_path / "nv_tegra_release", tmp_path / "model"
    if release is not None:
        rel.write_text(release)
    if model is not None:
        dt.write_bytes(model)
    return rel, dt


def test_detect_a_jetson(tmp_path: Path) -> None:
    rel, dt = fake_board(tmp_path)
    calls: list[list[str]] = []

    def run(argv: Any) -> str | None:
        calls.append(list(argv))
        return {"nvpmodel": NVPMODEL, "jetson_clocks": CLOCKS_ON}[argv[0]]

    info = jetson.detect(rel, dt, run)
    assert info == jetson.JetsonInfo("NVIDIA Jetson Orin Nano Developer Kit", "36.4.3",
                                     "MAXN_SUPER (2)", "pinned to maximum (jetson_clocks on)")
    assert calls == [["nvpmodel", "-q"], ["jetson_clocks", "--show"]]
    info = jetson.detect(rel, dt, lambda argv: CLOCKS_OFF if argv[0] == "jetson_clocks" else None)
    assert info is not None and info.power_mode is None
    assert info.clocks == "dynamic frequency scaling (jetson_clocks off)"
    assert jetson.is_jetson(rel, dt)


def test_detect_never_fails(tmp_path: Path) -> None:
    for sub in ("none", "garbage", "tree"):
        (tmp_path / sub).mkdir()
    rel, dt = fake_board(tmp_path / "none", release=None, model=None)
    assert jetson.detect(rel, dt, lambda argv: "x") is None  # not a Jetson
    assert not jetson.is_jetson(rel, dt)

    def broken(argv: Any) -> str | None:
        raise OSError("nvpmodel crashed")

    rel, dt = fake_board(tmp_path / "garbage", release="garbage", model=None)
    info = jetson.detect(rel, dt, broken)
    assert info == jetson.JetsonInfo("NVIDIA Jetson (unknown board)", "", None, None)
    # a device tree that says Jetson is enough, without the release file
    rel, dt = fake_board(tmp_path / "tree", release=None, model=b"NVIDIA Jetson AGX Xavier\x00")
    info = jetson.detect(rel, dt, lambda argv: None)
    assert info is not None and info.model == "NVIDIA Jetson AGX Xavier" and info.l4t_release == ""


def test_parsers() -> None:
    assert jetson.parse_l4t_release("# R35 (release), REVISION: 5.0, GCID: 1") == "35.5.0"
    assert jetson.parse_l4t_release("# R32 (release)") == "32"
    assert jetson.parse_l4t_release("nothing") == ""
    assert jetson.parse_power_mode("NV Power Mode: 15W\n0\n") == "15W (0)"
    assert jetson.parse_power_mode("NV Power Mode: MAXN") == "MAXN"
    assert jetson.parse_power_mode("nvpmodel: error") is None
    assert jetson.parse_clocks("no clocks here") is None


def test_run_command_missing_tool_and_timeout() -> None:
    assert jetson.run_command(["fewstep-no-such-tool-xyz"]) is None
    assert jetson.run_command([sys.executable, "-c", "print('hi')"]) == "hi\n"
    assert jetson.run_command([sys.executable, "-c", "import sys; sys.exit(3)"]) is None
    assert jetson.run_command([sys.executable, "-c", "import time; time.sleep(5)"],
                              timeout=0.2) is None


# ---------------------------------------------------------------------------------
# The CUDA context's head start (runtime/cuda_start.py)
# ---------------------------------------------------------------------------------


def test_sample_starts_the_cuda_context_only_for_a_gpu_backend(
        model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.runtime import cuda_start

    started: list[int] = []
    monkeypatch.setattr(cuda_start, "start_context", lambda device=0: started.append(device))
    monkeypatch.setattr(cuda_start, "ort_cuda_installed", lambda: False)
    argv = ["sample", "--model", str(model), "--n", "1", "--out", str(tmp_path / "a.png")]
    for backend, wanted in ((["--backend", "ort-cpu"], 0), ([], 0),  # auto, no CUDA provider
                            (["--backend=oracle"], 0), (["--backend", "ort-cuda"], 1),
                            (["--backend", "ort-cpu", "--backend", "tensorrt"], 1)):
        started.clear()
        cli.main([*argv, *backend])
        capsys.readouterr()  # ort-cuda and tensorrt fail here (no GPU): only the start counts
        assert len(started) == wanted, backend
    monkeypatch.setattr(cuda_start, "ort_cuda_installed", lambda: True)
    started.clear()
    code, _, err = run_main(cli.main, [*argv, "--backend", "ort-cpu"], capsys)
    assert code == 0, err
    assert not started
    cli.main([*argv])  # auto with onnxruntime's CUDA provider installed
    capsys.readouterr()
    assert started == [0]
    started.clear()
    run_main(cli.main, ["sample", "--help"], capsys)
    assert not started


def test_the_cuda_head_start_is_quiet_where_there_is_no_driver(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import threading

    from fewstep.runtime import cuda_start

    assert cuda_start._retain_primary(0, str(tmp_path / "libcuda.so.1")) is False
    monkeypatch.setattr(cuda_start, "LIBCUDA", str(tmp_path / "libcuda.so.1"))
    raised: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    thread = cuda_start.start_context()
    thread.join(10)
    assert not raised
    assert not thread.is_alive() and thread.daemon and thread.name == cuda_start.THREAD_NAME
    # the CUDA provider is looked up on disk, without importing onnxruntime
    pkg = tmp_path / "site" / "onnxruntime"
    (pkg / "capi").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('imported')\n")
    spec = importlib.util.spec_from_file_location(
        "onnxruntime", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert cuda_start.ort_cuda_installed() is False
    (pkg / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    assert cuda_start.ort_cuda_installed() is True
    assert cuda_start.wants_cuda("auto", "model.onnx") is True
    assert cuda_start.wants_cuda("ort-cpu", "model.onnx") is False
    assert cuda_start.wants_cuda("auto", "model.plan") is True
    assert cuda_start.wants_cuda("ort", "model.plan") is False


def test_sample_graph_picks_the_path(model: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for graph, path in (("step", "step"), ("denoiser", "denoiser"), ("auto", "sampler")):
        code, _, err = run_main(cli_sample.main, [
            "--model", str(model), "--backend", "ort-cpu", "--n", "1", "--steps", "4",
            "--graph", graph, "--out", str(tmp_path / f"{graph}.png")], capsys)
        assert code == 0, err
        assert f"via the {path} path" in err
