"""Triton Inference Server, Python backend: fewstep's DDIM loop at any step count.

``fewstep export --triton DIR`` copies this file unchanged to
``DIR/<name>_ddim/1/model.py``, beside the step graph (``model.step.onnx``; the
denoiser ``model.onnx`` when the artifact has no step graph) and its weights file.
Triton's Python backend imports it and calls ``TritonPythonModel``; everything it
computes is in the plain functions ``generate_rows`` and ``run_requests``, which the
tests compare with ``fewstep.runtime.Pipeline``.

The Python environment Triton runs this file in needs numpy and fewstep's runtime with
ONNX Runtime (``pip install --no-deps fewstep`` plus ``numpy pillow onnxruntime-gpu``
in the server image; see the README). Nothing here imports torch.

A request asks for one sample per row; every input has the batch dimension first:

==========  =======  ===============================================================
input       type     meaning (default when the input is left out)
==========  =======  ===============================================================
seed        INT64    required, dims [1]: row r draws its noise from stream (seed, r),
                     exactly as sample r of ``fewstep sample --seed SEED`` does
label       INT64    dims [1]: class index (r % num_classes); class-conditional models
COND        its own  required, one per conditioning input of the model, named as in its
                     metadata (``fewstep info``): FP32 or INT64, dims its shape ([1] for
                     a scalar), e.g. ``global_cond`` FP32 [36]
guidance    FP32     dims [1]: classifier-free guidance scale (1 = none); guidance graphs
steps       INT64    dims [1]: DDIM steps (the ``default_steps`` parameter of config.pbtxt)
eta         FP32     dims [1]: 0 = deterministic DDIM ... 1 = ancestral noise (0)
==========  =======  ===============================================================

The response holds ``image``: UINT8 (H, W, C) for an image model, else ``x0``: FP32
(*sample_shape), the final samples in model space (``output_spec``). A request whose
rows all carry seed S, labels L, conditioning C and guidance G gets what
``Pipeline.generate(n, steps, eta, S, L, G, cond=C)`` returns (up to ONNX Runtime's
float rounding on another device). Triton's dynamic batcher hands several requests to
``execute`` at once: their rows run through the graph together, grouped by (steps,
eta), at most ``max_batch_size`` rows per run.

Tensors cross into and out of the backend through DLPack, not ``as_numpy()`` /
``Tensor(name, array)``: those go through the pybind11 NumPy API the backend stub was
compiled with, and a stub built against NumPy 1.x misreads NumPy 2 arrays (inputs
arrive with wrong values, outputs with zero bytes). DLPack reads the same under both.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fewstep.runtime import backends, ddim, sampling
from fewstep.runtime import noise as host_noise
from fewstep.runtime.backends import Array, Graph
from fewstep.runtime.clitools import plural
from fewstep.runtime.errors import ArtifactError, NumericalError
from fewstep.runtime.images import to_uint8_nhwc
from fewstep.runtime.meta import CondSpec, ModelMeta
from fewstep.runtime.sampling import SamplingPlan

try:  # present only inside Triton's Python backend
    import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - imported by tests and tools outside Triton
    pb_utils = None

INPUTS = ("seed", "label", "guidance", "steps", "eta")  # besides the conditioning inputs
TYPE_NAMES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
U8 = NDArray[np.uint8]


def output_spec(meta: ModelMeta) -> tuple[str, type[np.generic], tuple[int, ...]]:
    """The response's one output: name, dtype and dims of one row (no batch axis)."""
    if meta.images:
        c, h, w = meta.image_shape
        return "image", np.uint8, (h, w, c)
    return "x0", np.float32, tuple(meta.sample_shape)


def request_inputs(meta: ModelMeta) -> tuple[str, ...]:
    """Every input a request to this model may carry, conditioning inputs included."""
    return (*INPUTS, *(c.name for c in meta.cond))


def name_clashes(meta: ModelMeta) -> list[str]:
    """Conditioning inputs named like one of the model's own request inputs."""
    return [c.name for c in meta.cond if c.name in INPUTS]


@dataclass(frozen=True)
class Defaults:
    """The config.pbtxt parameters: what a left-out input means."""

    steps: int = 4
    spacing: str = sampling.DEFAULT_SPACING


