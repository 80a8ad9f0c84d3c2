"""Bring your own model: export_module for any nn.Module, diffusers folders from the CLI,
generate with named conditioning, latents and sample output, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from fewstep.export.api import Conditioning, export_module  # noqa: E402
from fewstep.runtime import cli  # noqa: E402
from fewstep.runtime.errors import ArtifactError  # noqa: E402
from fewstep.runtime.meta import ModelMeta  # noqa: E402
from fewstep.runtime.pipeline import Pipeline  # noqa: E402
from fewstep.train import reference  # noqa: E402

POLICY_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 100,
    "beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "prediction_type": "epsilon",
    "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading",
}
HORIZON, ACTIONS, OBS = 16, 2, 36


class SequenceNet(nn.Module):
    """A small denoiser of (T, D) sequences with a FiLM-like observation conditioning."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(ACTIONS, 32)
        self.film = nn.Linear(OBS + 1, 64)
        self.out = nn.Linear(32, ACTIONS)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                global_cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(torch.cat([global_cond, (t / 100.0)[:, None]], 1)).chunk(2, 1)
        h = torch.tanh(self.inp(x) * (1 + scale[:, None]) + bias[:, None])
        out: torch.Tensor = self.out(h)
        return out


def export_policy(folder: Path, **kw: object) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = SequenceNet().eval()
    out = folder / "policy.onnx"
    args: dict = dict(sample_shape=(HORIZON, ACTIONS), schedule=POLICY_SCHEDULER,
                      cond=[Conditioning("global_cond", (OBS,), null=0.0)],
                      fused=("step", "sampler"), steps=(8,), guidance=True)
    args.update(kw)
    export_module(net, out, **args)  # type: ignore[arg-type]
    return net, out


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    return export_policy(tmp_path_factory.mktemp("policy"))


def obs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, OBS)).astype(np.float32)


def test_sequence_model_exports_with_its_schedule_and_conditioning(
        policy: tuple[nn.Module, Path]) -> None:
    _, path = policy
    names = sorted(p.name for p in path.parent.iterdir())
    assert {"policy.onnx", "policy.step.onnx", "policy.sampler-8.onnx"} <= set(names)
    pipe = Pipeline.load(path)
    meta = pipe.meta
    assert meta.sample_shape == (HORIZON, ACTIONS) and not meta.images
    assert [(c.name, c.dtype, c.shape, c.null) for c in meta.cond] == [
        ("global_cond", "float32", (OBS,), 0.0)]
    assert meta.schedule.num_train_timesteps == 100 and meta.schedule.timestep_spacing == "leading"
    assert meta.schedule.beta_schedule == "squaredcos_cap_v2"
    assert meta.schedule.clip_sample_range == 1.0


@pytest.mark.parametrize("steps, path", [(8, "sampler"), (5, "step")])
def test_every_graph_matches_the_module_in_fewsteps_loop(policy: tuple[nn.Module, Path],
                                                         steps: int, path: str) -> None:
    net, onnx_path = policy
    pipe = Pipeline.load(onnx_path)
    o = obs(3)
    y = pipe.generate(3, steps, seed=4, cond={"global_cond": o})
    assert pipe.last_path == path and y.shape == (3, HORIZON, ACTIONS) and y.dtype == np.float32
    from fewstep.export.graphs import Adapted

    model = Adapted(net, lambda x, t, c: net(x, t, **c))
    ref = reference.sample(model, pipe.meta, 3, steps, seed=4, spacing="leading",
                           cond={"global_cond": o})
    np.testing.assert_allclose(y, ref, atol=1e-4)
    guided = pipe.generate(3, steps, seed=4, cond={"global_cond": o}, guidance=3.0)
    ref_g = reference.sample(model, pipe.meta, 3, steps, seed=4, spacing="leading",
                             cond={"global_cond": o}, guidance=3.0)
    np.testing.assert_allclose(guided, ref_g, atol=1e-4)
    assert np.abs(guided - y).max() > 1e-3  # guidance changes the result


