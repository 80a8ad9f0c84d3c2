"""Baselines, measured in the same process on the same weights, noise, labels and guidance.

* ``torch-eager`` (fp32, fp16): the diffusers-style loop. One PyTorch UNet forward per
  step, classifier-free guidance by batch doubling (``train.reference.denoiser``), the
  DDIM update on the host side of the framework (``ddim.step`` with Python-float
  coefficients on device tensors), then uint8 on the device and one copy to the host.
* ``torch-compile`` (fp32, fp16; mode ``reduce-overhead`` = CUDA graphs, and
  ``max-autotune`` when asked): the WHOLE loop (all S steps and the uint8 conversion)
  as one ``torch.compile(fullgraph=True, dynamic=False)`` function, compiled afresh for
  each (steps, batch) after ``torch._dynamo.reset()``; the first call (compilation and
  graph capture) is the row's ``first_call_ms``. CUDA only.
* ``ort-steps``: ONNX Runtime driven one step at a time the plain way (the optimum
  style): ``InferenceSession.run`` with numpy in and out each step, the DDIM update in
  numpy on the host (``sampling.run_loop``), on the CPU or CUDA execution provider with
  default provider options (on the CPU with fewstep's ort-cpu thread count).

``Reference`` makes the PyTorch fp32 images every row's max-error/PSNR is measured
against: the checkpoint's EMA weights, fp32 with TF32 off, seed 0, at the largest batch
of the run (image i does not depend on the batch it is in), computed for a step count
just before its first row is measured, outside the row's memory accounting.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from fewstep.runtime import backends, images, sampling

from .paths import SEEDS, VARIANT_ON_CUDA_ONLY, BenchModel, BenchPath, Workload
from .torch_source import TorchSource

__all__ = [
    "OrtStepsPath",
    "Reference",
    "TorchCompilePath",
    "TorchEagerPath",
    "TorchSource",
    "no_tf32",
]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """True fp32 matrix products and convolutions (the reference), restored afterwards."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


class Reference:
    """PyTorch fp32 reference outputs (seed 0) for every step count, at the largest batch:
    uint8 images of an image model, final samples of any other."""

    def __init__(self, src: TorchSource, work: Workload, batches: Sequence[int]) -> None:
        self.src, self.work = src, work
        self.n = max(batches)
        self.device = "cuda" if src.cuda else "cpu"
        self._images: dict[int, np.ndarray] = {}
        self._errors: dict[int, str] = {}
        self.describe = f"torch fp32 reference on {self.device} (TF32 off), seed 0"

    def ensure(self, steps: int) -> None:
        """Compute the reference for ``steps`` if not done yet (called by the runner before
        it measures a row's memory: the reference's device memory is freed again)."""
        if self.src.reason is not None or steps in self._images or steps in self._errors:
            return
        import torch

        from fewstep.train import reference

        model = copy.deepcopy(self.src.model).to(self.device)
        sample = reference.sample_images if self.work.meta.images else reference.sample
        try:
            with no_tf32():
                self._images[steps] = sample(
                    model, self.work.meta, self.n, steps, seed=0,
                    guidance=self.work.guidance, spacing=self.work.spacing,
                    batch_size=self.n, device=self.device, dtype=torch.float32,
                    cond=self.work.cond(self.n) or None)
        except Exception as e:
            self._errors[steps] = f"reference failed: {type(e).__name__}: {e}"
        finally:
            del model
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def images(self, steps: int, batch: int) -> tuple[np.ndarray | None, str]:
        if self.src.reason is not None:
            return None, self.src.reason
        self.ensure(steps)
        if steps not in self._images:
            return None, self._errors.get(steps, f"no reference computed for {steps} steps")
        return self._images[steps][:batch], self.describe


