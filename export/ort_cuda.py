"""The ORT-CUDA graph variant: ONNX Runtime's fused diffusion kernels, in NHWC.

``rewrite(model)`` turns a portable graph written by ``onnx_export`` into one that only
ONNX Runtime's CUDA execution provider runs (its ``com.microsoft`` contrib kernels):

1. Every GroupNorm of the network — in the portable graph the layer-norm form of
   ``train.unet.GroupNorm32``: ``[Cast] → Reshape (B, G, C/G·H·W) → LayerNormalization →
   Reshape (B, C, H, W) → Mul γ → Add β → [Cast]``, optionally followed by SiLU
   (``Sigmoid`` + ``Mul``) — becomes ``Transpose → GroupNorm (channels_last, activation
   = SiLU or none) → Transpose``. The kernel computes its statistics in fp32 whatever
   the input type, so the fp32 island around a GroupNorm of an fp16 graph is dropped.
   ONNX Runtime's kernel handles two channels per thread: a group with an odd number of
   channels is left as it is, and so is a layer-norm form whose scale and bias are not
   recognisably 1 and 0 (both listed, with why, in ``Rewrite.left``, and counted in the
   export's summary line).
2. ONNX Runtime's own transformers optimizer for UNets (``model_type="unet"``) then
   turns every Conv into ``NhwcConv`` (weights transposed offline), removes the
   transpose pairs this leaves between NHWC kernels, fuses a GroupNorm's input Add
   into ``SkipGroupNorm`` and the bias Adds into ``BiasAdd``.
3. Initializers that came out identical (an unrolled sampler's repeated NHWC weights)
   are stored once.

The result is valid ONNX with contrib ops (``onnx.checker`` accepts it); it runs on the
CUDA EP only (no CPU kernels exist for GroupNorm or NhwcConv), so the export's parity
gate checks it there. TensorRT and the CPU keep the portable graphs.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
NCHW_TO_NHWC = [0, 2, 3, 1]
NHWC_TO_NCHW = [0, 3, 1, 2]
# Operators of the variant that only ONNX Runtime's CUDA EP runs.
CONTRIB_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasAdd")


@dataclass
class Rewrite:
    """What ``rewrite`` did to one graph."""

    model: onnx.ModelProto
    group_norms: int = 0  # GroupNorm sites fused by step 1
    silu: int = 0  # of which with the SiLU fused in
    left: list[str] = field(default_factory=list)  # GroupNorm sites left unfused, and why
    ops: Counter[str] = field(default_factory=Counter)  # op counts of the result

    def summary(self) -> str:
        fused = ", ".join(f"{op} x{self.ops[op]}" for op in CONTRIB_OPS if self.ops[op])
        left = (f"; {len(self.left)} GroupNorm(s) left unfused ({self.left[0]}"
                + (", ..." if len(self.left) > 1 else "") + ")" if self.left else "")
        return f"{fused or 'no fused kernels'}{left}"


class _Graph:
    """Producer/consumer maps and constant lookup of a graph being rewritten."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False)
        self.types = {v.name: v.type.tensor_type.elem_type for v in
                      (*inferred.graph.value_info, *inferred.graph.input,
                       *inferred.graph.output)}
        for name, init in self.inits.items():
            self.types[name] = init.data_type

    def const(self, name: str) -> NDArray[np.float64] | None:
        """The value of a constant input (initializer, Constant node, or Cast of one)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name]).astype(np.float64)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
        if node.op_type == "Cast":
            return self.const(node.input[0])
        return None

    def uniform(self, name: str) -> tuple[float, onnx.NodeProto | None] | None:
        """(value, the Expand node that makes it) of an input whose every element is one
        constant value: a constant, or ``Expand`` of a one-element constant (how the
        exporter writes a large LayerNormalization scale or bias, e.g. 655,360 ones for a
        GroupNorm at 256 px). None for anything else."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Expand" and node.input[0] in self.inits:
            value = self.const(node.input[0])
            if value is not None and value.size == 1:
                return float(value.reshape(-1)[0]), node
            return None
        value = self.const(name)
        if value is None or value.size == 0 or not np.all(value == value.reshape(-1)[0]):
            return None
        return float(value.reshape(-1)[0]), None

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs or users[0].op_type != op:
            return None
        return users[0]

    def other_input(self, node: onnx.NodeProto, name: str) -> str:
        return str(node.input[1] if node.input[0] == name else node.input[0])


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class _Site:
    nodes: list[onnx.NodeProto]
    x: str  # the GroupNorm's input (before the fp32 Cast, if any)
    out: str  # the last output the fused node replaces
    out_type: int
    groups: int
    epsilon: float
    gamma: NDArray[np.float32]
    beta: NDArray[np.float32]
    silu: bool


