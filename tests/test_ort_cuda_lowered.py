"""The ORT-CUDA variant, checked on the CPU: its contrib nodes are lowered to standard ONNX.

ONNX Runtime has no CPU kernels for GroupNorm, SkipGroupNorm or NhwcConv, so the variant
graphs (model.ort-cuda[.step|.sampler-N].onnx) cannot run here as written. The helper
``ort_contrib_lowering.lower`` replaces each of those nodes by standard operators that
compute what the operator is documented to compute; the lowered variant must then agree
with the portable graph on the same inputs. The lowering itself is checked against numpy
references of the documented formulas on hand-made one-node graphs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from ort_contrib_lowering import MS_DOMAIN, lower  # noqa: E402

from fewstep.runtime import artifact  # noqa: E402

SAMPLER_STEPS = 2
KINDS = ("denoiser", "step", "sampler")
BATCH = 3
# fp32 outputs (eps / v, x_prev): the lowered variant and the portable graph differ by
# a few float32 ulps (at most 1.2e-6 measured, outputs of magnitude ~3); a GroupNorm
# epsilon 10x too small, 10x too large or dropped moves the denoiser's output by 4e-5
# to 4e-4, a missing SiLU, a wrong weight transpose or a dropped skip by 1 or more.
FP32_ATOL = 1e-5
# uint8 images: rounding may move a value across a level boundary (1 level); anything
# structurally wrong moves most pixels by more.
UINT8_MAX_FRAC_OFF_BY_ONE = 0.01
UINT8_MAX_FRAC_FURTHER = 0.001


def _session(model: onnx.ModelProto | Path) -> Any:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def _need_ort_transformers() -> None:
    try:
        import onnxruntime.transformers.onnx_model_unet  # noqa: F401
    except ImportError as e:
        pytest.skip(f"onnxruntime.transformers cannot be imported ({e}); the ORT-CUDA "
                    "variant is made by its UNet optimizer")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tiny_variant: Path) -> tuple[Path, int]:
    """The tiny model exported once with the ORT-CUDA variant (conftest's, its sampler
    has SAMPLER_STEPS steps): (model.onnx, classes)."""
    pytest.importorskip("torch")
    _need_ort_transformers()
    from fewstep.train import checkpoint as ckpt_io

    return tiny_variant, ckpt_io.load(tiny_checkpoint).meta.num_classes


def _pair(main: Path, kind: str) -> tuple[Path, Path]:
    """(portable graph, its ORT-CUDA variant) of ``kind``."""
    portable = artifact.graph_path(main, kind, SAMPLER_STEPS)
    variant = artifact.graph_path(artifact.variant_path(main, "ort-cuda"), kind, SAMPLER_STEPS)
    assert portable.is_file() and variant.is_file(), (portable, variant)
    return portable, variant


def _ops(model: onnx.ModelProto) -> Counter[tuple[str, str]]:
    return Counter((n.domain or "", n.op_type) for n in model.graph.node)


def _feed(model: onnx.ModelProto, classes: int, rng: np.random.Generator) -> dict[str, Any]:
    """Random inputs from the graph's declared inputs (batch axes set to BATCH)."""
    batch_values: dict[str, np.ndarray] = {
        "t": rng.uniform(0, 999, BATCH),
        "guidance": np.full(BATCH, 2.0),
        # DDIM coefficients: a noisy a_t and a cleaner a_prev amplify an error in the
        # network's output in x_prev (x0_pred divides by sqrt(a_t)).
        "a_t": rng.uniform(0.02, 0.2, BATCH),
        "a_prev": rng.uniform(0.6, 0.99, BATCH),
        "eta": np.linspace(0.0, 1.0, BATCH),
    }
    feed: dict[str, Any] = {}
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else BATCH for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if inp.name == "label":
            assert classes > 0
            feed[inp.name] = rng.integers(0, classes, shape).astype(dtype)
        elif inp.name in batch_values:
            assert shape == [BATCH], (inp.name, shape)
            feed[inp.name] = batch_values[inp.name].astype(dtype)
        else:
            assert np.issubdtype(dtype, np.floating), (inp.name, dtype)
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


# --------------------------------------------------------------------------------------
# The exported variant graphs