def test_latents_replace_the_seeds_noise(policy: tuple[nn.Module, Path]) -> None:
    pipe = Pipeline.load(policy[1])
    latents = np.random.default_rng(9).standard_normal((2, HORIZON, ACTIONS)).astype(np.float32)
    o = obs(1)[0]  # one value for every sample
    a = pipe.generate(2, 8, seed=0, cond={"global_cond": o}, latents=latents)
    b = pipe.generate(2, 8, seed=123, cond={"global_cond": o}, latents=latents)
    c = pipe.generate(2, 8, seed=0, cond={"global_cond": o})
    np.testing.assert_array_equal(a, b)  # eta = 0: the seed plays no part
    assert np.abs(a - c).max() > 1e-3
    net = policy[0]
    from fewstep.export.graphs import Adapted

    ref = reference.sample(Adapted(net, lambda x, t, k: net(x, t, **k)), pipe.meta, 2, 8,
                           spacing="leading", cond={"global_cond": np.stack([o, o])},
                           latents=latents)
    np.testing.assert_allclose(a, ref, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "cond['global_cond'] is missing"),
        (dict(cond={"global_cond": obs(2), "other": obs(2)}), "unknown input 'other'"),
        (dict(cond={"global_cond": obs(2)[:, :5]}), "has shape (2, 5); pass (36,)"),
        (dict(cond={"global_cond": obs(2).astype(np.complex64)}), "is complex64; pass float32"),
        (dict(cond={"global_cond": np.full((2, OBS), np.nan, np.float32)}), "holds NaN"),
        (dict(cond={"global_cond": obs(2)}, latents=np.zeros((2, 16), np.float32)),
         "latents have shape (2, 16); pass (2, 16, 2)"),
        (dict(cond={"global_cond": obs(2)},
              latents=np.full((2, HORIZON, ACTIONS), np.nan, np.float32)), "latents hold NaN"),
        (dict(cond={"global_cond": obs(2)}, latents=np.zeros((2, HORIZON, ACTIONS), np.int64)),
         "latents are int64"),
        (dict(cond={"global_cond": obs(2)}, output="images"), "output='images' needs an image"),
        (dict(cond={"global_cond": obs(2)}, output="pil"), "output='pil' is not supported"),
        (dict(cond={"global_cond": obs(2)}, labels=[0, 1]), "this model is unconditional"),
    ],
)
def test_bad_conditioning_and_latents_are_one_line(policy: tuple[nn.Module, Path],
                                                   kwargs: dict, message: str) -> None:
    pipe = Pipeline.load(policy[1])
    with pytest.raises(ValueError) as e:
        pipe.generate(2, 8, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_info_and_sample_npy_for_a_sequence_model(policy: tuple[nn.Module, Path], tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    path = policy[1]
    assert cli.main(["info", str(path)]) == 0
    out = capfd.readouterr().out
    assert "sample       (16, 2) float32 arrays" in out
    assert "cond         global_cond: float32 (36), null 0" in out
    assert "spacing      leading (default)" in out
    np.save(tmp_path / "obs.npy", obs(3))
    code = cli.main(["sample", "--model", str(path), "--n", "3", "--cond",
                     f"global_cond={tmp_path / 'obs.npy'}", "--out", str(tmp_path / "s.npy")])
    assert code == 0, capfd.readouterr().err
    got = np.load(tmp_path / "s.npy")
    pipe = Pipeline.load(path)
    np.testing.assert_array_equal(got, pipe.generate(3, cond={"global_cond": obs(3)}))
    capfd.readouterr()
    bad = [
        (["--cond", f"global_cond={tmp_path / 'missing.npy'}"], "cannot read"),
        (["--cond", "global_cond"], "is not NAME=FILE.npy"),
        ([], "cond['global_cond'] is missing"),
    ]
    for extra, message in bad:
        code = cli.main(["sample", "--model", str(path), "--n", "3", *extra,
                         "--out", str(tmp_path / "bad.npy")])
        err = capfd.readouterr().err
        assert code == 2 and message in err and not (tmp_path / "bad.npy").exists(), err
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code = cli.main(["sample", "--model", str(path), "--n", "3", "--cond",
                     f"global_cond={pickled}", "--out", str(tmp_path / "bad.npy")])
    assert code == 2 and "is not a plain .npy array" in capfd.readouterr().err
    code = cli.main(["sample", "--model", str(path), "--n", "3", "--cond",
                     f"global_cond={tmp_path / 'obs.npy'}", "--out", str(tmp_path / "s.png")])
    assert code == 2 and "write a .npy file" in capfd.readouterr().err


class Fails(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class WrongShape(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # a Python branch on a tensor value: not traceable
            return x * self.w
        return -x * self.w


@pytest.mark.parametrize("module, message", [
    (Fails(), "the module failed on fewstep's inputs (x (2, 4, 3) float32, t (2,) float32): "
              "RuntimeError: boom; adapt its signature with call="),
    (WrongShape(), "the module's output has shape (2, 1, 3), not its input's (2, 4, 3)"),
    (Branches(), "torch.onnx.export could not trace the module"),
])
def test_bad_modules_are_one_line_and_write_nothing(tmp_path: Path, module: nn.Module,
                                                    message: str) -> None:
    with pytest.raises(ValueError) as e:
        export_module(module, tmp_path / "m.onnx", sample_shape=(4, 3), fused=())
    assert message in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_call_adapts_another_signature_and_the_fused_sampler_feeds_t_per_sample(
        tmp_path: Path) -> None:
    class PerSample(nn.Module):
        """Combines t with per-sample features: t must arrive as (B,), never (1,)."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> dict:
            feat = sample.mean(dim=1) * timestep[:, None] / 1000.0  # (B, 3)
            return {"sample": self.lin(sample) + feat[:, None]}

    torch.manual_seed(0)
    net = PerSample().eval()
    out = tmp_path / "m.onnx"
    export_module(net, out, sample_shape=(4, 3), call=lambda x, t, c: net(x, t)["sample"],
                  prediction_type="v_prediction", fused=("sampler",), steps=(3,))
    pipe = Pipeline.load(out)
    y = pipe.generate(5, 3, seed=1)
    assert pipe.last_path == "sampler" and y.shape == (5, 4, 3)
    assert pipe.meta.prediction_type == "v_prediction"


# -- diffusers folders from the CLI ---------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def tiny_unet2d(classes: int | None = None) -> object:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        num_class_embeds=classes).eval()


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm") / "pipe"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        clip_sample=True, steps_offset=1,
                                        timestep_spacing="leading")
    diffusers.DDPMPipeline(unet=tiny_unet2d(classes=3), scheduler=scheduler).save_pretrained(
        folder)
    return folder


def test_diffusers_pipeline_folder_exports_and_samples(pipeline_folder: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(pipeline_folder), "--out", str(out)]) == 0
    err = capfd.readouterr().err
    assert "parity gate passed" in err
    meta = Pipeline.load(out).meta
    assert meta.sample_shape == (3, 8, 8) and meta.images and meta.num_classes == 3
    assert meta.null_label is None and meta.schedule.steps_offset == 1
    assert meta.schedule.timestep_spacing == "leading"
    assert cli.main(["sample", "--model", str(out), "--n", "2", "--steps", "10", "--labels", "2",
                     "--out", str(tmp_path / "g.png")]) == 0
    assert cli.main(["sample", "--model", str(out), "--n", "2", "--guidance", "2",
                     "--out", str(tmp_path / "h.png")]) == 2
    assert "records no null conditioning" in capfd.readouterr().err


def _edit_scheduler(folder: Path, tmp_path: Path, **changes: object) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return copy


def _add_component(folder: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index[name] = ["transformers", "CLIPTextModel"]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def _pickled_weights(folder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    return copy


@pytest.mark.parametrize("make, message", [
    (lambda f, t: t, "is not a diffusers folder"),
    (lambda f, t: _add_component(f, t, "text_encoder"), "it needs text embeddings"),
    (lambda f, t: _add_component(f, t, "vae"), "latent space"),
    (_pickled_weights, "has no .safetensors weights"),
    (lambda f, t: _edit_scheduler(f, t, thresholding=True), "thresholding"),
    (lambda f, t: _edit_scheduler(f, t, _class_name="EulerDiscreteScheduler"),
     "EulerDiscreteScheduler"),
    (lambda f, t: f / "unet", "model folder without a scheduler"),
])
def test_bad_diffusers_folders_exit_2_and_write_nothing(
        pipeline_folder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        make: object, message: str) -> None:
    source = make(pipeline_folder, tmp_path)  # type: ignore[operator]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = cli.main(["export", str(source), "--out", str(out_dir / "m.onnx")])
    err = capfd.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(out_dir.iterdir()) == []


def test_old_artifacts_still_load(tmp_path: Path) -> None:
    from fewstep.runtime.pipeline import default_model_path

    pipe = Pipeline.load(default_model_path())
    assert isinstance(pipe.meta, ModelMeta) and pipe.meta.images
    assert pipe.generate(1).shape == (1, 32, 32, 3)


def test_fp16_export_passes_its_gate_and_leaves_the_module_as_it_was(tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in SequenceNet().state_dict().items()}
    net, out = export_policy(tmp_path, precision="fp16", fused=("sampler",), guidance=False)
    after = net.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v)
               for k, v in before.items())
    pipe = Pipeline.load(out)
    assert pipe.meta.graph.precision == "fp16"
    assert pipe.generate(2, 8, cond={"global_cond": obs(2)}).shape == (2, HORIZON, ACTIONS)


class Float32Embedding(SequenceNet):
    """Runs in float32; cast to fp16 it feeds a float32 tensor it made into fp16 weights."""

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                global_cond: torch.Tensor) -> torch.Tensor:
        emb = torch.cat([global_cond.float(), (t.float() / 100.0)[:, None]], 1)
        scale, bias = self.film(emb).chunk(2, 1)
        h = torch.tanh(self.inp(x) * (1 + scale[:, None]) + bias[:, None])
        out: torch.Tensor = self.out(h)
        return out


def test_a_module_that_fails_only_in_fp16_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"runs in float32 but fails in float16 .*"
                       r"follow x's dtype") as info:
        export_module(Float32Embedding().eval(), out, sample_shape=(HORIZON, ACTIONS),
                      schedule=POLICY_SCHEDULER, cond=[Conditioning("global_cond", (OBS,))],
                      precision="fp16", fused=())
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_bench_times_a_sequence_model(policy: tuple[nn.Module, Path], tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = cli.main(["bench", "--model", str(policy[1]), "--quick", "--steps", "8",
                     "--batch", "2", "--out", str(out)])
    err = capfd.readouterr().err
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    timed = {r.get("name") for r in rows if r.get("p50_ms") is not None}
    assert {"fewstep ort-cpu sampler fp32", "fewstep ort-cpu step fp32",
            "ort-steps cpu fp32"} <= timed, timed


def test_bench_torch_baselines_from_the_module(policy: tuple[nn.Module, Path],
                                               tmp_path: Path) -> None:
    """From Python: the module itself as the baselines' source, with its DDIM scheduler:
    PyTorch's loop and diffusers' loop time the same model and agree with the reference."""
    from fewstep.benchmarks import cli as bench
    from fewstep.benchmarks.torch_source import TorchSource
    from fewstep.runtime.artifact import Artifact

    net, path = policy
    meta = Artifact.open(path).meta
    src = TorchSource.from_module(net, meta, scheduler=POLICY_SCHEDULER, name="SequenceNet")
    assert src.kind == "module" and src.scheduler is not None
    args = bench.build_parser("fewstep bench").parse_args(
        ["--model", str(path), "--quick", "--steps", "4", "--batch", "2", "--graphs", "step",
         "--baselines", "torch-eager", "diffusers-eager", "diffusers-compile"])
    record, rows = bench.run(bench.config_from_args(args), tmp_path / "b", source=src,
                             plots=False)
    assert record["source"]["kind"] == "module"
    by_name = {r["name"]: r for r in rows}
    for name in ("torch-eager fp32", "diffusers-eager fp32", "fewstep ort-cpu step fp32"):
        row = by_name[name]
        assert row["p50_ms"] is not None, row
        assert row["psnr_db"] is not None and row["psnr_db"] >= 40, row
    compiled = by_name["diffusers-compile reduce-overhead fp32"]
    assert compiled["status"] == "unavailable" and "CUDA" in compiled["reason"]
    # Another module's weights are refused before anything is timed.
    torch.manual_seed(5)
    with pytest.raises(ArtifactError, match="not the module this artifact"):
        TorchSource.from_module(SequenceNet(), meta)


def test_a_copy_of_an_adapted_module_runs_its_own_weights() -> None:
    """The benchmarks copy a source model per device and precision: the copy's call must
    run the copied module (a lambda over the original would run the original)."""
    import copy

    from fewstep.export.graphs import Adapted

    torch.manual_seed(0)
    net = SequenceNet().eval()
    model = Adapted(net, lambda x, t, c: net(x, t, c["global_cond"]))
    twin = copy.deepcopy(model).double()
    assert twin.module is not net and next(net.parameters()).dtype == torch.float32
    x, t = torch.randn(2, HORIZON, ACTIONS), torch.tensor([3.0, 50.0])
    cond = {"global_cond": torch.from_numpy(obs(2))}
    out = twin(x.double(), t.double(), {"global_cond": cond["global_cond"].double()})
    assert out.dtype == torch.float64  # ran the float64 copy, not the float32 original
    torch.testing.assert_close(out.float(), model(x, t, cond), atol=1e-5, rtol=1e-5)