# ---------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class TorchEagerPath(BenchPath):
    family = "baseline"
    path = "torch-eager"
    backend = "torch"
    memory = "torch"

    def __init__(self, src: TorchSource, work: Workload, precision: str) -> None:
        self.src, self.work, self.precision = src, work, precision
        self.device = "cuda" if src.cuda else "cpu"
        self.name = f"{self.path} {precision}"
        self.model_obj: Any = None
        self.model = str(src.path) if src.path else ""

    def unavailable(self) -> str | None:
        if self.src.reason is not None:
            return self.src.reason
        if self.precision == "fp16" and self.device == "cpu":
            return "fp16 PyTorch on the CPU is not a baseline anyone would use (no CUDA here)"
        return None

    @property
    def dtype(self) -> Any:
        import torch

        return torch.float16 if self.precision == "fp16" else torch.float32

    def load(self, steps: int, batch: int) -> float | None:
        if self.model_obj is not None:
            return None
        t0 = time.perf_counter()
        self.model_obj = copy.deepcopy(self.src.model).to(self.device, self.dtype).eval()
        _sync(self.device)
        return time.perf_counter() - t0

    def _labels(self, batch: int) -> Any:
        import torch

        labels = self.work.labels(batch)
        return None if labels is None else torch.from_numpy(labels).to(self.device)

    def _cond(self, batch: int) -> dict[str, Any]:
        """The workload's conditioning on the device, floats in this path's dtype."""
        import torch

        return {k: torch.from_numpy(v).to(self.device, self.dtype if v.dtype.kind == "f"
                                          else None)
                for k, v in self.work.cond(batch).items()}

    def _nulls(self) -> dict[str, float]:
        return {c.name: c.null or 0.0 for c in self.work.meta.cond}

    def _finish(self, x: Any) -> Any:
        """The loop's result as every path returns it, still on the device: uint8 NHWC
        images of an image model, float32 samples of any other."""
        import torch

        if not self.work.meta.images:
            return x.float().contiguous()
        pixels = images.to_pixel_values(x.float()).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous()

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        import torch

        loop = self.loop(steps)
        labels, cond = self._labels(batch), self._cond(batch)
        device, dtype, work = self.device, self.dtype, self.work

        def run(i: int) -> np.ndarray:
            x_T = work.noise(i % SEEDS, batch)
            with torch.no_grad():
                out: np.ndarray = loop(torch.from_numpy(x_T).to(device, dtype), labels,
                                       cond).cpu().numpy()
            return out

        return run

    def loop(self, steps: int) -> Callable[[Any, Any, dict[str, Any]], Any]:
        """The whole loop, ``loop(x_T, labels, cond)`` -> the path's output on the device
        (torch-compile compiles it)."""
        from fewstep.train import reference

        plan = self.work.plan(steps)
        model, g, null = self.model_obj, self.work.guidance, self.work.meta.null_label
        nulls, finish = self._nulls(), self._finish

        def loop(x: Any, labels: Any, cond: dict[str, Any]) -> Any:
            fn = reference.denoiser(model, plan.timesteps, labels, g, null, cond, nulls)
            return finish(sampling.run_loop(plan, fn, x))

        return loop

    def _network_inputs(self, batch: int) -> tuple[Any, Any, dict[str, Any]]:
        """x, labels and cond of one network call (doubled with the nulls under CFG)."""
        import torch

        x = torch.from_numpy(self.work.noise(0, batch)).to(self.device, self.dtype)
        labels, cond = self._labels(batch), self._cond(batch)
        if self.work.guidance is not None:
            x = torch.cat([x, x])
            if labels is not None:
                labels = torch.cat([labels,
                                    torch.full_like(labels, self.work.meta.null_label)])
            nulls = self._nulls()
            cond = {k: torch.cat([v, torch.full_like(v, nulls[k])]) for k, v in cond.items()}
        return x, labels, cond

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        import torch

        from fewstep.train import reference

        plan = self.work.plan(steps)
        x, labels, cond = self._network_inputs(batch)
        guided = self.work.guidance is not None
        ts = [torch.full((x.shape[0],), float(t), device=self.device) for t in plan.timesteps]
        model, device = self.network_model(steps, batch), self.device

        def run(_: int) -> None:
            with torch.no_grad():
                for t in ts:
                    reference.call(model, x, t, labels, cond)
            _sync(device)

        cfg = " (2 × batch: CFG)" if guided else ""
        return run, (f"steps × {self.network_what}{cfg} on device tensors, then "
                     + ("torch.cuda.synchronize" if device == "cuda" else "(CPU)"))

    network_what = "UNet forward"

    def network_model(self, steps: int, batch: int) -> Any:
        """The model ``network`` times (the eager one here)."""
        return self.model_obj

    def close(self) -> None:
        self.model_obj = None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


class TorchCompilePath(TorchEagerPath):
    path = "torch-compile"

    def __init__(self, src: TorchSource, work: Workload, precision: str, mode: str,
                 compile_steps: Sequence[int], compile_batches: Sequence[int]) -> None:
        super().__init__(src, work, precision)
        self.mode = mode
        self.name = f"{self.path} {mode} {precision}"
        self.compile_steps, self.compile_batches = tuple(compile_steps), tuple(compile_batches)
        self._compiled: dict[tuple[int, int], Any] = {}
        self._skips = 0

    def unavailable(self) -> str | None:
        if self.src.reason is not None:
            return self.src.reason
        if self.device != "cuda":
            return (f"torch.compile mode {self.mode!r} (CUDA graphs) needs a CUDA GPU; "
                    "skipped on the CPU")
        return None

    def supports(self, steps: int, batch: int) -> str | None:
        if steps not in self.compile_steps or batch not in self.compile_batches:
            return (f"not compiled at this size (--compile-steps "
                    f"{' '.join(map(str, self.compile_steps))}, --compile-batch "
                    f"{' '.join(map(str, self.compile_batches))})")
        return None

    def _compile(self, steps: int, batch: int) -> Any:
        import torch

        key = (steps, batch)
        if key in self._compiled:
            return self._compiled[key]
        torch._dynamo.reset()  # one code object compiled per config: no recompile limits
        compiled = torch.compile(self.loop(steps), mode=self.mode, fullgraph=True,
                                 dynamic=False)
        self._compiled = {key: compiled}  # keep one: earlier ones were reset anyway
        return compiled

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        import torch

        compiled = self._compile(steps, batch)
        labels, cond = self._labels(batch), self._cond(batch)
        device, dtype, work = self.device, self.dtype, self.work
        self._skips = _cudagraph_skips()

        def run(i: int) -> np.ndarray:
            x_T = work.noise(i % SEEDS, batch)
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                out: np.ndarray = compiled(torch.from_numpy(x_T).to(device, dtype),
                                           labels, cond).cpu().numpy()
            return out

        return run

    def verify(self, steps: int) -> None:
        if _cudagraph_skips() > self._skips and self.mode == "reduce-overhead":
            raise RuntimeError("inductor skipped CUDA graphs for this loop (run with "
                               "TORCH_LOGS=perf_hints to see why); not the intended baseline")

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        import torch

        compiled = self._compile(steps, batch)
        x = torch.from_numpy(self.work.noise(0, batch)).to(self.device, self.dtype)
        labels, cond = self._labels(batch), self._cond(batch)

        def run(_: int) -> None:
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                compiled(x, labels, cond)
            torch.cuda.synchronize()

        return run, ("the compiled whole loop (S forwards + DDIM math + uint8, one CUDA "
                     "graph replay) on device tensors, then torch.cuda.synchronize")


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:
        return 0