def _match(g: _Graph, ln: onnx.NodeProto) -> _Site | str | None:
    """The GroupNorm site around LayerNormalization ``ln``; a reason string for a
    GroupNorm that cannot be fused; None for anything else."""
    if _attr(ln, "axis", -1) != -1 or len(ln.input) < 2:
        return None
    view = g.producer.get(ln.input[0])
    if view is None or view.op_type != "Reshape" or g.only_consumer(view.output[0],
                                                                    "LayerNormalization") is None:
        return None
    nodes = [view, ln]
    x = view.input[0]
    cast_in = g.producer.get(x)
    if (cast_in is not None and cast_in.op_type == "Cast"
            and _attr(cast_in, "to", 0) == onnx.TensorProto.FLOAT
            and g.only_consumer(x, "Reshape") is not None):
        nodes.insert(0, cast_in)
        x = cast_in.input[0]
    shape3 = g.const(view.input[1])
    if shape3 is None or shape3.shape != (3,):
        return None
    back = g.only_consumer(ln.output[0], "Reshape")
    if back is None:
        return None
    shape4 = g.const(back.input[1])
    if shape4 is None or shape4.shape != (4,):
        return None
    scale = g.uniform(ln.input[1])
    bias = g.uniform(ln.input[2]) if len(ln.input) > 2 and ln.input[2] else (0.0, None)
    if scale is None or bias is None or scale[0] != 1.0 or bias[0] != 0.0:
        return (f"{ln.name or ln.output[0]}: its LayerNormalization's scale and bias are "
                "not a recognisable constant 1 and 0")
    for _, expand in (scale, bias):  # an Expand only this LayerNormalization reads goes too
        if expand is not None and g.only_consumer(expand.output[0],
                                                  "LayerNormalization") is ln:
            nodes.insert(0, expand)
    channels, groups = int(shape4[1]), int(shape3[1])
    if groups <= 0 or channels <= 0 or channels % groups:
        return None
    nodes.append(back)
    out = back.output[0]
    mul = g.only_consumer(out, "Mul")
    add = g.only_consumer(mul.output[0], "Add") if mul is not None else None
    gamma = g.const(g.other_input(mul, out)) if mul is not None else None
    beta = g.const(g.other_input(add, mul.output[0])) if mul and add else None
    if (mul is not None and add is not None and gamma is not None and beta is not None
            and gamma.size == channels and beta.size == channels):
        nodes += [mul, add]
        out = add.output[0]
    else:  # a GroupNorm without affine (an attention norm, its affine folded away)
        gamma, beta = np.ones(channels), np.zeros(channels)
    cast_out = g.only_consumer(out, "Cast")
    if cast_out is not None:
        nodes.append(cast_out)
        out = cast_out.output[0]
    silu = False
    users = g.consumers.get(out, [])
    if out not in g.outputs and len(users) == 2:
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        prod = next((u for u in users if u.op_type == "Mul"), None)
        if (sig is not None and prod is not None and sig.output[0] in prod.input
                and g.only_consumer(sig.output[0], "Mul") is prod):
            nodes += [sig, prod]
            out, silu = prod.output[0], True
    if (channels // groups) % 2:
        return (f"{ln.name or ln.output[0]}: {channels} channels in {groups} groups "
                f"({channels // groups} per group, odd)")
    x_type, out_type = g.types.get(x, 0), g.types.get(out, 0)
    if not x_type or not out_type:
        return None
    return _Site(nodes, x, out, out_type, groups, float(_attr(ln, "epsilon", 1e-5)),  # type: ignore[arg-type]
                 gamma.reshape(-1).astype(np.float32), beta.reshape(-1).astype(np.float32),
                 silu)


def _fuse_group_norms(model: onnx.ModelProto, result: Rewrite) -> None:
    g = _Graph(model)
    sites: list[_Site] = []
    for ln in [n for n in model.graph.node if n.op_type == "LayerNormalization"]:
        site = _match(g, ln)
        if isinstance(site, str):
            result.left.append(site)
        elif site is not None:
            sites.append(site)
    remove = {id(n) for s in sites for n in s.nodes}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    for k, s in enumerate(sites):
        name = f"fewstep_GroupNorm_{k}"
        model.graph.initializer.extend([numpy_helper.from_array(s.gamma, f"{name}_gamma"),
                                        numpy_helper.from_array(s.beta, f"{name}_beta")])
        x_type = g.types[s.x]
        last = s.out if s.out_type == x_type else f"{name}_out"
        fused = [
            helper.make_node("Transpose", [s.x], [f"{name}_in_nhwc"], f"{name}_to_nhwc",
                             perm=NCHW_TO_NHWC),
            helper.make_node("GroupNorm", [f"{name}_in_nhwc", f"{name}_gamma", f"{name}_beta"],
                             [f"{name}_nhwc"], name, domain=MS_DOMAIN, groups=s.groups,
                             epsilon=s.epsilon, activation=int(s.silu), channels_last=1),
            helper.make_node("Transpose", [f"{name}_nhwc"], [last], f"{name}_to_nchw",
                             perm=NHWC_TO_NCHW),
        ]
        if last != s.out:
            fused.append(helper.make_node("Cast", [last], [s.out], f"{name}_cast",
                                          to=s.out_type))
        new_nodes[id(s.nodes[-1])] = fused  # in place of the site's last node (topological)
        result.silu += s.silu
    result.group_norms = len(sites)
    nodes = []
    for n in model.graph.node:
        if id(n) in remove:
            nodes += new_nodes.get(id(n), [])
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import) and sites:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _ort_unet_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's UNet fusions that apply after ours: NhwcConv (+ transpose merging),
    SkipGroupNorm, BiasAdd. Imported lazily (it is part of the onnxruntime package)."""
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel
    except ImportError as e:  # an onnxruntime without its transformers tools
        raise ValueError(
            f"the ORT-CUDA variant needs onnxruntime's transformers optimizer ({e}); "
            "install onnxruntime (or onnxruntime-gpu) >= 1.17 on the export machine"
        ) from None
    options = FusionOptions("unet")
    for name in ("enable_gelu", "enable_layer_norm", "enable_attention",
                 "enable_skip_layer_norm", "enable_bias_skip_layer_norm",
                 "enable_bias_splitgelu", "enable_packed_qkv", "enable_packed_kv",
                 "enable_group_norm", "enable_gelu_approximation"):
        setattr(options, name, False)
    options.enable_skip_group_norm = True
    options.enable_nhwc_conv = True
    options.enable_bias_add = True
    # The optimizer logs every fusion at INFO and warns about what does not apply.
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "fusion_base",
                                              "onnx_model", "fusion_skip_group_norm",
                                              "fusion_nhwc_conv", "fusion_utils",
                                              "onnx_model_unet", "fusion_bias_add",
                                              "fusion_transpose", "shape_infer_helper",
                                              "symbolic_shape_infer", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        unet = UnetOnnxModel(model, num_heads=0, hidden_size=0)
        unet._optimize(options, None)  # optimize() only adds a tqdm progress bar around it
        unet.topological_sort(is_deterministic=True)  # the fusions append nodes out of order
        out: onnx.ModelProto = unet.model
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return out


def _dedupe_initializers(model: onnx.ModelProto) -> None:
    seen: dict[str, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in model.graph.initializer:
        raw = numpy_helper.to_array(init)
        key = hashlib.sha256(f"{init.data_type}:{tuple(init.dims)}:".encode()
                             + np.ascontiguousarray(raw).tobytes()).hexdigest()
        if key in seen:
            rename[init.name] = seen[key]
        else:
            seen[key] = init.name
            keep.append(init)
    if not rename:
        return
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for node in _all_nodes(model.graph):
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def rewrite(model: onnx.ModelProto) -> Rewrite:
    """The ORT-CUDA variant of a portable graph (``model`` is changed in place and
    returned in ``Rewrite.model``); a ValueError when no GroupNorm could be fused.

    What is left between the NHWC kernels (Transposes around residual Adds and skip
    Concats, the no-op Casts the NhwcConv fusion adds) is left to ONNX Runtime's own
    session optimisers: removing them here was measured (``benchmarks/lab/
    variant_levers.py``, lever V1 against V0) and gained nothing, so it was reverted."""
    result = Rewrite(model)
    _fuse_group_norms(model, result)
    if not result.group_norms:
        why = (f" ({result.left[0]})" if result.left else
               " (no GroupNorm in the graph's exported form)")
        fix = ("its kernel needs an even number of channels per group: use `groups` that "
               "leave an even count (the shipped presets do), or leave --target ort-cuda out"
               if "odd" in why else "leave --target ort-cuda out")
        raise ValueError(
            f"no GroupNorm of {model.graph.name or 'the graph'} can use ONNX Runtime's fused "
            f"kernel{why}; {fix}"
        )
    model = _ort_unet_fusions(model)
    _dedupe_initializers(model)
    result.model = model
    result.ops = Counter(n.op_type for n in model.graph.node)
    return result
