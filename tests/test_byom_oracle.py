"""Imported models against their own library's sampler: fewstep's runtime, from the same
``latents``, matches diffusers' DDIM loop (``scheduler.set_timesteps``, the model,
``scheduler.step(...).prev_sample``) at PSNR >= 40 dB on the final samples (fp32, CPU),
through the denoiser graph and through the fused sampler graph. Weights are random with
fixed seeds (none can be downloaded here).

Tracing a UNet2DModel's fused N-step sampler takes minutes on a 2-core CPU (the ONNX
exporter's rewriter passes dominate), so by default the sampler graph is exported and
compared for the 1-D models only; ``FEWSTEP_FULL_ORACLE=1`` runs every case through
both graphs."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
diffusers = pytest.importorskip("diffusers")

from torch import nn  # noqa: E402

from fewstep.export.api import Conditioning, export_module  # noqa: E402
from fewstep.runtime import backends  # noqa: E402
from fewstep.runtime.pipeline import Pipeline  # noqa: E402

MIN_PSNR = 40.0
FULL = os.environ.get("FEWSTEP_FULL_ORACLE") == "1"
QUICK_SAMPLERS = ("unet1d", "policy")


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    peak = float(ref.max() - ref.min())
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def diffusers_loop(model_fn: Callable[..., Any], config: dict[str, Any], latents: np.ndarray,
                   steps: int, cond: dict[str, Any] | None = None) -> np.ndarray:
    """diffusers' own DDIM loop, as DDIMPipeline runs it (eta 0, float32)."""
    scheduler = diffusers.DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents.copy())
    extra = {k: torch.from_numpy(np.asarray(v)) for k, v in (cond or {}).items()}
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model_fn(x, t.expand(x.shape[0]), **extra)
            x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return np.asarray(x.numpy())