# ---------------------------------------------------------------------------------
# ONNX Runtime, one step at a time
# ---------------------------------------------------------------------------------


class OrtStepsPath(BenchPath):
    family = "baseline"
    path = "ort-steps"

    def __init__(self, art: BenchModel, backend: str, work: Workload,
                 threads: int | None) -> None:
        self.art, self.backend, self.work, self.threads = art, backend, work, threads
        self.device = "cpu" if backend == "ort-cpu" else "cuda"
        self.precision = art.precision
        self.name = f"ort-steps {self.device} {art.label}"
        onnx_file = art.denoiser_onnx()
        self.file = onnx_file
        self.model = str(onnx_file or art.path)
        self.session: Any = None

    def unavailable(self) -> str | None:
        reason = backends.availability().get(self.backend)
        if reason:
            return reason
        if self.file is None:
            return f"{self.art.path.name} has no denoiser ONNX graph"
        meta = self.art.graphs("denoiser", ".onnx")[0][1]
        if meta.graph.target == "ort-cuda" and self.backend != "ort-cuda":
            return VARIANT_ON_CUDA_ONLY
        if self.work.guidance is not None and not meta.graph.guidance:
            return "the denoiser graph was exported without --guidance"
        return None

    def load(self, steps: int, batch: int) -> float | None:
        if self.session is not None:
            return None
        import onnxruntime as ort

        from fewstep.runtime.backends.ort import PROVIDERS

        t0 = time.perf_counter()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.device == "cpu":
            # The thread count of fewstep's ort-cpu backend (all cores unless --threads):
            # the comparison is then about the loop, not the thread pool.
            so.intra_op_num_threads = self.threads or os.cpu_count() or 1
        providers = [PROVIDERS[self.backend]]
        if self.device != "cpu":
            providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(self.file), sess_options=so,
                                            providers=providers)
        if PROVIDERS[self.backend] not in self.session.get_providers():
            raise RuntimeError(f"onnxruntime fell back to {self.session.get_providers()}")
        return time.perf_counter() - t0

    def _fixed(self, batch: int) -> dict[str, np.ndarray]:
        meta = self.art.graphs("denoiser", ".onnx")[0][1]
        fixed: dict[str, np.ndarray] = dict(self.work.cond(batch))
        labels = self.work.labels(batch)
        if "label" in meta.graph.inputs:
            assert labels is not None
            fixed["label"] = labels.astype(np.int64)
        if "guidance" in meta.graph.inputs:
            g = 1.0 if self.work.guidance is None else self.work.guidance
            fixed["guidance"] = np.full(batch, g, np.float32)
        return fixed

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        plan = self.work.plan(steps)
        session, work = self.session, self.work
        out_name = [session.get_outputs()[0].name]
        fixed = self._fixed(batch)

        def denoise(x: np.ndarray, i: int) -> np.ndarray:
            t = np.full(batch, plan.timesteps[i], np.float32)
            out: np.ndarray = session.run(out_name, {"x": x, "t": t, **fixed})[0]
            return out

        def run(i: int) -> np.ndarray:
            x = np.asarray(sampling.run_loop(plan, denoise, work.noise(i % SEEDS, batch)),
                           dtype=np.float32)
            return images.to_uint8_nhwc(x) if work.meta.images else x

        return run

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        plan = self.work.plan(steps)
        session = self.session
        out_name = [session.get_outputs()[0].name]
        feeds = [{"x": self.work.noise(0, batch), "t": np.full(batch, t, np.float32),
                  **self._fixed(batch)} for t in plan.timesteps]

        def run(_: int) -> None:
            for f in feeds:
                session.run(out_name, f)

        return run, ("steps × InferenceSession.run with numpy in/out (host copies "
                     "included: that is this path)")

    def close(self) -> None:
        self.session = None
