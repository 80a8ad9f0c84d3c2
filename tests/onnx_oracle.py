"""Hand-made ONNX oracle graphs with fewstep metadata, built with onnx.helper.

The graphs compute the exact oracle (see runtime/backends/oracle.py) in float32 from
constant tables: x0 per class and √ᾱ_t, √(1-ᾱ_t) for every timestep, gathered with
Cast(Round(t)) → int64. So ONNX Runtime tests check exactness with no torch model:

* denoiser: x, t [, label] [, guidance] → eps | v | x0
* step:     x, t, a_t, a_prev, eta, noise [, label] [, guidance] → x_prev (one DDIM step)
* sampler:  x [, label] [, guidance] [, noise] → x0 | image (the loop unrolled)

``bias_x`` adds ``bias_x * x`` to the network output: a deliberately inexact "model"
whose images depend on the noise, for batch-split, seed and cross-backend checks.
Broken variants for ArtifactError tests: ``rename`` (input names that disagree with
the metadata), ``metadata`` ("" for none, or any JSON text), ``unknown_op``.

Only tests import this (the runtime must not import onnx).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fewstep.runtime import sampling
from fewstep.runtime.meta import META_KEY, GraphInfo, ModelMeta, Schedule

OPSET = 17
IR_VERSION = 8


def make_meta(prediction_type: str = "epsilon", num_classes: int = 0, size: int = 8,
              channels: int = 3, schedule: Schedule | None = None, **fields: Any) -> ModelMeta:
    """A small model's metadata (denoiser graph), e.g. for a 3x8x8 oracle."""
    names = tuple(f"class{i}" for i in range(num_classes)) if num_classes else ()
    fields.setdefault("class_names", names)
    fields.setdefault("source_hash", "sha256:oracle")
    return ModelMeta.build(
        graph=fields.pop("graph", GraphInfo()), prediction_type=prediction_type,
        schedule=schedule or Schedule(), channels=channels, height=size, width=size,
        num_classes=num_classes, **fields,
    )


def pixel_x0(meta: ModelMeta, rows: int | None = None, seed: int = 0) -> np.ndarray:
    """x0 on exact pixel values (k/127.5 - 1): uint8 conversion is exact within ±0.5/127.5."""
    k = rows if rows is not None else max(1, meta.num_classes)
    levels = np.random.default_rng(seed).integers(0, 256, (k, *meta.image_shape))
    return levels.astype(np.float64) / 127.5 - 1.0


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def col(self, v: str) -> str:  # (B,) -> (B, 1, 1, 1)
        return self.op("Reshape", v, self.const([-1, 1, 1, 1], np.int64))