@pytest.mark.parametrize("kind", KINDS)
def test_variant_fuses_every_group_norm_and_conv(exported: tuple[Path, int],
                                                 kind: str) -> None:
    portable_path, variant_path = _pair(exported[0], kind)
    portable, variant = onnx.load(str(portable_path)), onnx.load(str(variant_path))
    p_ops, v_ops = _ops(portable), _ops(variant)
    group_norms = p_ops["", "LayerNormalization"]  # the layer-norm form of GroupNorm
    assert group_norms > 0 and p_ops["", "Conv"] > 0
    assert v_ops[MS_DOMAIN, "GroupNorm"] + v_ops[MS_DOMAIN, "SkipGroupNorm"] == group_norms
    assert v_ops[MS_DOMAIN, "SkipGroupNorm"] > 0
    assert v_ops[MS_DOMAIN, "NhwcConv"] == p_ops["", "Conv"]
    assert v_ops["", "LayerNormalization"] == 0 and v_ops["", "Conv"] == 0
    # each SiLU fused into a GroupNorm took one Sigmoid out of the graph
    fused_silu = sum(1 for n in variant.graph.node if n.domain == MS_DOMAIN
                     and n.op_type in ("GroupNorm", "SkipGroupNorm")
                     and helper.get_attribute_value(
                         next(a for a in n.attribute if a.name == "activation")) == 1)
    assert fused_silu > 0
    assert fused_silu == p_ops["", "Sigmoid"] - v_ops["", "Sigmoid"]
    for n in variant.graph.node:
        if n.op_type in ("GroupNorm", "SkipGroupNorm"):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            assert attrs.get("channels_last", 1) == 1, n.name


@pytest.mark.parametrize("kind", KINDS)
def test_lowered_variant_matches_the_portable_graph(exported: tuple[Path, int],
                                                    kind: str) -> None:
    main, classes = exported
    portable_path, variant_path = _pair(main, kind)
    variant = onnx.load(str(variant_path))
    lowered = lower(variant)
    onnx.checker.check_model(lowered)
    assert not any(o.domain == MS_DOMAIN for o in lowered.opset_import)
    assert not any(n.domain == MS_DOMAIN for n in lowered.graph.node)

    feed = _feed(variant, classes, np.random.default_rng(7))
    (expected,) = _session(portable_path).run(None, feed)
    (got,) = _session(lowered).run(None, feed)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dtype == np.uint8:
        off = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        assert (off > 0).mean() <= UINT8_MAX_FRAC_OFF_BY_ONE, (off > 0).mean()
        assert (off > 1).mean() <= UINT8_MAX_FRAC_FURTHER, (off > 1).mean()
    else:
        assert np.isfinite(expected).all()
        err = float(np.abs(got.astype(np.float64) - expected).max())
        assert err < FP32_ATOL, f"{variant_path.name}: max |diff| {err:.3g}"


# --------------------------------------------------------------------------------------
# The lowering against numpy references of the documented formulas


def _one_node_model(node: onnx.NodeProto, inputs: dict[str, np.ndarray],
                    initializers: dict[str, np.ndarray], outputs: list[str],
                    rank: int = 4) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [f"{k}{i}" for i in range(rank)])
         for k in outputs],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid(MS_DOMAIN, 1)])


def _run_lowered(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    lowered = lower(model)
    onnx.checker.check_model(lowered)
    assert [o.domain for o in lowered.opset_import] == [""]
    return list(_session(lowered).run(None, inputs))


def _group_norm_ref(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                    epsilon: float, silu: bool) -> np.ndarray:
    """GroupNorm of NHWC ``x`` in float64: statistics per (sample, group) over H, W and
    the group's C/groups channels; biased variance."""
    n, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(n, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + epsilon)).reshape(x.shape) * gamma + beta
    return y / (1.0 + np.exp(-y)) if silu else y


