"""The ``tensorrt`` backend: a TensorRT plan + its sidecar, driven with cuda-python.

Opening a plan reads ``model.plan.json``, refuses a plan that TensorRT-RTX built (before
TensorRT is imported: ``plan_check.engine_problem``), one built for another GPU or
TensorRT version, a replaced or a stale one (``plan_check.check_compatible``), then
deserializes it (``tensorrt``, or ``tensorrt_lean`` for a version-compatible plan) and
allocates once, at the profile's largest batch, device and pinned host buffers for every
I/O tensor (``tensorrt_engine.engine_io``, checked against ``meta.io``) and a stream.

* ``run(feeds)``: inputs are copied into pinned staging, then H2D, ``execute_async_v3``,
  D2H on one stream. The first call at a batch size runs plainly (the warm-up TensorRT
  asks for before capture); the next one captures H2D + enqueue + D2H into a CUDA graph
  for that batch size, on an execution context of its own whose shapes never change,
  and later calls only launch the graph. When capture fails the plan runs plainly.
* ``run_loop(x, fixed, per_step)`` (step plans): x stays on the device, ping-ponging
  between two buffers; each step's small inputs (t, a_t, a_prev, eta, noise) are
  staged for all steps at once. When the batch size and the step count repeat, the whole
  loop is captured into one CUDA graph.

Neither tensorrt nor cuda-python is imported until a plan is opened, so this module
imports anywhere (``backends.availability()`` asks it why it is unusable).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, BackendUnavailable
from ..meta import ModelMeta
from ..plan import BatchProfile, PlanSidecar, load_sidecar, sidecar_path
from ..plan_check import RuntimeInfo, check_compatible, engine_problem
from . import Array, Feeds, NetworkRun, check_launches, cuda, host_loop
from .tensorrt_engine import engine_io, import_tensorrt, make_logger, tensorrt_problem
from .tensorrt_io import PlanBuffers, Staging, free_staging

OPTIONS = ("device_id", "cuda_graph", "verbose", "check_source")
MAX_CAPTURED_BATCHES = 4  # CUDA graphs (one execution context each) kept per plan
MAX_CAPTURED_LOOPS = 2


def unavailable_reason(name: str = "tensorrt") -> str | None:
    """None when plans can run here, else why not (TensorRT, cuda-python or a GPU missing)."""
    problem = tensorrt_problem()
    if problem is not None:
        return problem
    try:
        cudart = cuda.import_cudart()
    except ImportError:
        return cuda.CUDA_PYTHON_MISSING
    try:
        count = cuda.device_count(cudart)
    except cuda.CudaError as e:
        return f"no usable CUDA GPU ({e})"
    if count < 1:
        return "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES?)"
    return None


def check_file(path: str) -> None:
    """Refuse a plan another engine built (TensorRT-RTX), whether TensorRT is here or not."""
    if not str(path).endswith(".plan") or not sidecar_path(path).is_file():
        return  # open_graph says what is wrong with it
    sidecar = load_sidecar(path)
    if sidecar.engine != TensorRTGraph.backend:
        wrong = engine_problem(sidecar, path, TensorRTGraph.backend, _gpu_here(None))
        raise ArtifactError(wrong or f"{path} was not built by TensorRT")


def _gpu_here(device_id: int | None) -> tuple[str, str] | None:
    """(name, compute capability) of the GPU, or None when cuda-python or a GPU is missing."""
    try:
        dev = cuda.device_info(cuda.import_cudart(), device_id)
    except Exception:  # only to say more in a refusal; any failure just says less
        return None
    return dev.name, dev.compute_capability


_LoopKey = tuple[int, int, tuple[str, ...]]  # (batch, steps, the per-step input names)


# ---------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------


class TensorRTGraph:
    """One TensorRT plan, ready to run; see the module docstring."""

    backend = "tensorrt"

    def __init__(self, plan_path: str, *, device_id: int | None = None, cuda_graph: bool = True,
                 verbose: bool = False, check_source: bool = True) -> None:
        self.path = str(plan_path)
        self._lock = threading.Lock()
        self._released = False
        self._contexts: list[Any] = []
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._io: PlanBuffers  # set once the plan is deserialized
        self._graphs: dict[int, cuda.CapturedGraph] = {}
        self._loop_graphs: dict[_LoopKey, cuda.CapturedGraph] = {}
        self._staging: dict[_LoopKey, Staging] = {}
        self._seen: set[int] = set()
        self._seen_loops: set[_LoopKey] = set()
        self._prepared: int | None = None  # the batch network_run left the context at

        self.sidecar: PlanSidecar = load_sidecar(plan_path)
        self.meta: ModelMeta = self.sidecar.meta
        self.profile: BatchProfile = self.sidecar.profile
        self.max_batch: int | None = self.profile.max
        self.cuda_graph = cuda_graph
        if self.sidecar.engine != self.backend:
            wrong = engine_problem(self.sidecar, plan_path, self.backend, _gpu_here(device_id))
            raise ArtifactError(wrong or f"{plan_path} was not built by TensorRT")

        trt, lean = import_tensorrt()
        cudart = cuda.import_cudart()
        self._trt, self._cudart = trt, cudart
        dev = cuda.device_info(cudart, device_id)
        here = RuntimeInfo(
            tensorrt_version=str(trt.__version__), gpu_name=dev.name,
            compute_capability=dev.compute_capability,
            cuda_runtime_version=dev.cuda_runtime_version, lean=lean,
        )
        check_compatible(self.sidecar, here, plan_path, check_source=check_source)

        self._logger = make_logger(trt, verbose)
        try:
            self._runtime = trt.Runtime(self._logger)
            if self.sidecar.version_compatible:
                # A version-compatible plan embeds (or needs) the lean runtime's host code;
                # the sidecar's sha256 has just vouched for this very file.
                self._runtime.engine_host_code_allowed = True
            self._engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self._engine is None:
                raise ArtifactError(
                    f"TensorRT {trt.__version__} could not deserialize {Path(plan_path).name} "
                    f"({self._errors()}); rebuild it with `fewstep build`"
                )
            self._io = PlanBuffers(cudart, self.meta, self.profile, self.path)
            self._context = self._new_context()
            self._io.allocate(engine_io(trt, self._engine, self._context, self.meta,
                                        self.profile.max, self.path, self._errors))
            self._bind(self._context)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------

    def _new_context(self) -> Any:
        ctx = self._engine.create_execution_context()
        if ctx is None:
            raise BackendUnavailable(
                f"TensorRT could not create an execution context for {self.path} "
                f"({self._errors()}; out of GPU memory?)"
            )
        self._contexts.append(ctx)
        return ctx

    def _drop_context(self, ctx: Any) -> None:
        self._contexts = [c for c in self._contexts if c is not ctx]

    def _bind(self, ctx: Any, overrides: dict[str, int] | None = None) -> None:
        for name, t in self._io.tensors.items():
            ptr = (overrides or {}).get(name, t.device.ptr)
            if not ctx.set_tensor_address(name, ptr):
                raise BackendUnavailable(
                    f"TensorRT refused the address of tensor {name!r}: {self._errors()}")

    def _set_shape(self, ctx: Any, name: str, shape: tuple[int, ...]) -> None:
        if not ctx.set_input_shape(name, shape):
            raise ValueError(
                f"input {name!r} shape {shape} is outside the plan's profile "
                f"(batch {self.profile}): {self._errors()}"
            )

    def _set_batch(self, ctx: Any, batch: int) -> None:
        for name, shape in self.meta.io.shapes(batch).items():
            self._set_shape(ctx, name, shape)

    def _errors(self) -> str:
        logger = getattr(self, "_logger", None)
        errors = getattr(logger, "errors", [])
        return "; ".join(errors[-3:]) or "see the TensorRT log above"

    # -- the Graph protocol ------------------------------------------------------------

    def run(self, feeds: Feeds) -> Array:
        """Host arrays in, the plan's single output back on the host."""
        g = self.meta.graph
        with self._lock:
            batch = self._stage_inputs(feeds)
            out = self._io.tensors[g.outputs[0]]
            graph = self._graphs.get(batch)
            if graph is None and self.cuda_graph and batch in self._seen:
                graph = self._capture_run(batch)
            if graph is not None:
                graph.launch(self._io.stream)
            else:
                self._prepared = None
                self._set_batch(self._context, batch)
                self._bind(self._context)
                self._io.copies_in(batch, g.inputs)
                self._enqueue(self._context)
                self._io.copy_out(out, batch)
                self._seen.add(batch)
            self._io.sync()
            return self._io.result(out, batch)

    def run_loop(self, x: Array, fixed: Feeds, per_step: Sequence[Feeds]) -> Array:
        """A step plan run once per entry of ``per_step`` with x kept on the device."""
        g = self.meta.graph
        out = self._io.tensors.get(g.outputs[0])
        xt = self._io.tensors.get("x")
        if (g.kind != "step" or not per_step or out is None or xt is None
                or out.dtype != xt.dtype or out.max_shape != xt.max_shape):
            return host_loop(self, x, fixed, per_step)
        with self._lock:
            self._check_open()
            step_names = tuple(per_step[0])
            if any(set(f) != set(step_names) for f in per_step):
                raise ValueError("every entry of per_step must feed the same inputs")
            batch = self._io.validate({"x": x, **fixed, **per_step[0]}, g.inputs)
            steps = len(per_step)
            key: _LoopKey = (batch, steps, tuple(sorted(step_names)))
            staging = self._staging.get(key)
            temporary = staging is None and len(self._staging) >= MAX_CAPTURED_LOOPS
            if staging is None:
                staging = self._io.new_staging(step_names, steps, batch)
                if not temporary:
                    self._staging[key] = staging
            try:
                self._io.stage("x", x, batch)
                for name, value in fixed.items():
                    self._io.stage(name, value, batch)
                for i, feeds in enumerate(per_step):
                    for name in step_names:
                        arr = self._io.checked(name, feeds[name], batch)
                        staging[name][0].view(arr.dtype, arr.shape,
                                              i * self._io.nbytes(name, batch))[...] = arr
                loop = self._loop_graphs.get(key)
                if loop is None and self.cuda_graph and key in self._seen_loops and (
                    not temporary
                ):
                    loop = self._capture_loop(key, step_names, tuple(fixed), staging)
                if loop is not None:
                    loop.launch(self._io.stream)
                else:
                    self._prepared = None
                    self._device_loop(self._context, batch, steps, step_names, tuple(fixed),
                                      staging)
                    self._bind(self._context)
                    self._seen_loops.add(key)
                self._io.sync()
                return self._io.result(xt if steps % 2 == 0 else out, batch)
            finally:
                if temporary:
                    self._io.sync()
                    free_staging(staging)

    def network_run(self, feeds: Feeds, launches: int = 1) -> NetworkRun:
        """The engine alone on ``feeds``: see ``backends.Graph.network_run``.

        The inputs are copied to the plan's device buffers once; each call sets the
        shapes and addresses again only if ``run``/``run_loop`` changed them meanwhile.
        """
        check_launches(launches)
        g = self.meta.graph
        with self._lock:
            batch = self._stage_inputs(feeds)
            self._set_batch(self._context, batch)
            self._bind(self._context)
            self._io.copies_in(batch, g.inputs)
            self._io.sync()
            self._prepared = batch
        ctx = self._context

        def call() -> None:
            with self._lock:
                self._check_open()
                if self._prepared != batch:
                    self._set_batch(ctx, batch)
                    self._bind(ctx)
                    self._prepared = batch
                for _ in range(launches):
                    self._enqueue(ctx)
                self._io.sync()

        return NetworkRun(call, f"{launches} × execute_async_v3 on the plan's device buffers, "
                                "then cudaStreamSynchronize")

    # -- plumbing ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._released:
            raise ValueError(f"{self.path} was closed; open it again with backends.load")

    def _stage_inputs(self, feeds: Feeds) -> int:
        """``PlanBuffers.stage_inputs`` on an open plan; called with the lock held."""
        self._check_open()
        return self._io.stage_inputs(feeds)

    def _enqueue(self, ctx: Any) -> None:
        if not ctx.execute_async_v3(int(self._io.stream)):
            raise RuntimeError(f"TensorRT execute_async_v3 failed: {self._errors()}")

    # -- CUDA graphs -----------------------------------------------------------------------

    def _capture(self, body: Callable[[], None]) -> Any:
        """``cuda.capture_graph`` on this plan's stream; None (and no more graphs) on failure."""
        exec_, error = cuda.capture_graph(self._cudart, self._io.stream, body)
        if error is not None:
            return self._no_graphs(error)
        return exec_

    def _no_graphs(self, why: Exception) -> None:
        self.cuda_graph = False
        cuda.warn_no_cuda_graph(self.path, why, stacklevel=5)

    def _capture_run(self, batch: int) -> cuda.CapturedGraph | None:
        if len(self._graphs) >= MAX_CAPTURED_BATCHES:
            return None
        ctx = self._new_context()  # its shapes stay at `batch` for the graph's lifetime
        self._set_batch(ctx, batch)
        self._bind(ctx)
        self._enqueue(ctx)  # TensorRT needs one enqueue after a shape change before capture
        self._io.sync()
        out = self._io.tensors[self.meta.graph.outputs[0]]

        def body() -> None:
            self._io.copies_in(batch, self.meta.graph.inputs)
            self._enqueue(ctx)
            self._io.copy_out(out, batch)

        exec_ = self._capture(body)
        if exec_ is None:
            self._drop_context(ctx)
            return None
        self._graphs[batch] = graph = cuda.CapturedGraph(self._cudart, exec_, ctx)
        return graph

    # -- the device-resident loop ----------------------------------------------------------

    def _device_loop(self, ctx: Any, batch: int, steps: int, step_names: Sequence[str],
                     fixed_names: Sequence[str], staging: Staging) -> None:
        """H2D of x, fixed and every step's inputs; the steps with x ping-ponging between
        the x and output buffers (step i reads buffer i % 2); D2H of the final x."""
        out_name = self.meta.graph.outputs[0]
        xt, out = self._io.tensors["x"], self._io.tensors[out_name]
        assert xt.device.ptr is not None and out.device.ptr is not None
        self._set_batch(ctx, batch)
        self._io.copies_in(batch, ("x", *fixed_names))
        for name in step_names:
            host, dev = staging[name]
            assert host.ptr is not None and dev.ptr is not None
            self._io.memcpy(dev.ptr, host.ptr, steps * self._io.nbytes(name, batch), True)
        buffers = (xt.device.ptr, out.device.ptr)
        for i in range(steps):
            addresses = {"x": buffers[i % 2], out_name: buffers[(i + 1) % 2]}
            for name in step_names:
                dev_ptr = staging[name][1].ptr
                assert dev_ptr is not None
                addresses[name] = dev_ptr + i * self._io.nbytes(name, batch)
            self._bind(ctx, addresses)
            self._enqueue(ctx)
        final = xt if steps % 2 == 0 else out
        self._io.copy_out(final, batch, src=buffers[steps % 2])

    def _capture_loop(self, key: _LoopKey, step_names: Sequence[str],
                      fixed_names: Sequence[str], staging: Staging) -> cuda.CapturedGraph | None:
        batch, steps, _ = key
        ctx = self._new_context()
        self._set_batch(ctx, batch)
        self._bind(ctx)
        self._enqueue(ctx)  # warm-up after the shape change, before capture
        self._io.sync()
        exec_ = self._capture(
            lambda: self._device_loop(ctx, batch, steps, step_names, fixed_names, staging)
        )
        if exec_ is None:
            self._drop_context(ctx)
            return None
        self._loop_graphs[key] = graph = cuda.CapturedGraph(self._cudart, exec_, ctx)
        return graph

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Free graphs, contexts, engine, buffers and the stream. Safe to call twice."""
        if getattr(self, "_released", True):
            return
        with self._lock:
            self._released = True
            io = getattr(self, "_io", None)
            if io is not None and io.stream is not None:
                with contextlib.suppress(Exception):
                    io.sync()
            for graph in [*self._graphs.values(), *self._loop_graphs.values()]:
                graph.free()
            for staging in self._staging.values():
                free_staging(staging)
            self._graphs, self._loop_graphs, self._staging = {}, {}, {}
            # TensorRT objects go in order: contexts, engine, runtime.
            self._contexts, self._context = [], None
            self._engine = None
            self._runtime = None
            if io is not None:
                io.free()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> TensorRTGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_graph(path: str, name: str = "tensorrt", **options: Any) -> TensorRTGraph:
    """Open a ``.plan`` (with its ``.plan.json`` sidecar) for the ``tensorrt`` backend.

    Options: ``device_id`` (GPU index), ``cuda_graph`` (default True), ``verbose``,
    ``check_source`` (compare the source ONNX's hashes with the sidecar; default True).
    """
    if name != "tensorrt":
        raise ValueError(f"backend {name!r} is not the tensorrt backend")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} not supported by backend {name!r}; "
                         f"use {', '.join(OPTIONS)}")
    if not str(path).endswith(".plan"):
        raise ArtifactError(
            f"{path!r} is not a TensorRT plan (.plan); build one with "
            f"`fewstep build MODEL.onnx --out MODEL.plan`, or open the ONNX with backend 'ort'"
        )
    if not Path(path).is_file():
        raise ArtifactError(f"plan file {path!r} does not exist; build it with `fewstep build`")
    return TensorRTGraph(path, **options)
