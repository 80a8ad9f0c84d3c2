"""A diffusers folder as an exportable model: the denoiser, its call, its description.

A pipeline folder (``model_index.json``, the denoiser's folder, ``scheduler/``) or a
model folder (``config.json`` + weights) with a scheduler config given separately.
``UNet2DModel`` (class-conditional through ``num_class_embeds``) and ``UNet1DModel``
load; anything fewstep cannot run exactly — a text encoder, a VAE, another model
class, pickled weights — is one ``ArtifactError`` naming what and why. Weights load
from safetensors only (a pickle can run code). diffusers is imported only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from fewstep.runtime.errors import ArtifactError, inert

from .api import Conditioning
from .diffusers_config import DiffusersSchedule, load_scheduler_config, read_config
from .graphs import Call

MODELS: Final = ("UNet2DModel", "UNet1DModel")
# Pipeline components fewstep cannot reproduce: what each one means.
UNSUPPORTED: Final = {
    "text_encoder": "it needs text embeddings (a text-to-image pipeline)",
    "tokenizer": "it needs text embeddings (a text-to-image pipeline)",
    "vae": "it samples in a VAE's latent space (latent diffusion)",
    "vqvae": "it samples in a VQ-VAE's latent space (latent diffusion)",
    "transformer": "its denoiser is a transformer, not a UNet2DModel or UNet1DModel",
    "prior": "it is a multi-stage pipeline",
}


@dataclass
class DiffusersModel:
    """What ``fewstep export`` needs of a diffusers folder."""

    module: Any  # a diffusers model (a torch.nn.Module)
    call: Call
    sample_shape: tuple[int, ...]
    images: bool
    cond: tuple[Conditioning, ...]
    scheduler: DiffusersSchedule
    source: str


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file()
                              or (path / "config.json").is_file())


def _fail(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{inert(str(path), 200)!r}: {why}")


def load(path: str | os.PathLike[str], scheduler_config: str | os.PathLike[str] | None = None,
         sample_shape: tuple[int, ...] | None = None) -> DiffusersModel:
    """The denoiser of the diffusers folder ``path`` with its schedule (from the pipeline's
    ``scheduler/`` or ``scheduler_config``). ``sample_shape`` overrides the size the
    model's config records (a UNet1DModel's sequence length, a UNet2DModel's size)."""
    folder = Path(path)
    if not folder.is_dir():
        raise _fail(folder, "is not a folder; pass a diffusers pipeline folder "
                    "(model_index.json) or a model folder (config.json)")
    if (folder / "model_index.json").is_file():
        model_folder, sched = _pipeline(folder)
        if scheduler_config is not None:
            sched = Path(scheduler_config)
    elif (folder / "config.json").is_file():
        model_folder = folder
        if scheduler_config is None:
            raise _fail(folder, "is a model folder without a scheduler: pass "
                        "--scheduler-config scheduler_config.json (the training schedule)")
        sched = Path(scheduler_config)
    else:
        raise _fail(folder, "is not a diffusers folder (no model_index.json, no config.json); "
                    "pass a folder written by save_pretrained")
    scheduler = load_scheduler_config(sched)
    config = read_config(model_folder / "config.json")
    if not isinstance(config, dict):
        raise _fail(model_folder / "config.json", "is not a JSON object")
    cls = config.get("_class_name")
    if cls not in MODELS:
        raise _fail(model_folder, f"holds a {inert(repr(cls), 80)}; fewstep imports "
                    f"{' and '.join(MODELS)}")
    if not any(model_folder.glob("*.safetensors")):
        raise _fail(model_folder, "has no .safetensors weights (pickled .bin weights can run "
                    "code and are not loaded); save the model with safe_serialization=True")
    import diffusers

    try:
        module = getattr(diffusers, cls).from_pretrained(model_folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise _fail(model_folder, f"diffusers cannot load it ({type(e).__name__}: "
                    f"{inert(' '.join(str(e).split()), 200)})") from None
    module = module.float().eval()
    if cls == "UNet2DModel":
        return _unet2d(module, config, scheduler, sample_shape, str(folder))
    return _unet1d(module, config, scheduler, sample_shape, str(folder))


def _pipeline(folder: Path) -> tuple[Path, Path]:
    index = read_config(folder / "model_index.json")
    if not isinstance(index, dict):
        raise _fail(folder / "model_index.json", "is not a JSON object")
    for name, why in UNSUPPORTED.items():
        if index.get(name) not in (None, [None, None]):
            raise _fail(folder, f"has a {name!r} component: {why}; fewstep imports "
                        "unconditional and class-conditional UNet pipelines (DDPMPipeline, "
                        "DDIMPipeline)")
    if "unet" not in index:
        raise _fail(folder, "model_index.json names no 'unet' component; pass a DDPM/DDIM "
                    "pipeline folder, or a model folder with --scheduler-config")
    for part in ("unet", "scheduler"):
        if not (folder / part).is_dir():
            raise _fail(folder, f"has no {part}/ folder beside model_index.json")
    return folder / "unet", folder / "scheduler" / "scheduler_config.json"


def _size(value: Any, rank: int) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * rank
    if isinstance(value, (list, tuple)) and len(value) == rank and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _unet2d(module: Any, config: dict[str, Any], scheduler: DiffusersSchedule,
            shape: tuple[int, ...] | None, source: str) -> DiffusersModel:
    c: Any = module.config
    if c.in_channels != c.out_channels:
        raise _fail(Path(source), f"its UNet2DModel outputs {c.out_channels} channels for "
                    f"{c.in_channels} in (a learned variance?); fewstep needs a prediction "
                    "shaped like the sample")
    if c.class_embed_type is not None:
        raise _fail(Path(source), f"class_embed_type={inert(repr(c.class_embed_type), 40)}: "
                    "fewstep imports num_class_embeds class labels only")
    size = _size(c.sample_size, 2)
    if shape is None:
        if size is None:
            raise _fail(Path(source), "its config records no sample_size; pass "
                        "--sample-shape C,H,W")
        shape = (c.in_channels, *size)
    if len(shape) != 3 or shape[0] != c.in_channels:
        raise ValueError(f"--sample-shape {shape} must be ({c.in_channels}, H, W) for this "
                         "UNet2DModel")
    cond: tuple[Conditioning, ...] = ()
    if c.num_class_embeds:
        cond = (Conditioning("label", dtype="int64", classes=int(c.num_class_embeds)),)

        def call(x: torch.Tensor, t: torch.Tensor, k: dict[str, torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = module(x, t, class_labels=k["label"]).sample
            return out
    else:
        def call(x: torch.Tensor, t: torch.Tensor, k: dict[str, torch.Tensor]) -> torch.Tensor:
            out: torch.Tensor = module(x, t).sample
            return out
    return DiffusersModel(module, call, shape, shape[0] in (1, 3, 4), cond, scheduler, source)


def _unet1d(module: Any, config: dict[str, Any], scheduler: DiffusersSchedule,
            shape: tuple[int, ...] | None, source: str) -> DiffusersModel:
    c: Any = module.config
    channels = c.in_channels  # extra_in_channels are the time features the model adds
    if c.out_channels != c.in_channels:
        raise _fail(Path(source), f"its UNet1DModel outputs {c.out_channels} channels for "
                    f"{c.in_channels} in; fewstep needs a prediction shaped like the sample")
    if shape is None:
        length = _size(c.sample_size, 1)
        if length is None:
            raise _fail(Path(source), "its config records no sample_size; pass "
                        "--sample-shape C,L")
        shape = (channels, *length)
    if len(shape) != 2 or shape[0] != channels:
        raise ValueError(f"--sample-shape {shape} must be ({channels}, L) for this UNet1DModel")

    def call(x: torch.Tensor, t: torch.Tensor, k: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = module(x, t).sample
        return out

    return DiffusersModel(module, call, shape, False, (), scheduler, source)
