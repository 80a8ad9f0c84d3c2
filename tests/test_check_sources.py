"""fewstep check against every kind of export source: a diffusers folder (pipeline or
model folder + --scheduler-config), and the one-line errors for a mismatched source."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")

from fewstep.runtime import cli  # noqa: E402


def tiny_unet(seed: int) -> object:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DDIM pipeline folder and its export (denoiser + step graph, no gate at export)."""
    folder = tmp_path_factory.mktemp("check_sources")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        clip_sample=True, timestep_spacing="leading")
    diffusers.DDIMPipeline(unet=tiny_unet(0), scheduler=scheduler).save_pretrained(
        folder / "pipe")
    out = folder / "m.onnx"
    assert cli.main(["export", str(folder / "pipe"), "--out", str(out), "--fused", "step",
                     "--no-check"]) == 0
    return folder / "pipe", out


def test_check_against_the_diffusers_folder_it_came_from(
        exported: tuple[Path, Path], capfd: pytest.CaptureFixture[str]) -> None:
    pipe, out = exported
    capfd.readouterr()
    assert cli.main(["check", str(out), "--against", str(pipe), "--providers", "cpu",
                     "--n", "2", "--steps", "3"]) == 0
    captured = capfd.readouterr()
    assert "m.step.onnx" in captured.out and "final images" in captured.out
    assert "parity gate passed" in captured.err
    # The model folder alone, with the scheduler config beside it given explicitly.
    assert cli.main(["check", str(out), "--against", str(pipe / "unet"), "--scheduler-config",
                     str(pipe / "scheduler" / "scheduler_config.json"), "--providers", "cpu",
                     "--n", "2", "--steps", "3"]) == 0


def test_check_against_another_source_is_one_line(
        exported: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pipe, out = exported
    other = tmp_path / "other"
    diffusers.DDIMPipeline(unet=tiny_unet(1),
                           scheduler=diffusers.DDIMScheduler.from_pretrained(
                               pipe / "scheduler")).save_pretrained(other)
    cases = [
        (["--against", str(other)], "was exported from another checkpoint"),
        (["--against", str(pipe / "unet")], "--scheduler-config scheduler_config.json"),
        (["--against", str(tmp_path / "nope.pt"), "--scheduler-config",
          str(pipe / "scheduler" / "scheduler_config.json")],
         "--scheduler-config applies to diffusers folders"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((["--against", str(tmp_path / "empty")], "is not a diffusers folder"))
    for args, message in cases:
        capfd.readouterr()
        assert cli.main(["check", str(out), *args, "--providers", "cpu"]) == 2, args
        err = capfd.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)


def test_bench_from_the_diffusers_folder(exported: tuple[Path, Path], tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    """`fewstep bench --source FOLDER`: PyTorch's loop and diffusers' own loop (its
    DDIMScheduler from the folder) on the folder's weights, beside fewstep's graphs, all
    against the fp32 reference; another folder is one line, exit 2."""
    import json

    pipe, out = exported
    code = cli.main(["bench", "--model", str(out), "--source", str(pipe), "--quick",
                     "--steps", "3", "--batch", "2", "--graphs", "denoiser", "step",
                     "--baselines", "torch-eager", "diffusers-eager",
                     "--out", str(tmp_path / "b")])
    err = capfd.readouterr().err
    assert code == 0, err
    lines = (tmp_path / "b" / "results.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert record["source"] == {"kind": "diffusers", "path": str(pipe),
                                "scheduler": "DDIMScheduler"}
    rows = {r["name"]: r for r in map(json.loads, lines[1:]) if r.get("record") == "result"}
    for name in ("torch-eager fp32", "diffusers-eager fp32", "fewstep ort-cpu step fp32"):
        assert rows[name]["p50_ms"] is not None, rows[name]
        assert rows[name]["psnr_db"] >= 40, rows[name]
    other = tmp_path / "other"
    diffusers.DDIMPipeline(unet=tiny_unet(1), scheduler=diffusers.DDIMScheduler.from_pretrained(
        pipe / "scheduler")).save_pretrained(other)
    code = cli.main(["bench", "--model", str(out), "--source", str(other), "--quick",
                     "--out", str(tmp_path / "c")])
    err = capfd.readouterr().err
    assert code == 2 and "is not the source of m.onnx" in err and len(err.splitlines()) == 1
