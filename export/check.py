"""The parity gate: ONNX Runtime against the PyTorch reference, same inputs and noise.

For every graph of an artifact it runs ONNX Runtime (CPU always, CUDA when the CUDA
execution provider is present) and the PyTorch reference sampler on fresh random
inputs with the same host noise, and reports max abs error and PSNR of the final
images (on the 0..255 scale). Gates: fp32 ≥ 40 dB, fp16 ≥ 35 dB, bf16 ≥ 30 dB unless
configured. bf16 keeps 8 significant bits to fp16's 11, so each op rounds with ~18 dB
more noise; its gate is 5 dB below fp16's (30 dB: an RMS error of about 8 of 255 levels).

A reduced-precision graph that an execution provider has no kernels for (ONNX Runtime's
CPU provider has no bfloat16 Conv/Gemm, for example) is not run there: its rows are
*skipped* with ONNX Runtime's reason — neither passed nor failed — and the table says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from fewstep.runtime import artifact, images, sampling
from fewstep.runtime import noise as host_noise
from fewstep.runtime.clitools import Progress, plural
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.sampling import SamplingPlan
from fewstep.train import reference

from .graphs import DenoiserGraph

DEFAULT_GATES = {"fp32": 40.0, "fp16": 35.0, "bf16": 30.0}
VARIANT_CUDA_ONLY = ("an ORT-CUDA variant graph: its com.microsoft kernels (GroupNorm, "
                     "NhwcConv) exist only in ONNX Runtime's CUDA execution provider")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class ParityRow:
    graph: str
    kind: str
    precision: str
    provider: str
    what: str
    max_abs: float
    psnr: float
    gate: float
    skipped: str = ""  # why the row was not run on this provider ("" = it ran)

    @property
    def passed(self) -> bool:
        """Ran and met its gate (a skipped row has not passed)."""
        return not self.skipped and self.psnr >= self.gate

    @property
    def failed(self) -> bool:
        """Ran and missed its gate (a skipped row has not failed either)."""
        return not self.skipped and not self.psnr >= self.gate


def psnr(reference_255: NDArray[Any], actual_255: NDArray[Any], peak: float = 255.0) -> float:
    mse = float(np.mean((reference_255.astype(np.float64) - actual_255.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def available_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [k for k, v in PROVIDERS.items() if v in have]


def _session(path: Path, provider: str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: fewstep reports errors itself, in one line
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), opts, providers=providers)


def unsupported_reason(error: Exception, precision: str, provider: str) -> str | None:
    """Why ONNX Runtime cannot run a ``precision`` graph on ``provider``, if ``error``
    (raised creating the session) says it has no kernel for one of its nodes; else None.

    Only reduced-precision graphs are skipped this way: an fp32 graph ORT cannot run is a
    broken export, and stays an error.
    """
    if precision == "fp32":
        return None
    text = str(error)
    if "NOT_IMPLEMENTED" not in text and "Could not find an implementation" not in text:
        return None
    import onnxruntime as ort

    m = re.search(r"implementation for (\S+) node with name '([^']*)'", text)
    what = f"{m.group(1)} (first such node: {m.group(2)})" if m else text.strip()
    where = PROVIDERS[provider] + ("" if provider == "cpu" else " (nor its CPU fallback)")
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, precision)
    return f"ONNX Runtime {ort.__version__} {where} has no {dtype} kernel for {what}"


def _load_error(path: Path, provider: str, error: Exception) -> ArtifactError:
    """ONNX Runtime could not open a graph (damaged weights, a foreign or edited file)."""
    import onnxruntime as ort

    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()),
                 type(error).__name__)
    return ArtifactError(
        f"ONNX Runtime {ort.__version__} ({PROVIDERS[provider]}) cannot load {path.name}: "
        f"{first[:300]}; the file or its weights are damaged or were edited: re-export the "
        "model with `fewstep export`"
    )


def _to_255(x: NDArray[Any], meta: ModelMeta) -> NDArray[np.float64]:
    """Final samples in model range → unrounded 0..255 values (B, H, W, C) of an image
    model; the samples themselves (float64) for other models."""
    if not meta.images:
        return x.astype(np.float64)
    pixels = (np.clip(x.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5
    out: NDArray[np.float64] = pixels.transpose(0, 2, 3, 1)
    return out


def _peak(meta: ModelMeta, reference_values: NDArray[Any]) -> float:
    """The PSNR peak: 255 for images on the 0..255 scale; the reference's range for
    other samples."""
    if meta.images:
        return 255.0
    return float(np.max(reference_values) - np.min(reference_values)) or 1.0


def random_cond(meta: ModelMeta, n: int, seed: int) -> dict[str, NDArray[Any]]:
    """Values for the model's conditioning inputs: standard normal floats, small
    whole numbers for int64 inputs."""
    rng = np.random.default_rng(seed + 2)
    return {c.name: (rng.standard_normal((n, *c.shape)).astype(np.float32)
                     if c.dtype == "float32" else rng.integers(0, 2, (n, *c.shape)))
            for c in meta.cond}


class _Case:
    """One generation's inputs: noise, labels, conditioning, guidance, for a graph's meta."""

    def __init__(self, meta: ModelMeta, n: int, seed: int, plan: SamplingPlan,
                 guidance: float | None) -> None:
        self.plan = plan
        self.labels = sampling.resolve_labels(meta, n, None)
        self.cond = random_cond(meta, n, seed)
        self.guidance = guidance
        self.x_T, self.noise = host_noise.generation_noise(
            seed, range(n), meta.sample_shape, plan.steps if plan.stochastic else 0
        )

    def fixed(self, meta: ModelMeta) -> dict[str, NDArray[Any]]:
        feeds: dict[str, NDArray[Any]] = dict(self.cond)
        n = len(self.x_T)
        if "label" in meta.graph.inputs:
            feeds["label"] = self.labels
        if "guidance" in meta.graph.inputs:
            feeds["guidance"] = np.full(n, self.guidance or 1.0, dtype=np.float32)
        return feeds


def _ort_generate(sess: Any, meta: ModelMeta, case: _Case) -> NDArray[Any]:
    """Run a denoiser/step/sampler graph through the whole loop; final samples or image."""
    kind, plan, n = meta.graph.kind, case.plan, len(case.x_T)
    fixed = case.fixed(meta)
    out_name = meta.graph.outputs[0]
    if kind == "sampler":
        feeds = {"x": case.x_T, **fixed}
        if "noise" in meta.graph.inputs and case.noise is not None:
            feeds["noise"] = case.noise
        result: NDArray[Any] = sess.run([out_name], feeds)[0]
        return result

    def full(v: float) -> NDArray[np.float32]:
        return np.full(n, v, dtype=np.float32)

    if kind == "denoiser":
        def denoise(x: NDArray[Any], i: int) -> NDArray[Any]:
            out: NDArray[Any] = sess.run([out_name], {"x": x, "t": full(plan.timesteps[i]),
                                                     **fixed})[0]
            return out

        final: NDArray[Any] = sampling.run_loop(plan, denoise, case.x_T.copy(), case.noise)
        return final
    x: NDArray[Any] = case.x_T.copy()
    zeros = np.zeros_like(x)
    for i in range(plan.steps):
        step_noise = case.noise[:, i] if case.noise is not None else zeros
        x = sess.run([out_name], {
            "x": x, "t": full(plan.timesteps[i]), "a_t": full(plan.a_t[i]),
            "a_prev": full(plan.a_prev[i]), "eta": full(plan.eta), "noise": step_noise,
            **fixed,
        })[0]
    return x


def check_artifact(
    onnx_path: str | Path,
    model: torch.nn.Module,
    source_meta: ModelMeta,
    *,
    providers: list[str] | None = None,
    n: int = 4,
    steps: int = 4,
    eta: float = 0.0,
    seed: int = 0,
    guidance: float = 2.0,
    gates: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> list[ParityRow]:
    """Parity rows for every graph of the artifact at ``onnx_path`` (``progress``: one stage
    per graph)."""
    gates = {**DEFAULT_GATES, **(gates or {})}
    providers = providers or available_providers()
    model = model.float().eval()
    rows: list[ParityRow] = []
    art = artifact.Artifact.open(onnx_path)
    if art.rejected:
        bad = art.rejected[0]
        raise ArtifactError(f"{bad.path.name}: {bad.problem}")
    for graph in sorted(art.graphs, key=lambda g: g.path):
        path, meta = graph.path, graph.meta
        assert meta is not None
        if meta.source_hash != source_meta.source_hash:
            raise ValueError(
                f"{path.name} was exported from another checkpoint "
                f"({meta.source_hash[:19]} vs {source_meta.source_hash[:19]}); "
                "check it against the checkpoint it came from"
            )
        if progress is not None:
            progress.stage(f"gate {path.name}")
        g = meta.graph
        guide = guidance if g.guidance else None
        if g.kind == "sampler":
            plan = SamplingPlan.create(meta, g.steps, g.spacing, g.eta)
        else:
            plan = SamplingPlan.create(meta, steps, sampling.default_spacing(meta),
                                       eta if g.kind == "step" else 0.0)
        case = _Case(meta, n, seed, plan, guide)
        ref = reference.sample(model, meta, n, plan.steps, eta=plan.eta, seed=seed,
                               guidance=guide, spacing=g.spacing or sampling.default_spacing(meta),
                               cond=case.cond)
        ref_255 = _to_255(ref, meta)
        final_what = (f"final {'images' if meta.images else 'samples'}, "
                      f"{plural(plan.steps, 'step')}, eta {plan.eta:g}")
        for provider in providers:
            gate = gates[g.precision]
            if g.target == "ort-cuda" and provider != "cuda":
                whats = (["network output, random inputs"] if g.kind == "denoiser" else [])
                rows += [ParityRow(path.name, g.kind, g.precision, provider, what, math.nan,
                                   math.nan, gate, skipped=VARIANT_CUDA_ONLY)
                         for what in [*whats, final_what]]
                continue
            try:
                sess = _session(path, provider)
            except Exception as e:  # onnxruntime raises its own (pybind) exception types
                reason = unsupported_reason(e, g.precision, provider)
                if reason is None:
                    raise _load_error(path, provider, e) from None
                whats = (["network output, random inputs"] if g.kind == "denoiser" else [])
                rows += [ParityRow(path.name, g.kind, g.precision, provider, what, math.nan,
                                   math.nan, gate, skipped=reason)
                         for what in [*whats, final_what]]
                continue
            if g.kind == "denoiser":
                rows.append(_denoiser_row(sess, path, meta, model, provider, gate, seed))
            out = _ort_generate(sess, meta, case)
            if g.output_format == "uint8":
                actual = out.astype(np.float64)
                expect = images.to_uint8_nhwc(ref).astype(np.float64)
            else:
                actual, expect = _to_255(out, meta), ref_255
            rows.append(ParityRow(
                path.name, g.kind, g.precision, provider, final_what,
                float(np.max(np.abs(actual - expect))),
                psnr(expect, actual, _peak(meta, expect)), gate,
            ))
        if progress is not None:
            progress.advance()
    return rows


def _denoiser_row(sess: Any, path: Path, meta: ModelMeta, model: torch.nn.Module,
                  provider: str, gate: float, seed: int) -> ParityRow:
    """One call of the denoiser graph on random inputs against the torch module."""
    rng = np.random.default_rng(seed + 1)
    n = 4
    feeds: dict[str, NDArray[Any]] = {
        "x": rng.standard_normal((n, *meta.sample_shape), dtype=np.float32),
        "t": rng.integers(0, meta.schedule.num_train_timesteps, n).astype(np.float32),
        **random_cond(meta, n, seed),
    }
    if meta.conditional:
        top = meta.num_classes + (meta.null_label == meta.num_classes)
        feeds["label"] = rng.integers(0, top, n).astype(np.int64)
    if meta.graph.guidance:
        feeds["guidance"] = np.full(n, 2.0, dtype=np.float32)
    out = sess.run(None, feeds)[0]
    torch_graph = DenoiserGraph(model, meta, meta.graph.guidance)
    with torch.no_grad():
        expect = torch_graph(*[torch.from_numpy(feeds[k]) for k in meta.graph.inputs]).numpy()
    peak = float(np.max(expect) - np.min(expect))
    return ParityRow(path.name, "denoiser", meta.graph.precision, provider,
                     "network output, random inputs", float(np.max(np.abs(out - expect))),
                     psnr(expect, out, peak), gate)


def table(rows: list[ParityRow]) -> str:
    """The rows, then one line per (graph, provider) that was skipped, with the reason."""
    head = (f"{'graph':<28} {'prov':<5} {'prec':<5} {'what':<36} {'max abs':>9} "
            f"{'PSNR dB':>8} {'gate':>5}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.graph:<28} {r.provider:<5} {r.precision:<5} {r.what:<36} "
                         f"{'-':>9} {'-':>8} {r.gate:>5.0f}  SKIPPED (not run)")
            continue
        p = "inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}"
        lines.append(f"{r.graph:<28} {r.provider:<5} {r.precision:<5} {r.what:<36} "
                     f"{r.max_abs:>9.4g} {p:>8} {r.gate:>5.0f}  {'yes' if r.passed else 'NO'}")
    for (graph, provider), reason in skipped_reasons(rows).items():
        lines.append(f"skipped {graph} on {provider}: {reason}")
    return "\n".join(lines)


def skipped_reasons(rows: list[ParityRow]) -> dict[tuple[str, str], str]:
    """(graph, provider) → why its rows were not run, in row order."""
    return {(r.graph, r.provider): r.skipped for r in rows if r.skipped}


def summary(rows: list[ParityRow]) -> str:
    """One line on the gate as a whole: passed only if every row ran and passed."""
    failed = sum(r.failed for r in rows)
    skipped = sum(bool(r.skipped) for r in rows)
    passed = sum(r.passed for r in rows)
    if failed:
        return f"parity gate FAILED: {failed} of {len(rows)} rows below the gate"
    if skipped:
        providers = sorted({r.provider for r in rows if r.skipped})
        return (f"parity gate NOT passed: {skipped} of {len(rows)} rows skipped (could not "
                f"run on {', '.join(providers)}), {passed} passed")
    return f"parity gate passed ({len(rows)} rows)"