class _Oracle:
    """ONNX ops for the oracle network and the DDIM step of one model."""

    def __init__(self, b: _Builder, meta: ModelMeta, x0: np.ndarray, bias_x: float) -> None:
        self.b = b
        self.meta = meta
        ac = meta.schedule.alphas_cumprod()
        self.sqrt_a = np.sqrt(ac).astype(np.float32)
        self.sqrt_1ma = np.sqrt(1.0 - ac).astype(np.float32)
        rows = np.asarray(x0, dtype=np.float64)
        if meta.conditional and rows.shape[0] == meta.num_classes and rows.shape[0] > 1:
            rows = np.concatenate([rows, rows.mean(axis=0, keepdims=True)])
        self.table = b.const(rows.astype(np.float32))
        self.rows = rows.shape[0]
        self.bias_x = bias_x

    def x0_rows(self, x: str, label: str | None) -> str:
        b = self.b
        if label is None or self.rows == 1:
            first = b.op("Gather", self.table, b.const([0], np.int64), axis=0)
            return b.op("Expand", first, b.op("Shape", x))
        return b.op("Gather", self.table, label, axis=0)

    def target(self, x: str, x0: str, sa: str, s1ma: str) -> str:
        b = self.b
        eps = b.op("Div", b.op("Sub", x, b.op("Mul", sa, x0)), s1ma)
        p = self.meta.prediction_type
        if p == "epsilon":
            return eps
        if p == "sample":
            return b.op("Identity", x0)
        return b.op("Sub", b.op("Mul", sa, eps), b.op("Mul", s1ma, x0))

    def network(self, x: str, sa: str, s1ma: str, label: str | None,
                guidance: str | None) -> str:
        b = self.b
        out = self.target(x, self.x0_rows(x, label), sa, s1ma)
        if guidance is not None:
            assert label is not None
            null = b.op("Mul", b.op("Mul", label, b.const(0, np.int64)), b.const(0, np.int64))
            null = b.op("Add", null, b.const(self.rows - 1, np.int64))
            uncond = self.target(x, self.x0_rows(x, null), sa, s1ma)
            g = b.col(guidance)
            out = b.op("Add", uncond, b.op("Mul", g, b.op("Sub", out, uncond)))
        if self.bias_x:
            out = b.op("Add", out, b.op("Mul", x, b.const(self.bias_x)))
        return out

    def gathered(self, t: str) -> tuple[str, str]:
        b = self.b
        idx = b.op("Cast", b.op("Round", t), to=TensorProto.INT64)
        sa = b.col(b.op("Gather", b.const(self.sqrt_a), idx, axis=0))
        s1ma = b.col(b.op("Gather", b.const(self.sqrt_1ma), idx, axis=0))
        return sa, s1ma

    def step(self, out: str, x: str, a_t: str, a_prev: str, eta: str | None,
             noise: str | None) -> str:
        """ddim.step in ONNX ops (a_t, a_prev, eta broadcastable against x)."""
        b = self.b
        one = b.const(1.0)
        sqrt_at = b.op("Sqrt", a_t)
        sqrt_1mat = b.op("Sqrt", b.op("Sub", one, a_t))
        p = self.meta.prediction_type
        if p == "epsilon":
            x0_pred = b.op("Div", b.op("Sub", x, b.op("Mul", sqrt_1mat, out)), sqrt_at)
            eps = out
        elif p == "sample":
            x0_pred = out
            eps = b.op("Div", b.op("Sub", x, b.op("Mul", sqrt_at, out)), sqrt_1mat)
        else:
            x0_pred = b.op("Sub", b.op("Mul", sqrt_at, x), b.op("Mul", sqrt_1mat, out))
            eps = b.op("Add", b.op("Mul", sqrt_at, out), b.op("Mul", sqrt_1mat, x))
        r = self.meta.schedule.clip_sample_range
        if r is not None:
            x0_pred = b.op("Clip", x0_pred, b.const(-r), b.const(r))
        one_m_prev = b.op("Sub", one, a_prev)
        if eta is None:
            sigma2 = None
            dir_coef = b.op("Sqrt", one_m_prev)
        else:
            ratio = b.op("Div", one_m_prev, b.op("Sub", one, a_t))
            sigma = b.op("Mul", eta, b.op("Mul", b.op("Sqrt", ratio), b.op(
                "Sqrt", b.op("Sub", one, b.op("Div", a_t, a_prev)))))
            sigma2 = sigma
            radicand = b.op("Sub", one_m_prev, b.op("Mul", sigma, sigma))
            dir_coef = b.op("Sqrt", b.op("Relu", radicand))  # as ddim.step: clamped at 0
        x_prev = b.op("Add", b.op("Mul", b.op("Sqrt", a_prev), x0_pred),
                      b.op("Mul", dir_coef, eps))
        if sigma2 is not None and noise is not None:
            x_prev = b.op("Add", x_prev, b.op("Mul", sigma2, noise))
        return x_prev


def _value_info(name: str, meta: ModelMeta, kind: str) -> onnx.ValueInfoProto:
    c, h, w = meta.image_shape
    dims: dict[str, list[Any]] = {"x": ["B", c, h, w], "x_prev": ["B", c, h, w],
                                  "image": ["B", h, w, c]}
    for out in ("eps", "v", "x0"):
        dims[out] = ["B", c, h, w]
    if kind == "step":
        dims["noise"] = ["B", c, h, w]
    elif kind == "sampler":
        dims["noise"] = ["B", meta.graph.steps, c, h, w]
    dtype = {"label": TensorProto.INT64, "image": TensorProto.UINT8}.get(name, TensorProto.FLOAT)
    return helper.make_tensor_value_info(name, dtype, dims.get(name, ["B"]))


