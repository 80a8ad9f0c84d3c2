"""Roofline: work per network evaluation counted from the ONNX graph, and device ceilings.

``count(model, batch)`` runs ONNX shape inference with a concrete batch and counts

* matrix FLOPs: Conv / ConvTranspose / NhwcConv / MatMul / Gemm, 2 × multiply-adds
  (bias additions not counted);
* elementwise FLOPs: 1 per output element of elementwise, activation, normalisation,
  softmax and reduction nodes (reported separately);
* bytes: the weights once (initializers and Constant tensors), plus either every node's
  non-weight inputs and outputs (``bytes_max``: what unfused execution moves, an upper
  bound) or only the graph inputs and outputs (``bytes_min``: the least any
  implementation must move).

Nodes whose shapes inference cannot tell (custom-domain fused ops, for example) are
listed in ``unknown`` and counted as zero, so a non-empty list means "at least".

``measure_gpu`` times an 8192³ bf16 and fp32 matrix product and a ~2 GiB device-to-
device copy (1 GiB read + 1 GiB written) with CUDA events after warm-up, on random
data; ``measure_cpu`` a numpy float32 matrix product and a memcpy with perf_counter.
The floor of one step is max(FLOPs / matrix rate, bytes_min / copy bandwidth), with
the bf16 rate for fp16 rows and the fp32 rate for fp32 rows; each row's
``floor_fraction`` is floor / measured time per step (1.0 = at the roofline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

MATRIX_OPS: Final = ("Conv", "ConvTranspose", "NhwcConv", "MatMul", "Gemm", "FusedMatMul",
                     "FusedConv")
ELEMENTWISE_OPS: Final = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Neg", "Abs",
    "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "Erf", "Softplus",
    "HardSigmoid", "HardSwish", "Mish", "Sin", "Cos", "Clip", "Min", "Max", "Round", "Floor",
    "Ceil", "Where", "Equal", "Less", "Greater", "Not", "And", "Or", "Mod", "Sign",
    "Softmax", "LogSoftmax", "InstanceNormalization", "GroupNormalization",
    "LayerNormalization", "BatchNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "GroupNorm", "SkipGroupNorm", "BiasAdd", "BiasGelu",
    "FastGelu", "QuickGelu", "BiasSplitGelu", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceProd", "CumSum",
})


@dataclass(frozen=True)
class GraphCost:
    batch: int
    matmul_flops: int
    elementwise_flops: int
    weight_bytes: int
    activation_bytes: int  # Σ non-weight inputs + outputs of every node
    io_bytes: int          # graph inputs + outputs
    nodes: int
    unknown: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.elementwise_flops

    @property
    def bytes_min(self) -> int:
        return self.weight_bytes + self.io_bytes

    @property
    def bytes_max(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(flops=self.flops, bytes_min=self.bytes_min, bytes_max=self.bytes_max,
                 unknown=list(self.unknown))
        return d


def _itemsize(elem_type: int) -> int:
    import onnx

    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _with_batch(model: Any, batch: int) -> Any:
    """A copy of ``model`` whose graph inputs have batch ``batch`` and no stale shapes."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    del m.graph.value_info[:]
    for out in m.graph.output:
        out.type.tensor_type.ClearField("shape")
    return m


def portable_twin(path: Path) -> Path:
    """The portable graph beside an ORT-CUDA variant graph (model.ort-cuda.step.onnx →
    model.step.onnx), whose FLOPs and bytes are the same computation's and which ONNX's
    shape inference can follow (it knows no com.microsoft op); else ``path`` itself."""
    marker = ".ort-cuda"
    if marker not in path.name:
        return path
    from fewstep.runtime.artifact import contained_file, read_onnx_meta

    twin = path.with_name(path.name.replace(marker, "", 1))
    try:
        if read_onnx_meta(path).graph.target != "ort-cuda":
            return path
        found = contained_file(path.parent, twin.name, "portable graph", must_exist=False)
    except Exception:  # unreadable, or a twin outside the folder: counted as it is
        return path
    return twin if found.is_file() else path