def generate_rows(graph: Graph, seeds: Sequence[int], indices: Sequence[int],
                  labels: NDArray[np.int64] | None, guidance: NDArray[np.float32] | None,
                  steps: int, eta: float, spacing: str,
                  cond: Mapping[str, Array] | None = None) -> Array:
    """Rows (seed, index) through the DDIM loop over ``graph``: images (n, H, W, C)
    uint8 of an image model, else the final samples (n, *sample_shape) float32.
    ``cond``: {name: (n, *shape)} for each conditioning input of the model.

    ``graph`` is a step graph (DDIM update inside, ``run_loop`` keeps x on the device)
    or a denoiser graph (update on the host, ``sampling.run_loop``). Row i starts from
    ``noise.generation_noise(seeds[i], [indices[i]])``, the noise the Pipeline gives
    image ``indices[i]`` of seed ``seeds[i]``.
    """
    meta = graph.meta
    g = meta.graph
    n = len(seeds)
    if g.kind == "sampler":
        raise ArtifactError(f"{graph.path} is a fused sampler graph; the Python model drives "
                            "a step or denoiser graph (serve samplers as onnxruntime models)")
    plan = SamplingPlan.create(meta, steps, spacing, eta)
    shape = meta.sample_shape
    x_T = np.empty((n, *shape), np.float32)  # (B, *sample_shape)
    step_noise = (np.empty((n, plan.steps, *shape), np.float32)
                  if plan.stochastic else None)  # (B, S, *sample_shape)
    for row, (seed, index) in enumerate(zip(seeds, indices, strict=True)):
        x, s = host_noise.generation_noise(int(seed), range(int(index), int(index) + 1),
                                           shape, plan.steps if plan.stochastic else 0)
        x_T[row] = x[0]
        if step_noise is not None and s is not None:
            step_noise[row] = s[0]
    extra: dict[str, Array] = {}
    inputs = meta.io.inputs  # names and dtypes of the graph's conditioning inputs
    if "label" in inputs:
        if labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        extra["label"] = np.ascontiguousarray(labels, dtype=inputs["label"].dtype)
    for spec in meta.cond:
        value = (cond or {}).get(spec.name)
        if value is None:
            raise ValueError(f"this model is conditioned on {spec.name!r}: pass cond")
        extra[spec.name] = np.ascontiguousarray(value, dtype=spec.np_dtype)
    if "guidance" in inputs:
        dtype = inputs["guidance"].dtype
        extra["guidance"] = (np.ones(n, dtype) if guidance is None
                             else np.ascontiguousarray(guidance, dtype=dtype))
    if g.kind == "step":
        fixed: dict[str, Array] = {**extra, "eta": np.full(n, plan.eta, np.float32)}
        if step_noise is None:
            fixed["noise"] = np.zeros_like(x_T)
        per_step: list[dict[str, Array]] = []
        for i in range(plan.steps):
            feeds: dict[str, Array] = {
                "t": np.full(n, plan.timesteps[i], np.float32),
                "a_t": np.full(n, plan.a_t[i], np.float32),
                "a_prev": np.full(n, plan.a_prev[i], np.float32),
            }
            if step_noise is not None:
                feeds["noise"] = np.ascontiguousarray(step_noise[:, i])
            per_step.append(feeds)
        y = np.asarray(graph.run_loop(x_T, fixed, per_step), dtype=np.float32)
    else:
        def denoise(x: Array, i: int) -> Array:
            t = np.full(n, plan.timesteps[i], np.float32)
            return np.asarray(graph.run({"x": np.ascontiguousarray(x, np.float32), "t": t,
                                         **extra}), dtype=np.float32)

        y = np.asarray(sampling.run_loop(plan, denoise, x_T, step_noise), dtype=np.float32)
    if not np.all(np.isfinite(y)):
        raise NumericalError(f"{Path(graph.path).name} produced NaN/Inf in "
                             f"{plural(plan.steps, 'step')}; export with --precision fp32")
    return to_uint8_nhwc(y) if meta.images else y


def _column(name: str, value: Array | None, n: int | None) -> Array | None:
    """A (B, 1) or (B,) input as a (B,) array; its B must match the others'."""
    if value is None:
        return None
    a = np.asarray(value)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"input {name!r} has shape {list(np.shape(value))}; pass one value "
                         f"per row: shape [{n if n is not None else 'n'}, 1]")
    return a