def build(meta: ModelMeta, x0: np.ndarray, *, bias_x: float = 0.0,
          rename: dict[str, str] | None = None, metadata: str | None = None,
          unknown_op: bool = False) -> onnx.ModelProto:
    """The oracle graph of ``meta.graph.kind`` as an ONNX model (see the module docstring)."""
    b = _Builder()
    o = _Oracle(b, meta, x0, bias_x)
    g = meta.graph
    label = "label" if "label" in g.inputs else None
    guidance = "guidance" if g.guidance else None
    if g.kind == "denoiser":
        sa, s1ma = o.gathered("t")
        out = o.network("x", sa, s1ma, label, guidance)
    elif g.kind == "step":
        sa, s1ma = o.gathered("t")
        net = o.network("x", sa, s1ma, label, guidance)
        out = o.step(net, "x", b.col("a_t"), b.col("a_prev"), b.col("eta"), "noise")
    else:
        plan = sampling.SamplingPlan.create(meta, g.steps, g.spacing, g.eta)
        x = "x"
        for i in range(plan.steps):
            t = plan.timesteps[i]
            net = o.network(x, b.const(o.sqrt_a[t]), b.const(o.sqrt_1ma[t]), label, guidance)
            noise = None
            if plan.stochastic:
                noise = b.op("Gather", "noise", b.const(i, np.int64), axis=1)
            eta = b.const(plan.eta) if plan.stochastic else None
            x = o.step(net, x, b.const(plan.a_t[i]), b.const(plan.a_prev[i]), eta, noise)
        out = x
        if g.output_format == "uint8":
            pix = b.op("Mul", b.op("Add", b.op("Clip", out, b.const(-1.0), b.const(1.0)),
                                   b.const(1.0)), b.const(127.5))
            out = b.op("Transpose", b.op("Cast", b.op("Round", pix), to=TensorProto.UINT8),
                       perm=[0, 2, 3, 1])
    if unknown_op:
        out = b.op("FewstepNoSuchOp", out)
    b.nodes.append(helper.make_node("Identity", [out], [g.outputs[0]]))
    graph = helper.make_graph(
        b.nodes, f"fewstep_oracle_{g.kind}",
        [_value_info(n, meta, g.kind) for n in g.inputs],
        [_value_info(g.outputs[0], meta, g.kind)],
        initializer=b.inits,
    )
    if rename:
        for vi in graph.input:
            vi.name = rename.get(vi.name, vi.name)
        for node in graph.node:
            node.input[:] = [rename.get(i, i) for i in node.input]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="fewstep-tests")
    model.ir_version = IR_VERSION
    text = meta.to_json() if metadata is None else metadata
    if text:
        helper.set_model_props(model, {META_KEY: text})
    return model


def write(path: str | Path, meta: ModelMeta, x0: np.ndarray, **kwargs: Any) -> Path:
    """Build and save one oracle graph; returns its path."""
    p = Path(path)
    onnx.save_model(build(meta, x0, **kwargs), str(p))
    return p


def write_artifact(folder: Path, meta: ModelMeta, x0: np.ndarray, *, base: str = "model",
                   step: bool = True, samplers: tuple[tuple[int, str, float, str], ...] = (),
                   bias_x: float = 0.0, denoiser: bool = True) -> Path:
    """model.onnx [+ model.step.onnx] [+ model.sampler-N[-etaE].onnx]; returns model.onnx.

    ``samplers``: (steps, spacing, eta, output_format) for each fused sampler graph.
    """
    from fewstep.runtime.artifact import graph_path

    main = folder / f"{base}.onnx"
    if denoiser:
        write(main, meta, x0, bias_x=bias_x)
    if step:
        write(graph_path(main, "step"), meta.for_graph(kind="step"), x0, bias_x=bias_x)
    for steps, spacing, eta, fmt in samplers:
        sm = meta.for_graph(kind="sampler", steps=steps, spacing=spacing, eta=eta,
                            output_format=fmt)
        write(graph_path(main, "sampler", steps, eta), sm, x0, bias_x=bias_x)
    return main


def toy(meta: ModelMeta, x0: np.ndarray, bias_x: float, path: str = "<toy>") -> Any:
    """An oracle graph (any kind) whose network output is off by ``bias_x * x``.

    The numpy twin of ``build(..., bias_x=bias_x)``; with 0 it is the exact oracle.
    """
    from fewstep.runtime.backends.oracle import OracleGraph

    class _Toy(OracleGraph):
        def network(self, x: Any, t: Any, labels: Any = None, guidance: Any = None) -> Any:
            out = super().network(x, t, labels, guidance)
            return (out + np.asarray(x, np.float32) * np.float32(bias_x)).astype(np.float32)

    return _Toy(meta, x0, path)
