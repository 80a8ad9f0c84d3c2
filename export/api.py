"""Export any PyTorch denoiser: ``export_module`` (Python) and ``write_artifact``, the
staged export + parity gate + placement that ``fewstep export`` runs for every source.

A module is described by its sample shape, training schedule, prediction type and
named conditioning inputs; ``call(x, t, cond)`` adapts its signature (default
``module(x, t, **cond)``). The artifact is the one fewstep's own models get: denoiser,
fused step and sampler graphs with ModelMeta inside, shared weights, the parity gate
against the module itself, atomic placement.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fewstep.runtime import __version__, artifact, checks, clitools, ddim
from fewstep.runtime.fileio import check_writable_target, staging_dir
from fewstep.runtime.meta import CondSpec, ModelMeta, Schedule

from . import check, onnx_export
from .graphs import GRAPH_DTYPES, Adapted, Call, cast

if TYPE_CHECKING:
    from .diffusers_config import DiffusersSchedule


@dataclass(frozen=True)
class Conditioning:
    """One conditioning input of a module: its name, the shape of one sample's value (no
    batch axis), dtype (float32 or int64), and ``null``, the value meaning "no
    condition" (needed for classifier-free guidance). ``classes`` > 0 makes an int64
    input of shape () named ``label`` the model's class label (``labels=`` at generate
    time, class names shown by ``fewstep info``)."""

    name: str
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    null: float | None = None
    classes: int = 0


def _describe_failure(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def build_meta(sample_shape: Sequence[int], schedule: Schedule, prediction_type: str,
               cond: Sequence[Conditioning], images: bool | None, class_names: Sequence[str],
               source_hash: str) -> ModelMeta:
    """The ModelMeta of a described module (denoiser graph, fp32)."""
    shape = tuple(checks.whole_number("sample_shape entry", d, 1) for d in sample_shape)
    if images is None:
        images = len(shape) == 3 and shape[0] in (1, 3, 4)
    labels = [c for c in cond if c.classes]
    if len(labels) > 1 or any(c.name != "label" or c.shape or c.dtype != "int64"
                              for c in labels):
        raise ValueError("a class label is one int64 input of shape () named 'label' "
                         "with classes=K; pass Conditioning('label', dtype='int64', "
                         "classes=K)")
    num_classes = labels[0].classes if labels else 0
    null_label = None
    if labels and labels[0].null is not None:
        null_label = int(labels[0].null)
    specs = tuple(CondSpec(c.name, c.dtype, tuple(c.shape), c.null)
                  for c in cond if not c.classes)
    return ModelMeta.build(
        prediction_type=prediction_type, schedule=schedule, sample_shape=shape,
        images=images, num_classes=num_classes, class_names=tuple(class_names),
        null_label=null_label, cond=specs, source_hash=source_hash,
        fewstep_version=__version__,
    )


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of the module's state (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def probe(model: Adapted, meta: ModelMeta, dtype: torch.dtype = torch.float32) -> None:
    """Run the module once on inputs shaped as the graphs will feed it (x, t and float
    conditioning in ``dtype``, the module already cast to it); a failure or an output of
    another shape is one ValueError naming the cause and the fix."""
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v)
              for k, v in onnx_export.example_inputs(meta).items()}
    x, t = inputs.pop("x"), inputs.pop("t")
    name = str(dtype)[6:]
    shown = ", ".join([f"x {tuple(x.shape)} {name}", f"t {tuple(t.shape)} {name}",
                       *(f"cond[{k!r}] {tuple(v.shape)} {str(v.dtype)[6:]}"
                         for k, v in inputs.items())])
    try:
        with torch.no_grad():
            out = model(x, t, inputs)
    except Exception as e:  # the user's module: any exception is its failure
        if dtype != torch.float32:
            raise ValueError(
                f"the module runs in float32 but fails in {name} ({shown}): "
                f"{_describe_failure(e)}; make the tensors it creates follow x's dtype "
                "(e.g. a timestep embedding made in float32: .to(x.dtype)), or export "
                "with precision fp32") from None
        raise ValueError(
            f"the module failed on fewstep's inputs ({shown}): {_describe_failure(e)}; adapt "
            "its signature with call=, e.g. call=lambda x, t, cond: model(x, t, **cond)"
            ".sample (t arrives as a (B,) float32 tensor)") from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the module returned {type(out).__name__}, not a tensor; return "
                         "the prediction itself, e.g. call=lambda x, t, cond: "
                         "model(x, t).sample")
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"the module's output has shape {tuple(out.shape)}, not its "
                         f"input's {tuple(x.shape)}: a denoiser predicts a tensor shaped "
                         "like x; check sample_shape, or return the prediction in x's "
                         "shape from call=")


def write_artifact(model: torch.nn.Module, meta: ModelMeta, out: Path,
                   options: onnx_export.ExportOptions, *, check_parity: bool = True,
                   gates: Mapping[str, float] | None = None, check_n: int = 4,
                   verbose: bool = False, source: str = "the model") -> list[Path]:
    """Trace, check and gate every graph ``options`` asks for in a staging folder beside
    ``out``, then place them; nothing is written on failure. Returns the files placed."""
    stem = out.name[: -len(".onnx")]
    if options.variants and check_parity and "cuda" not in check.available_providers():
        raise ValueError(
            "--target ort-cuda writes graphs that only ONNX Runtime's CUDA execution "
            "provider runs, and their parity gate runs there; this ONNX Runtime has no CUDA "
            "provider: export on a machine with onnxruntime-gpu, or pass --no-check to write "
            f"them ungated (then gate them there: `fewstep check {out} --against {source} "
            "--providers cuda`)"
        )
    stages = onnx_export.graph_count(options) * (2 if not check_parity else 3)
    precision_dtype = GRAPH_DTYPES[options.precision]
    with staging_dir(out.parent, f"export-{stem}") as staging, clitools.Progress(
            stages, "export", unit="stage") as progress:
        casting = (cast(model, precision_dtype) if isinstance(model, Adapted)
                   else contextlib.nullcontext())
        with casting:
            if isinstance(model, Adapted) and precision_dtype != torch.float32:
                probe(model, meta, precision_dtype)
            try:
                files, reports = onnx_export.export_to_folder(model, meta, staging, stem,
                                                              options, progress)
            except Exception as e:  # torch.export / the ONNX exporter: one line, a fix
                if not isinstance(model, Adapted):
                    raise
                raise ValueError(
                    f"torch.onnx.export could not trace the module: {_describe_failure(e)}; "
                    "the module must be traceable by torch.export (no Python branches on "
                    "tensor values, no data-dependent shapes): export the module's plain "
                    "forward, adapted with call=") from None
        for r in reports:
            if r.fused:
                progress.line(f"  {r.path.name}: {r.nodes} nodes, {r.seconds:.1f} s; {r.fused}")
                continue
            islands = ""
            if r.fp32_islands:
                ops = ", ".join(f"{k} x{v}" for k, v in r.fp32_islands.items())
                islands = f"; fp32 islands: {sum(r.fp32_islands.values())} nodes ({ops})"
            progress.line(f"  {r.path.name}: {r.nodes} nodes, {r.seconds:.1f} s{islands}")
            for line in onnx_export.describe_islands(r.fp32_nodes,
                                                     first=None if verbose else 3):
                progress.line(f"    fp32 {line}")
        if check_parity:
            rows = check.check_artifact(
                staging / out.name, model, meta, n=check_n, eta=options.eta,
                gates=dict(gates or {}), progress=progress,
            )
            for target in options.variants:  # gated where they run: the CUDA provider
                rows += check.check_artifact(
                    artifact.variant_path(staging / out.name, target), model, meta,
                    providers=["cuda"], n=check_n, eta=options.eta, gates=dict(gates or {}),
                    progress=progress,
                )
            progress.close()
            print(check.table(rows), file=sys.stderr)
            print(check.summary(rows), file=sys.stderr)
            failed = [r for r in rows if r.failed]
            if failed:
                raise clitools.CheckFailed(
                    f"{len(failed)} parity row(s) below the gate; nothing was written "
                    f"to {out.parent}/ (try --precision fp32, or lower the gate knowingly)"
                )
            skipped = sorted({r.provider for r in rows if r.skipped})
            if skipped:
                fix = (f"check them with `fewstep check {out} --against {source} "
                       "--providers cuda` on a machine with ONNX Runtime's CUDA provider"
                       if "cuda" not in skipped else
                       "no ONNX Runtime provider here runs them; build a TensorRT plan "
                       "with `fewstep build` and compare it")
                print(f"warning: the {options.precision} graphs were written without a "
                      f"parity check on {', '.join(skipped)} (reasons above); {fix}",
                      file=sys.stderr)
        progress.close()
        return onnx_export.place(files, out.parent, stem, meta.source_hash)


def export_module(
    module: torch.nn.Module,
    out: str | os.PathLike[str],
    *,
    sample_shape: Sequence[int],
    call: Call | None = None,
    schedule: Schedule | Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    cond: Sequence[Conditioning] = (),
    images: bool | None = None,
    class_names: Sequence[str] = (),
    precision: str = "fp32",
    guidance: bool = False,
    fused: Sequence[str] = ("step", "sampler"),
    steps: Sequence[int] = (4,),
    spacing: str | None = None,
    eta: float = 0.0,
    sampler_output: str | None = None,
    opset: int | None = None,
    targets: Sequence[str] = (),
    check_parity: bool = True,
    gates: Mapping[str, float] | None = None,
    check_n: int = 4,
) -> list[Path]:
    """Export a PyTorch denoiser to a fewstep artifact at ``out`` (a ``.onnx`` path) and
    return the files written.

    ``sample_shape``: one sample without the batch axis — (C, H, W) images of any size,
    (T, D) sequences, any rank. ``call(x, t, cond)``: how to run ``module`` on x (B,
    *sample_shape) float32, t (B,) float32 timesteps and cond {name: (B, ...)}; it
    returns the prediction, shaped like x (default ``module(x, t, **cond)``; for a
    diffusers UNet ``lambda x, t, cond: module(x, t, **cond).sample``). ``schedule``:
    a ``fewstep.runtime.meta.Schedule``, or a diffusers scheduler config (a mapping, e.g.
    ``scheduler.config``: DDIMScheduler or DDPMScheduler; it also gives the prediction
    type and default spacing). ``prediction_type``: epsilon, v_prediction or sample.
    ``cond``: the conditioning inputs (``Conditioning``). ``images``: samples are (C, H,
    W) images in [-1, 1] (default: a rank-3 shape with 1, 3 or 4 channels).
    ``guidance``: classifier-free guidance inside the graphs (every input needs a null).
    ``fused``, ``steps``, ``spacing``, ``eta``, ``precision``, ``sampler_output``,
    ``opset``, ``targets`` (``("ort-cuda",)``: also the ORT-CUDA variant): as ``fewstep
    export``. The parity gate compares every graph against the
    module itself (fp32 >= 40 dB, fp16 >= 35 dB) and raises ``CheckFailed`` (nothing
    written) below it.
    """
    target = check_writable_target(out)
    if target.suffix != ".onnx":
        raise ValueError(f"out={str(target)!r} must end in .onnx")
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}; "
                         "wrap a function's weights in a module and pass call=")
    schedule, prediction_type = _schedule(schedule, prediction_type)
    meta = build_meta(sample_shape, schedule, prediction_type, cond, images, class_names,
                      weights_hash(module))
    if call is None:
        def call(x: torch.Tensor, t: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
            out_: torch.Tensor = module(x, t, **c)
            return out_
    model = Adapted(module, call).eval()
    probe(model, meta)
    options = onnx_export.ExportOptions(
        precision=precision, guidance=guidance, fused=tuple(dict.fromkeys(fused)),
        sampler_steps=tuple(dict.fromkeys(steps)), spacing=spacing, eta=eta,
        sampler_output=sampler_output or ("uint8" if meta.images else "float"), opset=opset,
        variants=tuple(dict.fromkeys(t for t in targets if t != "portable")),
    )
    onnx_export.check_options_against(meta, options)
    return write_artifact(model, meta, target, options, check_parity=check_parity,
                          gates=gates, check_n=check_n, source="the module")


def load_source(source: Path, scheduler_config: Path | None,
                sample_shape: tuple[int, ...] | None = None) -> tuple[Any, ModelMeta]:
    """The torch module and its ModelMeta (denoiser, fp32) for an export source: a fewstep
    checkpoint, or a diffusers folder (``sample_shape`` None: its config's size). A
    module from a diffusers folder has been run once on fewstep's inputs (``probe``)."""
    if not source.is_dir():
        for flag, value in (("--scheduler-config", scheduler_config),
                            ("--sample-shape", sample_shape)):
            if value is not None:
                raise ValueError(f"{flag} applies to diffusers folders; a fewstep checkpoint "
                                 f"records its schedule and shape (drop {flag})")
        from fewstep.train import checkpoint as ckpt_io

        ck = ckpt_io.load(source)
        return ck.build_model(), ck.meta
    model, meta, _ = load_diffusers(source, scheduler_config, sample_shape)
    return model, meta


def load_diffusers(source: Path, scheduler_config: Path | None,
                   sample_shape: tuple[int, ...] | None = None
                   ) -> tuple[Adapted, ModelMeta, DiffusersSchedule]:
    """``load_source`` of a diffusers folder, with the scheduler config it was read with."""
    from . import diffusers_model

    loaded = diffusers_model.load(source, scheduler_config, sample_shape)
    model = Adapted(loaded.module, loaded.call).eval()
    meta = build_meta(loaded.sample_shape, loaded.scheduler.schedule,
                      loaded.scheduler.prediction_type, loaded.cond, loaded.images, (),
                      weights_hash(loaded.module))
    probe(model, meta)
    return model, meta, loaded.scheduler


def _schedule(schedule: Schedule | Mapping[str, Any] | None,
              prediction_type: str | None) -> tuple[Schedule, str]:
    if isinstance(schedule, Mapping):
        from .diffusers_config import schedule_from_config

        imported = schedule_from_config(dict(schedule))
        if prediction_type is not None and prediction_type != imported.prediction_type:
            raise ValueError(f"prediction_type={prediction_type!r} differs from the scheduler "
                             f"config's {imported.prediction_type!r}; leave it out")
        return imported.schedule, imported.prediction_type
    if schedule is not None and not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a fewstep Schedule or a diffusers scheduler "
                         f"config mapping, got {type(schedule).__name__}")
    ptype = checks.choice("prediction_type", prediction_type or "epsilon",
                          ddim.PREDICTION_TYPES)
    return schedule or Schedule(), ptype


__all__ = ["Adapted", "Conditioning", "build_meta", "export_module", "load_diffusers",
           "load_source", "probe", "weights_hash", "write_artifact"]