def check_request(graph: Graph, request: Mapping[str, Array | None],
                  defaults: Defaults) -> dict[str, Any]:
    """One request's rows as per-row arrays, validated; ValueError says what is wrong."""
    meta = graph.meta
    allowed = request_inputs(meta)
    unknown = sorted(k for k, v in request.items() if v is not None and k not in allowed)
    if unknown:
        raise ValueError(f"unknown input(s) {unknown}; this model takes {list(allowed)}")
    seed = _column("seed", request.get("seed"), None)
    if seed is None:
        raise ValueError("input 'seed' is required (one INT64 per image row)")
    n = seed.shape[0]
    if n < 1:
        raise ValueError("the request has no rows; pass one seed per image")
    cols = {k: _column(k, request.get(k), n) for k in INPUTS[1:]}
    seeds = seed.astype(np.int64)
    if np.any(seeds < 0):
        raise ValueError(f"seed {int(seeds.min())} is negative; pass seeds in 0..2**63-1")
    label = cols["label"]
    if meta.conditional:
        labels = (np.arange(n, dtype=np.int64) % meta.num_classes if label is None
                  else label.astype(np.int64))
        bad = labels[(labels < 0) | (labels >= meta.num_classes)]
        if bad.size:
            raise ValueError(f"label {int(bad[0])} is outside the model's classes "
                             f"0..{meta.num_classes - 1}")
    elif label is not None:
        raise ValueError("this model is unconditional; leave the 'label' input out")
    else:
        labels = None
    guidance = cols["guidance"]
    if guidance is not None:
        if not meta.graph.guidance:
            raise ValueError("guidance needs a graph exported with --guidance; leave it out")
        guidance = guidance.astype(np.float32)
        bad_g = guidance[~(np.isfinite(guidance) & (guidance >= 0) & (guidance <= 50))]
        if bad_g.size:
            raise ValueError(f"guidance {float(bad_g[0])} is outside [0, 50]; pass a finite "
                             "scale (1 = no guidance)")
    steps = (np.full(n, defaults.steps, np.int64) if cols["steps"] is None
             else cols["steps"].astype(np.int64))
    T = meta.schedule.num_train_timesteps
    bad_s = steps[(steps < 1) | (steps > T)]
    if bad_s.size:
        raise ValueError(f"steps {int(bad_s[0])} is outside 1..{T} (num_train_timesteps of "
                         f"the model); pass steps in 1..{T}")
    eta = np.zeros(n, np.float32) if cols["eta"] is None else cols["eta"].astype(np.float32)
    ddim.check_eta(eta)
    cond = {spec.name: _cond_input(spec, request.get(spec.name), n) for spec in meta.cond}
    return {"seed": seeds, "label": labels, "guidance": guidance, "steps": steps, "eta": eta,
            "cond": cond}


def _cond_input(spec: CondSpec, value: Array | None, n: int) -> Array:
    """One conditioning input of a request as (n, *spec.shape) of its dtype."""
    kind = TYPE_NAMES[np.dtype(spec.np_dtype)]
    dims = list(spec.shape) or [1]
    if value is None:
        raise ValueError(f"input {spec.name!r} is required: this model is conditioned on it "
                         f"({kind}, dims {dims}, one value per row)")
    a = np.asarray(value)
    if a.dtype.kind not in ("f" if spec.dtype == "float32" else "iu"):
        raise ValueError(f"input {spec.name!r} is {a.dtype}; pass {kind} values")
    if not spec.shape and a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape != (n, *spec.shape):
        raise ValueError(f"input {spec.name!r} has shape {list(np.shape(value))}; pass one "
                         f"value of dims {dims} per row: shape [{', '.join(map(str, [n, *dims]))}]")
    if spec.dtype == "float32" and not np.all(np.isfinite(a)):
        raise ValueError(f"input {spec.name!r} holds NaN or Inf; pass finite values")
    return np.ascontiguousarray(a, dtype=spec.np_dtype)


def run_requests(graph: Graph, requests: Sequence[Mapping[str, Array | None]],
                 defaults: Defaults, max_batch: int) -> list[Array | Exception]:
    """Every request's output (``output_spec``: images (n, H, W, C) uint8 or samples
    (n, *sample_shape) float32), or the error that request gets.

    Rows of all valid requests are grouped by (steps, eta) and run at most
    ``max_batch`` at a time; row r of a request uses noise index r.
    """
    results: list[Array | Exception] = []
    rows: dict[tuple[int, float], list[tuple[int, int, dict[str, Any]]]] = {}
    _, out_dtype, out_dims = output_spec(graph.meta)
    for q, request in enumerate(requests):
        try:
            cols = check_request(graph, request, defaults)
        except ValueError as e:
            results.append(e)
            continue
        n = len(cols["seed"])
        results.append(np.empty((n, *out_dims), out_dtype))
        for r in range(n):
            key = (int(cols["steps"][r]), float(cols["eta"][r]))
            rows.setdefault(key, []).append((q, r, cols))
    for (steps, eta), members in rows.items():
        for lo in range(0, len(members), max(1, max_batch)):
            chunk = members[lo:lo + max(1, max_batch)]
            labels = (None if chunk[0][2]["label"] is None
                      else np.array([m[2]["label"][m[1]] for m in chunk], np.int64))
            guidance = (None if "guidance" not in graph.meta.graph.inputs else np.array(
                [1.0 if m[2]["guidance"] is None else m[2]["guidance"][m[1]] for m in chunk],
                np.float32))
            cond = {spec.name: np.stack([m[2]["cond"][spec.name][m[1]] for m in chunk])
                    for spec in graph.meta.cond}
            try:
                samples = generate_rows(graph, [int(m[2]["seed"][m[1]]) for m in chunk],
                                        [m[1] for m in chunk], labels, guidance, steps, eta,
                                        defaults.spacing, cond)
            except (ValueError, ArtifactError, NumericalError) as e:
                for q, _, _ in chunk:
                    results[q] = e
                continue
            for (q, r, _), sample in zip(chunk, samples, strict=True):
                out = results[q]
                if not isinstance(out, Exception):
                    out[r] = sample
    return results