def _norm_inputs(rng: np.random.Generator, shape: tuple[int, ...], groups: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NHWC data whose groups spread from 1e-3 to 1, so that epsilon matters in some."""
    c = shape[-1]
    spread = np.repeat(np.geomspace(1e-3, 1.0, groups), c // groups)
    x = ((rng.standard_normal(shape) + 0.5 * rng.standard_normal(c)) * spread).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    return x, gamma, beta


@pytest.mark.parametrize("activation", [0, 1])
@pytest.mark.parametrize("channels_last", [1, 0])
def test_group_norm_lowering(rng: np.random.Generator, activation: int,
                             channels_last: int) -> None:
    groups, epsilon = 4, 1e-4
    x, gamma, beta = _norm_inputs(rng, (2, 5, 3, 16), groups)  # NHWC
    expected = _group_norm_ref(x, gamma, beta, groups, epsilon, bool(activation))
    data = x if channels_last else x.transpose(0, 3, 1, 2).copy()
    node = helper.make_node("GroupNorm", ["X", "gamma", "beta"], ["Y"], domain=MS_DOMAIN,
                            groups=groups, epsilon=epsilon, activation=activation,
                            channels_last=channels_last)
    model = _one_node_model(node, {"X": data}, {"gamma": gamma, "beta": beta}, ["Y"])
    (got,) = _run_lowered(model, {"X": data})
    if not channels_last:
        got = got.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the check is sharp enough to tell epsilon apart from 10x epsilon
    other = _group_norm_ref(x, gamma, beta, groups, 10 * epsilon, bool(activation))
    assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("skip_shape, with_bias, activation", [
    ("full", False, 1), ("full", True, 0), ("n11c", True, 1), ("nc", False, 0)])
def test_skip_group_norm_lowering(rng: np.random.Generator, skip_shape: str,
                                  with_bias: bool, activation: int) -> None:
    groups, epsilon, n, h, w, c = 2, 1e-5, 2, 4, 3, 8
    x, gamma, beta = _norm_inputs(rng, (n, h, w, c), groups)
    shapes = {"full": (n, h, w, c), "n11c": (n, 1, 1, c), "nc": (n, c)}
    skip = rng.standard_normal(shapes[skip_shape]).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    s = x + (skip if skip.ndim == 4 else skip[:, None, None, :]) + (bias if with_bias else 0)
    inputs = ["X", "gamma", "beta", "skip", *(["bias"] if with_bias else [])]
    node = helper.make_node("SkipGroupNorm", inputs, ["Y", "S"], domain=MS_DOMAIN,
                            groups=groups, epsilon=epsilon, activation=activation,
                            channels_last=1)
    feeds = {"X": x, "skip": skip}
    inits = {"gamma": gamma, "beta": beta, **({"bias": bias} if with_bias else {})}
    y, s_out = _run_lowered(_one_node_model(node, feeds, inits, ["Y", "S"]), feeds)
    np.testing.assert_allclose(s_out, s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, _group_norm_ref(s, gamma, beta, groups, epsilon,
                                                    bool(activation)),
                               rtol=1e-4, atol=1e-4)


def _conv_nhwc_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, strides: list[int],
                   pads: list[int], dilations: list[int], group: int) -> np.ndarray:
    """Convolution of NHWC ``x`` with an (M, kH, kW, C/group) weight, in float64."""
    n, _, _, _ = x.shape
    m, kh, kw, cg = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    ho = (xp.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, ho, wo, m)) + b
    mg = m // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilations[0], j * dilations[1]
                patch = xp[:, r0:r0 + strides[0] * (ho - 1) + 1:strides[0],
                           c0:c0 + strides[1] * (wo - 1) + 1:strides[1], g * cg:(g + 1) * cg]
                out[..., g * mg:(g + 1) * mg] += np.einsum(
                    "nhwc,mc->nhwm", patch, w[g * mg:(g + 1) * mg, i, j, :])
    return out


@pytest.mark.parametrize("strides, pads, dilations, group, with_bias", [
    ([1, 1], [1, 1, 1, 1], [1, 1], 1, True),
    ([2, 1], [1, 0, 2, 1], [1, 1], 1, False),
    ([2, 2], [0, 1, 1, 0], [2, 1], 2, True),
])
def test_nhwc_conv_lowering(rng: np.random.Generator, strides: list[int], pads: list[int],
                            dilations: list[int], group: int, with_bias: bool) -> None:
    c, m, kh, kw = 4, 6, 3, 2
    x = rng.standard_normal((2, 7, 6, c)).astype(np.float32)  # NHWC
    w = rng.standard_normal((m, kh, kw, c // group)).astype(np.float32)  # NHWC weight
    b = rng.standard_normal(m).astype(np.float32)
    node = helper.make_node("NhwcConv", ["X", "W", *(["B"] if with_bias else [])], ["Y"],
                            domain=MS_DOMAIN, kernel_shape=[kh, kw], strides=strides,
                            pads=pads, dilations=dilations, group=group)
    inits = {"W": w, **({"B": b} if with_bias else {})}
    (got,) = _run_lowered(_one_node_model(node, {"X": x}, inits, ["Y"]), {"X": x})
    expected = _conv_nhwc_ref(x, w, b if with_bias else np.zeros(m), strides, pads,
                              dilations, group)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bias_add_lowering(rng: np.random.Generator) -> None:
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    skip = rng.standard_normal((2, 5, 8)).astype(np.float32)
    node = helper.make_node("BiasAdd", ["X", "bias", "skip"], ["Y"], domain=MS_DOMAIN)
    feeds = {"X": x, "skip": skip}
    (got,) = _run_lowered(_one_node_model(node, feeds, {"bias": bias}, ["Y"], rank=3), feeds)
    np.testing.assert_allclose(got, x + bias + skip, rtol=1e-6, atol=1e-6)


def test_lowering_keeps_other_contrib_ops_and_their_domain() -> None:
    nodes = [helper.make_node("BiasAdd", ["X", "bias", "X"], ["Y"], domain=MS_DOMAIN),
             helper.make_node("FastGelu", ["Y"], ["Z"], domain=MS_DOMAIN)]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 4])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(MS_DOMAIN, 1)])
    lowered = lower(model)
    assert [(n.domain, n.op_type) for n in lowered.graph.node
            if n.domain == MS_DOMAIN] == [(MS_DOMAIN, "FastGelu")]
    assert any(o.domain == MS_DOMAIN for o in lowered.opset_import)
    assert [n.op_type for n in model.graph.node] == ["BiasAdd", "FastGelu"]  # not changed