def unet2d(size: int, classes: int | None = None, seed: int = 0,
           attention: bool = True) -> Any:
    torch.manual_seed(seed)
    attn = "Attn" if attention else ""
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", f"{attn}DownBlock2D"),
        up_block_types=(f"{attn}UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        num_class_embeds=classes).eval()


def unet1d(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.UNet1DModel(
        sample_size=16, in_channels=2, out_channels=2, block_out_channels=(16, 32),
        down_block_types=("DownResnetBlock1D", "DownResnetBlock1D"),
        up_block_types=("UpResnetBlock1D",), mid_block_type="MidResTemporalBlock1D",
        out_block_type="OutConv1DBlock", act_fn="mish", use_timestep_embedding=True,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        norm_num_groups=8, layers_per_block=1, downsample_each_block=False).eval()


# -- a diffusion policy: the 1-D conditional UNet of Diffusion Policy (Chi et al. 2023) -------

def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                      * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class FiLMBlock(nn.Module):
    """Two Conv1d-GroupNorm-Mish layers; FiLM (per-channel scale and bias) from the
    conditioning between them; a residual connection."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(cin, cout, 5, padding=2), nn.GroupNorm(8, cout),
                                   nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(cout, cout, 5, padding=2), nn.GroupNorm(8, cout),
                                   nn.Mish())
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.res = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).chunk(2, dim=-1)
        h = self.conv1(x) * scale[..., None] + bias[..., None]
        out: torch.Tensor = self.conv2(h) + self.res(x)
        return out


class ConditionalUnet1D(nn.Module):
    """forward(sample (B, T, D), timestep (B,), global_cond (B, G)) -> (B, T, D)."""

    def __init__(self, action_dim: int = 2, obs_dim: int = 36, dims: tuple[int, int] = (32, 64),
                 tdim: int = 32) -> None:
        super().__init__()
        self.tdim = tdim
        self.time_mlp = nn.Sequential(nn.Linear(tdim, 4 * tdim), nn.Mish(),
                                      nn.Linear(4 * tdim, tdim))
        c, (d1, d2) = tdim + obs_dim, dims
        self.down1 = nn.ModuleList([FiLMBlock(action_dim, d1, c), FiLMBlock(d1, d1, c)])
        self.downsample = nn.Conv1d(d1, d1, 3, stride=2, padding=1)
        self.down2 = nn.ModuleList([FiLMBlock(d1, d2, c), FiLMBlock(d2, d2, c)])
        self.mid = FiLMBlock(d2, d2, c)
        self.up2 = nn.ModuleList([FiLMBlock(2 * d2, d1, c), FiLMBlock(d1, d1, c)])
        self.upsample = nn.ConvTranspose1d(d1, d1, 4, stride=2, padding=1)
        self.up1 = nn.ModuleList([FiLMBlock(2 * d1, d1, c), FiLMBlock(d1, d1, c)])
        self.final = nn.Sequential(nn.Conv1d(d1, d1, 5, padding=2), nn.Mish(),
                                   nn.Conv1d(d1, action_dim, 1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                global_cond: torch.Tensor) -> torch.Tensor:
        x = sample.transpose(1, 2)  # (B, D, T)
        emb = sinusoidal(timestep, self.tdim).to(sample.dtype)  # fp16 exports too
        cond = torch.cat([self.time_mlp(emb), global_cond], -1)
        for block in self.down1:
            x = block(x, cond)
        skip1 = x
        x = self.downsample(x)
        for block in self.down2:
            x = block(x, cond)
        skip2 = x
        x = self.mid(x, cond)
        x = torch.cat([x, skip2], 1)
        for block in self.up2:
            x = block(x, cond)
        x = torch.cat([self.upsample(x), skip1], 1)
        for block in self.up1:
            x = block(x, cond)
        out: torch.Tensor = self.final(x).transpose(1, 2)
        return out


# -- the cases -------------------------------------------------------------------------------

class Case:
    def __init__(self, name: str, module: Any, sample_shape: tuple[int, ...],
                 config: dict[str, Any], steps: int, call: Callable[..., Any],
                 reference: Callable[..., Any], cond: list[Conditioning] | None = None,
                 make_cond: Callable[[int], dict[str, np.ndarray]] | None = None) -> None:
        self.name, self.module, self.sample_shape = name, module, sample_shape
        self.config, self.steps, self.call, self.reference = config, steps, call, reference
        self.cond, self.make_cond = cond or [], make_cond or (lambda n: {})


def ddim_config(**changes: Any) -> dict[str, Any]:
    return {"_class_name": "DDIMScheduler", **changes}


def _cases() -> dict[str, Callable[[], Case]]:
    def epsilon_leading() -> Case:
        m = unet2d(8, attention=False)  # 10 steps: the fewest nodes to trace
        return Case("epsilon-leading", m, (3, 8, 8),
                    ddim_config(prediction_type="epsilon", timestep_spacing="leading",
                                clip_sample=True, steps_offset=1), 10,
                    lambda x, t, c: m(x, t).sample, lambda x, t: m(x, t).sample)

    def v_trailing() -> Case:
        m = unet2d(8, seed=1)
        return Case("v-trailing", m, (3, 8, 8),
                    ddim_config(prediction_type="v_prediction", timestep_spacing="trailing",
                                beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True,
                                clip_sample=False), 4,
                    lambda x, t, c: m(x, t).sample, lambda x, t: m(x, t).sample)

    def class_64() -> Case:
        m = unet2d(64, classes=3, seed=2)
        return Case("class-64", m, (3, 64, 64), ddim_config(clip_sample=True), 4,
                    lambda x, t, c: m(x, t, class_labels=c["label"]).sample,
                    lambda x, t, class_labels: m(x, t, class_labels=class_labels).sample,
                    [Conditioning("label", dtype="int64", classes=3)],
                    lambda n: {"class_labels": np.arange(n) % 3})

    def unet_1d() -> Case:
        m = unet1d()
        return Case("unet1d", m, (2, 16),
                    ddim_config(num_train_timesteps=100, timestep_spacing="trailing",
                                clip_sample=False), 3,  # 100 / 3 is not whole
                    lambda x, t, c: m(x, t).sample, lambda x, t: m(x, t).sample)

    def policy() -> Case:
        torch.manual_seed(3)
        m = ConditionalUnet1D().eval()
        return Case("policy", m, (16, 2),
                    ddim_config(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                prediction_type="epsilon"), 4,
                    lambda x, t, c: m(x, t, c["global_cond"]),
                    lambda x, t, global_cond: m(x, t, global_cond),
                    [Conditioning("global_cond", (36,), null=0.0)],
                    lambda n: {"global_cond": np.random.default_rng(5).standard_normal(
                        (n, 36)).astype(np.float32)})

    return {"epsilon-leading": epsilon_leading, "v-trailing": v_trailing,
            "class-64": class_64, "unet1d": unet_1d, "policy": policy}


CASES = _cases()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    case = CASES[request.param]()
    out = tmp_path_factory.mktemp(case.name) / "m.onnx"
    sampler = FULL or case.name in QUICK_SAMPLERS
    export_module(case.module, out, sample_shape=case.sample_shape, call=case.call,
                  schedule=case.config, cond=case.cond, fused=("sampler",) if sampler else (),
                  steps=(case.steps,), sampler_output="float", check_n=1)
    return case, out


@pytest.mark.parametrize("graph", ["denoiser", "sampler"])
def test_runtime_matches_diffusers_loop(exported: tuple[Case, Path], graph: str) -> None:
    case, out = exported
    if graph == "sampler" and not (FULL or case.name in QUICK_SAMPLERS):
        pytest.skip(f"tracing the {case.steps}-step sampler of {case.name} takes minutes on a "
                    "2-core CPU; FEWSTEP_FULL_ORACLE=1 runs it")
    n = 2
    latents = np.random.default_rng(7).standard_normal((n, *case.sample_shape)).astype(
        np.float32)
    cond = case.make_cond(n)
    ref = diffusers_loop(case.reference, case.config, latents, case.steps, cond)
    if graph == "sampler":
        pipe = Pipeline.load(out)
    else:
        pipe = Pipeline.from_graphs([backends.load(str(out), "ort-cpu")])
    ours_cond = {k: v for k, v in cond.items() if k != "class_labels"}
    labels = cond.get("class_labels")
    got = pipe.generate(n, case.steps, latents=latents, cond=ours_cond or None,
                        labels=None if labels is None else labels.tolist(), output="samples")
    assert pipe.last_path == graph
    assert got.shape == ref.shape == (n, *case.sample_shape)
    quality = psnr(ref, got)
    assert quality >= MIN_PSNR, (case.name, graph, quality)


# -- a UNet2DModel trained with diffusers' own DDPMScheduler, then exported from its folder ---

TRAIN_STEPS = 200
POOL = 128  # training images, rendered once


def train_ddpm_folder(folder: Path, steps: int = TRAIN_STEPS, seed: int = 0) -> list[float]:
    """Train a small class-conditional UNet2DModel on the built-in 16-px landscapes with
    diffusers' DDPMScheduler (epsilon MSE, AdamW), save it as a DDPMPipeline folder and
    return the loss per step."""
    from fewstep.train.data import Landscapes, to_model_range

    source = Landscapes(seed, 16)
    pairs = [source.image(i) for i in range(POOL)]
    images = torch.from_numpy(to_model_range(np.stack([p[0] for p in pairs])))
    classes = torch.tensor([p[1] for p in pairs])
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        num_class_embeds=source.num_classes)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                        clip_sample=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    batch = 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this small a model trains ~7x faster on one thread here
    try:
        losses = _train(unet, scheduler, opt, gen, images, classes, steps, batch)
    finally:
        torch.set_num_threads(threads)
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(folder)
    return losses


def _train(unet: Any, scheduler: Any, opt: Any, gen: Any, images: Any, classes: Any,
           steps: int, batch: int) -> list[float]:
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, POOL, (batch,), generator=gen)
        x0, labels = images[pick], classes[pick]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_a_trained_diffusers_unet_goes_through_export_gate_and_runtime(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from fewstep.runtime import cli

    folder = tmp_path / "ddpm-landscapes"
    losses = train_ddpm_folder(folder)
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:10])  # it learned something
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(folder), "--out", str(out)]) == 0
    assert "parity gate passed" in capfd.readouterr().err
    pipe = Pipeline.load(out)
    assert pipe.meta.num_classes == 6 and pipe.meta.sample_shape == (3, 16, 16)
    n, steps = 4, 20
    latents = np.random.default_rng(1).standard_normal((n, 3, 16, 16)).astype(np.float32)
    got = pipe.generate(n, steps, latents=latents, labels=[0, 1, 2, 3], output="samples")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    config = dict(diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config)
    ref = diffusers_loop(lambda x, t, class_labels: unet(x, t, class_labels=class_labels).sample,
                         config, latents, steps, {"class_labels": np.arange(4)})
    assert psnr(ref, got) >= MIN_PSNR
    images = pipe.generate(n, steps, labels=[0, 1, 2, 3])
    assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
    assert images.std() > 10  # not a flat field
