"""Standard-ONNX lowering of ONNX Runtime's CUDA-only contrib operators (tests only).

``lower(model)`` returns a copy of ``model`` in which every ``com.microsoft`` GroupNorm,
SkipGroupNorm, NhwcConv and BiasAdd node is replaced by standard ONNX operators computing
what the operator is documented to compute (onnxruntime's docs/ContribOperators.md), so
that a graph written for the CUDA execution provider runs on the CPU provider too. The
lowering is written per operator, from its documentation alone; it knows nothing of the
exporter's patterns.

* ``GroupNorm(X, gamma, beta)``, attributes ``groups``, ``epsilon`` (default 1e-5),
  ``activation`` (0 none, 1 SiLU), ``channels_last`` (default 1: X is (N, H, W, C),
  else (N, C, H, W)): ``y = gamma · (x - mean) / sqrt(var + epsilon) + beta`` with mean
  and (biased) variance over each group of C/groups channels and all spatial positions,
  then ``y · sigmoid(y)`` when activation is 1. Statistics are computed in float32
  whatever the input type, as the kernels do.
* ``SkipGroupNorm(X, gamma, beta, skip[, bias])``: ``s = X + skip + bias`` (skip
  (N, H, W, C), (N, 1, 1, C) or (N, C); bias (C)), then GroupNorm of ``s``; the optional
  second output is ``s`` itself.
* ``NhwcConv(X, W[, B])``: Conv on NHWC data with the weight in the matching
  (M, kH, kW, C/group) layout (the layout ``fusion_nhwc_conv.py`` writes; the operator's
  doc text is Conv's own), output NHWC; attributes as Conv's.
* ``BiasAdd(X, bias, skip)``: ``X + bias + skip``.

Only tests import this module.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
LOWERED_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasAdd")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it (Loop / If / Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


class _Builder:
    """Emits the standard nodes that replace one contrib node."""

    def __init__(self, opset: int, taken: set[str], prefix: str) -> None:
        self.opset = opset
        self.taken = taken
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def name(self, hint: str) -> str:
        k = 0
        while f"{self.prefix}_{hint}{k}" in self.taken:
            k += 1
        out = f"{self.prefix}_{hint}{k}"
        self.taken.add(out)
        return out

    def op(self, op_type: str, inputs: list[str], output: str | None = None,
           **attrs: object) -> str:
        out = output if output is not None else self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], self.name(op_type),
                                           **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        out = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], self.name("Constant"),
                                           value=numpy_helper.from_array(value, out)))
        return out

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(*axes)], keepdims=1)
        return self.op("ReduceMean", [x], axes=axes, keepdims=1)

    def reshape_to(self, x: str, like: str) -> str:
        return self.op("Reshape", [x, self.op("Shape", [like])])

    def flatten_spatial(self, x: str, channels_last: bool) -> str:
        """(N, *spatial, C) → (N, S, C) or (N, C, *spatial) → (N, C, S), with S the
        product of the spatial sizes (1 for a tensor without spatial axes)."""
        if channels_last:
            shape = self.op("Concat", [self.ints(0, -1), self.op("Shape", [x], start=-1)],
                            axis=0)
        else:
            shape = self.op("Concat", [self.op("Shape", [x], start=0, end=2),
                                       self.ints(-1)], axis=0)
        return self.op("Reshape", [x, shape])

    def channel_vector(self, v: str, channels_last: bool) -> str:
        """A (C) vector shaped to broadcast over the channel axis of the data."""
        v = self.op("Cast", [v], to=TensorProto.FLOAT)
        return v if channels_last else self.op("Reshape", [v, self.ints(-1, 1, 1)])

    def group_norm(self, x32: str, gamma: str, beta: str, groups: int, epsilon: float,
                   silu: bool, channels_last: bool) -> str:
        """GroupNorm of float32 ``x32`` (4D, layout per ``channels_last``), float32 out."""
        nchw = self.op("Transpose", [x32], perm=[0, 3, 1, 2]) if channels_last else x32
        grouped = self.op("Reshape", [nchw, self.ints(0, groups, -1)])  # (N, G, C/G·H·W)
        mean = self.mean(grouped, [2])
        centered = self.op("Sub", [grouped, mean])
        var = self.mean(self.op("Mul", [centered, centered]), [2])
        std = self.op("Sqrt", [self.op("Add", [var, self.f32(epsilon)])])
        normed = self.reshape_to(self.op("Div", [centered, std]), nchw)
        if channels_last:
            normed = self.op("Transpose", [normed], perm=[0, 2, 3, 1])
        y = self.op("Add", [self.op("Mul", [normed, self.channel_vector(gamma, channels_last)]),
                            self.channel_vector(beta, channels_last)])
        if silu:
            y = self.op("Mul", [y, self.op("Sigmoid", [y])])
        return y


def _norm_attrs(node: onnx.NodeProto) -> tuple[int, float, bool, bool]:
    groups = int(_attr(node, "groups", 0))  # type: ignore[call-overload]
    activation = int(_attr(node, "activation", -1))  # type: ignore[call-overload]
    if groups <= 0 or activation not in (0, 1):
        raise ValueError(f"{node.op_type} {node.name!r}: groups={groups}, "
                         f"activation={activation}; expected groups > 0, activation 0 or 1")
    epsilon = float(_attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    channels_last = bool(_attr(node, "channels_last", 1))
    return groups, epsilon, activation == 1, channels_last


def _lower_group_norm(b: _Builder, node: onnx.NodeProto) -> None:
    x, gamma, beta = node.input[:3]
    groups, epsilon, silu, channels_last = _norm_attrs(node)
    x32 = b.op("Cast", [x], to=TensorProto.FLOAT)
    y = b.group_norm(x32, gamma, beta, groups, epsilon, silu, channels_last)
    b.op("CastLike", [y, x], node.output[0])


def _lower_skip_group_norm(b: _Builder, node: onnx.NodeProto) -> None:
    x, gamma, beta, skip = node.input[:4]
    bias = node.input[4] if len(node.input) > 4 else ""
    groups, epsilon, silu, channels_last = _norm_attrs(node)
    # Flattening the spatial axes makes the documented skip shapes broadcast alike:
    # (N, H, W, C) → (N, HW, C), (N, 1, 1, C) and (N, C) → (N, 1, C) (NHWC shown).
    flat = b.flatten_spatial(b.op("Cast", [x], to=TensorProto.FLOAT), channels_last)
    skip_flat = b.flatten_spatial(b.op("Cast", [skip], to=TensorProto.FLOAT), channels_last)
    s = b.op("Add", [flat, skip_flat])
    if bias:
        bias_vec = b.op("Cast", [bias], to=TensorProto.FLOAT)
        if not channels_last:
            bias_vec = b.op("Reshape", [bias_vec, b.ints(-1, 1)])
        s = b.op("Add", [s, bias_vec])
    s = b.reshape_to(s, x)  # the sum, in X's shape
    y = b.group_norm(s, gamma, beta, groups, epsilon, silu, channels_last)
    b.op("CastLike", [y, x], node.output[0])
    if len(node.output) > 1 and node.output[1]:
        b.op("CastLike", [s, x], node.output[1])


def _spatial_rank(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    kernel = _attr(node, "kernel_shape", None)
    if kernel is not None:
        return len(kernel)  # type: ignore[arg-type]
    if node.input[1] in inits:
        return len(inits[node.input[1]].dims) - 2
    return 2


def _lower_nhwc_conv(b: _Builder, node: onnx.NodeProto,
                     inits: dict[str, onnx.TensorProto]) -> None:
    rank = _spatial_rank(node, inits) + 2
    to_first = [0, rank - 1, *range(1, rank - 1)]  # (N, *spatial, C) → (N, C, *spatial)
    to_last = [0, *range(2, rank), 1]
    x = b.op("Transpose", [node.input[0]], perm=to_first)
    w = b.op("Transpose", [node.input[1]], perm=to_first)  # (M, *k, C/g) → (M, C/g, *k)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    y = b.op("Conv", [x, w, *node.input[2:3]], **attrs)
    b.op("Transpose", [y], node.output[0], perm=to_last)


def _lower_bias_add(b: _Builder, node: onnx.NodeProto) -> None:
    x, bias, skip = node.input[:3]
    b.op("Add", [b.op("Add", [x, bias]), skip], node.output[0])


def lower(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its GroupNorm, SkipGroupNorm, NhwcConv and BiasAdd
    contrib nodes (in the main graph and any subgraph) replaced by standard ONNX ops."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        raise ValueError(f"opset {opset}: the lowering uses CastLike and Shape(start, end), "
                         "which need opset >= 15")
    taken = {n for g in _graphs(out.graph) for node in g.node
             for n in (node.name, *node.input, *node.output)}
    taken |= {i.name for g in _graphs(out.graph) for i in (*g.initializer, *g.input)}
    inits = {i.name: i for i in out.graph.initializer}
    count = 0
    for graph in list(_graphs(out.graph)):
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.domain != MS_DOMAIN or node.op_type not in LOWERED_OPS:
                nodes.append(node)
                continue
            b = _Builder(opset, taken, f"lowered{count}_{node.op_type}")
            count += 1
            if node.op_type == "GroupNorm":
                _lower_group_norm(b, node)
            elif node.op_type == "SkipGroupNorm":
                _lower_skip_group_norm(b, node)
            elif node.op_type == "NhwcConv":
                _lower_nhwc_conv(b, node, inits)
            else:
                _lower_bias_add(b, node)
            nodes += b.nodes
        del graph.node[:]
        graph.node.extend(nodes)
    if not any(n.domain == MS_DOMAIN for g in _graphs(out.graph) for n in g.node):
        keep = [o for o in out.opset_import if o.domain != MS_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out