def count(model: str | Path | Any, batch: int) -> GraphCost:
    """The cost of one evaluation of ``model`` (a path or a ModelProto) at ``batch``; an
    ORT-CUDA variant graph is counted on its portable twin (``portable_twin``)."""
    import onnx

    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    if isinstance(model, (str, Path)):
        model = portable_twin(Path(model))
    proto = onnx.load(str(model), load_external_data=False) if isinstance(
        model, (str, Path)) else model
    inferred = onnx.shape_inference.infer_shapes(_with_batch(proto, batch), check_type=False,
                                                 strict_mode=False, data_prop=True)
    g = inferred.graph
    shapes: dict[str, tuple[tuple[int, ...] | None, int]] = {}

    def put(vi: Any) -> None:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            shapes[vi.name] = (None, tt.elem_type)
            return
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        shapes[vi.name] = (None if any(d < 0 for d in dims) else dims, tt.elem_type)

    for vi in [*g.input, *g.value_info, *g.output]:
        put(vi)
    weights: set[str] = set()
    weight_bytes = 0
    for init in g.initializer:
        shapes[init.name] = (tuple(init.dims), init.data_type)
        weights.add(init.name)
        weight_bytes += _prod(init.dims) * _itemsize(init.data_type)
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    shapes[node.output[0]] = (tuple(attr.t.dims), attr.t.data_type)
                    weight_bytes += _prod(attr.t.dims) * _itemsize(attr.t.data_type)
            weights.update(node.output)

    def nbytes(name: str) -> int | None:
        shape, elem = shapes.get(name, (None, 0))
        return None if shape is None else _prod(shape) * _itemsize(elem)

    matmul = elementwise = activations = 0
    unknown: list[str] = []
    for node in g.node:
        if node.op_type == "Constant":
            continue
        op = node.op_type
        out_shape = shapes.get(node.output[0], (None, 0))[0] if node.output else None
        if op in MATRIX_OPS or op in ELEMENTWISE_OPS:
            macs = _node_macs(node, shapes, out_shape) if op in MATRIX_OPS else None
            if out_shape is None or (op in MATRIX_OPS and macs is None):
                unknown.append(f"{op} {node.name or node.output[0]}")
            elif op in MATRIX_OPS:
                assert macs is not None
                matmul += 2 * macs
            else:
                elementwise += _prod(out_shape)
        for name in [*node.input, *node.output]:
            if not name or name in weights:
                continue
            b = nbytes(name)
            if b is None:
                if op in MATRIX_OPS or op in ELEMENTWISE_OPS:
                    continue  # already listed as unknown
                unknown.append(f"{op} {node.name or node.output[0]} (bytes)")
            else:
                activations += b
    io = sum(nbytes(v.name) or 0 for v in [*g.input, *g.output] if v.name not in weights)
    return GraphCost(batch, matmul, elementwise, weight_bytes, activations, io, len(g.node),
                     tuple(dict.fromkeys(unknown)))


def _node_macs(node: Any, shapes: dict[str, tuple[tuple[int, ...] | None, int]],
               out: tuple[int, ...] | None) -> int | None:
    def shape(i: int) -> tuple[int, ...] | None:
        return shapes.get(node.input[i], (None, 0))[0] if len(node.input) > i else None

    if out is None:
        return None
    op = node.op_type
    if op in ("Conv", "NhwcConv", "FusedConv"):
        w = shape(1)  # (Cout, Cin/group, *kernel) — NhwcConv: (Cout, *kernel, Cin/group)
        return None if w is None else _prod(out) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)  # w: (Cin, Cout/group, *kernel)
        return None if x is None or w is None else _prod(x) * _prod(w[1:])
    if op in ("MatMul", "FusedMatMul"):
        a = shape(0)
        if a is None:
            return None
        trans = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[-2] if trans and len(a) >= 2 else a[-1]
        return _prod(out) * k
    if op == "Gemm":
        a = shape(0)
        if a is None or len(a) != 2:
            return None
        trans = any(at.name == "transA" and at.i for at in node.attribute)
        return _prod(out) * (a[0] if trans else a[1])
    return None


# ---------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------