_DLTENSOR: Any = b"dltensor"  # module constants: a capsule keeps a pointer to its name
_USED_DLTENSOR: Any = b"used_dltensor"
_capsule_get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))
_capsule_rename = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_SetName", ctypes.pythonapi))
_capsule_new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p,
                                 ctypes.c_void_p)(("PyCapsule_New", ctypes.pythonapi))


def dlpack_capsule(array: Array) -> Any:
    """A DLPack capsule of ``array`` (C-contiguous) that the backend takes over.

    The backend marks a capsule it consumed with a name NumPy's capsule destructor does
    not know ("used_dlpack"), so NumPy's own capsule would report an error for every
    response. The managed tensor goes into a capsule without a destructor instead, and
    NumPy's capsule is marked used, as the DLPack protocol asks of a consumer. The
    backend calls the tensor's deleter when it has copied the data, which releases the
    array.
    """
    own = np.ascontiguousarray(array).__dlpack__()
    pointer = _capsule_get(own, _DLTENSOR)
    _capsule_rename(own, _USED_DLTENSOR)
    return _capsule_new(pointer, _DLTENSOR, None)


def input_array(tensor: Any) -> Array:
    """A request input as a NumPy array (a copy: the request's memory is the server's)."""
    return np.array(np.from_dlpack(tensor))


def graph_backend(kind: str, device_id: int, backend: str,
                  path: str) -> tuple[str, dict[str, Any]]:
    """The fewstep backend name and options for a Triton instance of ``kind``.

    ``auto``: ONNX Runtime CUDA on a KIND_GPU instance's GPU when onnxruntime-gpu is
    installed (else CPU, so the model still loads), ONNX Runtime CPU on KIND_CPU.
    """
    if backend == "auto":
        backend = backends.resolve("auto", path) if kind == "GPU" else "ort-cpu"
    return backend, ({} if backend == "ort-cpu" else {"device_id": device_id})


class TritonPythonModel:
    """The Python-backend entry points: initialize, execute, finalize."""

    graph: Graph | None = None

    def initialize(self, args: Mapping[str, str]) -> None:
        if pb_utils is None:
            raise RuntimeError("TritonPythonModel runs inside Triton's Python backend only")
        config = json.loads(args["model_config"])
        params = {k: str(v.get("string_value", ""))
                  for k, v in config.get("parameters", {}).items()}
        path = str(Path(__file__).resolve().parent / params["graph"])
        backend, options = graph_backend(args.get("model_instance_kind", "CPU"),
                                         int(args.get("model_instance_device_id", 0) or 0),
                                         params.get("backend", "auto"), path)
        self.graph = backends.load(path, backend, **options)
        self.defaults = Defaults(steps=int(params.get("default_steps", 4)),
                                 spacing=params.get("spacing", sampling.DEFAULT_SPACING))
        self.max_batch = int(config.get("max_batch_size", 0)) or 16

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        assert self.graph is not None and pb_utils is not None
        arrays: list[dict[str, Array | None]] = []
        names = request_inputs(self.graph.meta)
        output = output_spec(self.graph.meta)[0]
        for request in requests:
            feeds: dict[str, Array | None] = {}
            for name in names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                feeds[name] = None if tensor is None else input_array(tensor)
            arrays.append(feeds)
        responses = []
        for result in run_requests(self.graph, arrays, self.defaults, self.max_batch):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor.from_dlpack(output,
                                                                dlpack_capsule(result))]))
        return responses

    def finalize(self) -> None:
        self.graph = None