def measure_gpu(size: int = 8192, copy_bytes: int = 1 << 30, warmup: int = 3,
                reps: int = 10) -> dict[str, Any]:
    """Matrix-product (bf16, fp32) and copy ceilings of the current CUDA device (torch)."""
    import torch

    def median_ms(fn: Any) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "clock": "cuda-events",
                           "method": f"median of {reps} after {warmup} warm-up, random data",
                           "matmul_size": size, "copy_bytes": 2 * copy_bytes}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        c = torch.empty(size, size, device="cuda", dtype=dtype)
        ms = median_ms(lambda a=a, b=b, c=c: torch.matmul(a, b, out=c))
        out[f"matmul_{name}_tflops"] = 2 * size**3 / (ms * 1e-3) / 1e12
        del a, b, c
    out["fp32_matmul_allows_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    src = torch.rand(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda s=src, d=dst: d.copy_(s))
    out["copy_gbps"] = 2 * copy_bytes / (ms * 1e-3) / 1e9  # bytes read + bytes written
    del src, dst
    torch.cuda.empty_cache()
    return out


def measure_cpu(size: int = 2048, copy_bytes: int = 256 << 20, reps: int = 5) -> dict[str, Any]:
    """numpy float32 matrix product and memcpy ceilings of this CPU (perf_counter)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)

    def median_s(fn: Any) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    s = median_s(lambda: a @ b)
    src = rng.integers(0, 255, copy_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    c = median_s(lambda: np.copyto(dst, src))
    return {"device": "cpu", "clock": "perf_counter",
            "method": f"median of {reps} after 1 warm-up, random data",
            "matmul_size": size, "copy_bytes": 2 * copy_bytes,
            "matmul_fp32_tflops": 2 * size**3 / s / 1e12,
            "copy_gbps": 2 * copy_bytes / c / 1e9}


# ---------------------------------------------------------------------------------
# Per-row floors
# ---------------------------------------------------------------------------------


class Roofline:
    """Costs per (precision, batch) from the artifacts' denoiser graphs, the ceilings,
    and ``annotate(row)``: the floor of one step and the fraction of it the row reaches."""

    def __init__(self) -> None:
        self.costs: dict[tuple[str, int], GraphCost] = {}
        self.sources: dict[str, str] = {}
        self.ceilings: dict[str, dict[str, Any] | None] = {}
        self.notes: list[str] = []

    def count_graphs(self, graphs: Sequence[tuple[str, Path]], batches: Sequence[int]) -> None:
        """``graphs``: (precision, denoiser .onnx); the first of each precision is used."""
        for precision, path in graphs:
            if precision in self.sources:
                continue
            try:
                for b in batches:
                    self.costs[(precision, b)] = count(path, b)
            except Exception as e:
                self.notes.append(f"cannot count {path.name}: {type(e).__name__}: {e}")
                continue
            self.sources[precision] = str(path)
            unknown = self.costs[(precision, batches[0])].unknown
            if unknown:
                self.notes.append(f"{path.name}: {len(unknown)} nodes not counted "
                                  f"(unknown shapes), e.g. {unknown[0]}: FLOPs are a floor")

    def measure(self, gpu: bool, quick: bool) -> None:
        try:
            self.ceilings["cpu"] = (measure_cpu(1024, 64 << 20, 3) if quick else measure_cpu())
        except Exception as e:
            self.ceilings["cpu"] = None
            self.notes.append(f"CPU ceilings failed: {type(e).__name__}: {e}")
        if gpu:
            try:
                self.ceilings["cuda"] = (measure_gpu(4096, 256 << 20, 2, 5) if quick
                                         else measure_gpu())
            except Exception as e:
                self.ceilings["cuda"] = None
                self.notes.append(f"GPU ceilings failed: {type(e).__name__}: {e}")

    def cost(self, precision: str, batch: int) -> GraphCost | None:
        got = self.costs.get((precision, batch))
        if got is None and self.sources:
            other = next(iter(self.sources))
            got = self.costs.get((other, batch))
        return got

    def floor_ms(self, device: str, precision: str, batch: int) -> tuple[float, str] | None:
        cost = self.cost(precision, batch)
        ceil = self.ceilings.get(device)
        if cost is None or not ceil:
            return None
        peak = ceil.get("matmul_bf16_tflops") if precision == "fp16" else None
        peak = (peak or ceil["matmul_fp32_tflops"]) * 1e12
        t_flops = cost.flops / peak
        t_bytes = cost.bytes_min / (ceil["copy_gbps"] * 1e9)
        return max(t_flops, t_bytes) * 1e3, "compute" if t_flops >= t_bytes else "memory"

    def annotate(self, row: dict[str, Any]) -> None:
        cost = self.cost(row["precision"], row["batch"])
        if cost is None:
            return
        row["flops_per_step"] = cost.flops
        row["bytes_per_step_min"] = cost.bytes_min
        floor = self.floor_ms(row["device"], row["precision"], row["batch"])
        if floor is None or not row.get("per_step_ms"):
            return
        row["floor_ms_per_step"], row["roofline_bound"] = floor
        row["floor_fraction"] = floor[0] / row["per_step_ms"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": dict(self.sources),
            "costs": [{"precision": p, **c.to_dict()} for (p, _), c in sorted(self.costs.items())],
            "ceilings": dict(self.ceilings),
            "floors_ms_per_step": [
                {"device": d, "precision": p, "batch": b, "floor_ms": f[0], "bound": f[1]}
                for d in self.ceilings for (p, b) in sorted(self.costs)
                if (f := self.floor_ms(d, p, b)) is not None
            ],
            "notes": list(self.notes),
        }
