"""runtime/backends/ort.py: exact against the numpy oracle, strict about files and feeds.

CPU tests run everywhere. The IO-binding engine (device buffers per batch size,
ping-pong run_loop, gpu_graph_id bookkeeping, CUDA-graph fallback) runs here on CPU
OrtValues; the CUDA EP, real CUDA graphs and the TensorRT EP need hardware and are
marked ``gpu`` / ``tensorrt``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_oracle as oo
import onnxruntime as ort
import pytest

from fewstep.runtime import backends
from fewstep.runtime.backends import ort as ortb
from fewstep.runtime.backends import ort_options as orto
from fewstep.runtime.backends.cuda import CudaGraphFallback
from fewstep.runtime.backends.oracle import make_oracle
from fewstep.runtime.errors import ArtifactError, BackendUnavailable
from fewstep.runtime.meta import SCHEMA_VERSION, ModelMeta
from fewstep.runtime.pipeline import Pipeline

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
NO_CUDA = "needs onnxruntime-gpu with the CUDAExecutionProvider and an NVIDIA GPU"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)


def feeds_for(meta: ModelMeta, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, *meta.image_shape)
    f: dict[str, np.ndarray] = {"x": rng.standard_normal(shape).astype(np.float32)}
    g = meta.graph
    if "t" in g.inputs:
        f["t"] = rng.integers(0, 1000, n).astype(np.float32)
    if g.kind == "step":
        a = meta.schedule.alphas_cumprod()
        t = f["t"].astype(int)
        f["a_t"] = a[t].astype(np.float32)
        f["a_prev"] = a[np.maximum(t - 100, 0)].astype(np.float32)
        f["eta"] = rng.uniform(0, 1, n).astype(np.float32)
        f["noise"] = rng.standard_normal(shape).astype(np.float32)
    if "label" in g.inputs:
        f["label"] = rng.integers(0, meta.num_classes, n).astype(np.int64)
    if "guidance" in g.inputs:
        f["guidance"] = rng.uniform(0, 3, n).astype(np.float32)
    if g.kind == "sampler" and g.eta > 0:
        f["noise"] = rng.standard_normal((n, g.steps, *meta.image_shape)).astype(np.float32)
    return f


GRAPHS = [
    ("denoiser", {}), ("denoiser", {"guidance": True}), ("step", {}),
    ("step", {"guidance": True}),
    ("sampler", {"steps": 3, "spacing": "trailing"}),
    ("sampler", {"steps": 2, "spacing": "leading", "eta": 1.0}),
    ("sampler", {"steps": 4, "spacing": "linspace", "output_format": "uint8", "guidance": True}),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("kind", "changes", "classes"),
                         [(k, c, n) for k, c in GRAPHS for n in (0, 3)
                          if n or not c.get("guidance")])  # guidance needs classes
def test_cpu_graph_matches_the_numpy_oracle(kind: str, changes: dict[str, Any],
                                            prediction_type: str, classes: int,
                                            tmp_path: Path) -> None:
    meta = oo.make_meta(prediction_type, num_classes=classes).for_graph(kind=kind, **changes)
    x0 = oo.pixel_x0(meta, rows=classes + 1 if classes else 1)
    path = oo.write(tmp_path / "g.onnx", meta, x0)
    graph = backends.load(str(path), "ort-cpu")
    assert isinstance(graph, backends.Graph) and graph.backend == "ort-cpu"
    assert graph.meta == meta and graph.path == str(path) and graph.max_batch is None
    feeds = feeds_for(meta, 5)
    out, want = graph.run(feeds), make_oracle(meta, x0).run(feeds)
    assert out.dtype == want.dtype and out.shape == want.shape
    if out.dtype == np.uint8:
        np.testing.assert_array_equal(out, want)
    else:
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(out, want, atol=2e-5 * scale, rtol=1e-5)


@pytest.fixture
def step_graph(tmp_path: Path) -> tuple[Path, ModelMeta, np.ndarray]:
    meta = oo.make_meta("v_prediction", num_classes=2).for_graph(kind="step")
    x0 = oo.pixel_x0(meta)
    return oo.write(tmp_path / "model.step.onnx", meta, x0, bias_x=0.2), meta, x0


def _loop_inputs(meta: ModelMeta, n: int, steps: int) -> tuple[np.ndarray, dict[str, Any],
                                                               list[dict[str, Any]]]:
    f = feeds_for(meta, n, seed=steps)
    x = f.pop("x")
    fixed = {"label": f["label"], "eta": f["eta"]}
    ts, a_t, a_prev = meta.schedule.step_alphas(steps, "trailing")
    rng = np.random.default_rng(1)
    per_step = [{"t": np.full(n, t, np.float32), "a_t": np.full(n, a, np.float32),
                 "a_prev": np.full(n, p, np.float32),
                 "noise": rng.standard_normal(x.shape).astype(np.float32)}
                for t, a, p in zip(ts, a_t, a_prev, strict=True)]
    return x, fixed, per_step


@pytest.mark.parametrize("io_binding", [False, True])
def test_run_loop_equals_a_manual_loop(io_binding: bool,
                                       step_graph: tuple[Path, ModelMeta, np.ndarray]) -> None:
    path, meta, _ = step_graph
    graph = ortb.open_graph(str(path), "ort-cpu", io_binding=io_binding, threads=1)
    for n, steps in ((3, 1), (3, 4), (2, 5), (3, 4)):  # odd and even: both ping-pong ends
        x, fixed, per_step = _loop_inputs(meta, n, steps)
        want = x
        for f in per_step:
            want = graph.run({"x": want, **fixed, **f})
        got = graph.run_loop(x, fixed, per_step)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(graph.run_loop(x, fixed, []), x)
    if io_binding:
        assert sorted(graph._buffers) == [2, 3]  # one set of buffers per batch size
        assert not graph.cuda_graph


def test_bound_results_are_not_overwritten_by_later_runs(
        step_graph: tuple[Path, ModelMeta, np.ndarray]) -> None:
    path, meta, _ = step_graph
    graph = ortb.open_graph(str(path), "ort-cpu", io_binding=True)
    a_feeds, b_feeds = feeds_for(meta, 3, seed=1), feeds_for(meta, 3, seed=2)
    a = graph.run(a_feeds)
    a_copy = a.copy()
    b = graph.run(b_feeds)
    np.testing.assert_array_equal(a, a_copy)
    assert not np.array_equal(a, b)


def test_cuda_graph_bookkeeping_and_fallback_on_cpu_ortvalues(
        step_graph: tuple[Path, ModelMeta, np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph code path with CPU buffers: graph ids, then a failed 'capture'."""
    path, meta, _ = step_graph
    config = orto.OrtConfig(backend="ort-cpu", io_binding=True, cuda_graph=True, threads=1)
    graph = ortb.OrtGraph(str(path), meta, config)
    reference = ortb.open_graph(str(path), "ort-cpu")
    assert graph.cuda_graph
    x, fixed, per_step = _loop_inputs(meta, 3, 3)
    want = reference.run_loop(x, fixed, per_step)
    np.testing.assert_array_equal(graph.run_loop(x, fixed, per_step), want)
    ids = [opts.get_run_config_entry("gpu_graph_id") for _, opts in graph._buffers[3].bound]
    assert ids == ["1", "2"]  # one captured graph per ping-pong direction
    graph.run_loop(*_loop_inputs(meta, 2, 2))
    assert [o.get_run_config_entry("gpu_graph_id") for _, o in graph._buffers[2].bound] == [
        "3", "4"]

    calls = {"n": 0}
    real = type(graph._session).run_with_iobinding

    def flaky(self: Any, binding: Any, options: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is "
                               "capturing\nmore detail")
        real(self, binding, options)

    monkeypatch.setattr(type(graph._session), "run_with_iobinding", flaky)
    with pytest.warns(UserWarning, match=r"CUDA graphs unavailable for model.step.onnx "
                                         r"\(CUDA failure 900.*capturing\); running without"):
        got = graph.run_loop(x, fixed, per_step)
    np.testing.assert_array_equal(got, want)
    assert not graph.cuda_graph


@pytest.mark.parametrize("io_binding", [True, False])
def test_network_run_repeats_the_graph_alone_on_the_given_inputs(
        step_graph: tuple[Path, ModelMeta, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        io_binding: bool) -> None:
    path, meta, _ = step_graph
    graph = ortb.OrtGraph(str(path), meta, orto.OrtConfig(backend="ort-cpu",
                                                          io_binding=io_binding, threads=1))
    feeds = feeds_for(meta, 2)
    x = feeds["x"]
    for _ in range(3):  # what 3 launches of a step graph compute: x fed back each time
        x = graph.run({**feeds, "x": x})
    session_type = type(graph._session)
    counted = {"n": 0}
    real = session_type.run_with_iobinding if io_binding else session_type.run

    def count(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(session_type, "run_with_iobinding" if io_binding else "run", count)
    net = graph.network_run(feeds, launches=3)
    assert net.method.startswith("3 × " + ("run_with_iobinding" if io_binding
                                           else "InferenceSession.run"))
    net.call()
    net.call()
    assert counted["n"] == 6
    if io_binding:  # the inputs were uploaded once; after 3 launches x is in the output
        graph2 = ortb.OrtGraph(str(path), meta, orto.OrtConfig(backend="ort-cpu",
                                                               io_binding=True, threads=1))
        graph2.network_run(feeds, launches=3).call()
        np.testing.assert_allclose(graph2._buffers[2].out.numpy(), x, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="launches=0 must be a whole number >= 1"):
        graph.network_run(feeds, launches=0)
    with pytest.raises(ValueError, match="do not match"):
        graph.network_run({"x": feeds["x"]})


def test_cuda_graph_session_failure_falls_back(step_graph: tuple[Path, ModelMeta, np.ndarray],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path, meta, _ = step_graph
    real = ortb.OrtGraph._new_session

    def refuse(self: ortb.OrtGraph, cuda_graph: bool) -> Any:
        if cuda_graph:
            raise RuntimeError("This session cannot use the CUDA Graph feature as requested "
                               "by the user as all compute graph nodes have not been "
                               "partitioned to the CUDA EP.")
        return real(self, cuda_graph)

    monkeypatch.setattr(ortb.OrtGraph, "_new_session", refuse)
    config = orto.OrtConfig(backend="ort-cpu", io_binding=True, cuda_graph=True, threads=1)
    with pytest.warns(UserWarning, match="CUDA graphs unavailable for model.step.onnx"):
        graph = ortb.OrtGraph(str(path), meta, config)
    assert not graph.cuda_graph
    feeds = feeds_for(meta, 2)
    np.testing.assert_array_equal(graph.run(feeds),
                                  ortb.open_graph(str(path), "ort-cpu").run(feeds))


class _FailingRuns:
    """A real session whose bound runs fail the way cuDNN's frontend does when it cannot
    build a fused convolution + bias engine (the message of the 2026-12-01 H200 run)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run_with_iobinding(self, *args: Any) -> None:
        raise RuntimeError("Non-zero status code returned while running Conv node. Name:"
                           "'node_conv2d' Status Message: Failed to initialize CUDNN Frontend")

    def run(self, *args: Any) -> None:
        self.run_with_iobinding()


@pytest.mark.parametrize("where", ["open", "run", "run-unbound", "always"])
def test_fused_bias_default_is_dropped_when_it_fails(
        where: str, step_graph: tuple[Path, ModelMeta, np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fewstep's own default (fuse_conv_bias on a variant graph) never costs a user their
    images: a session that fails to open or to run with it warns once and runs without it,
    before CUDA graphs are given up; a failure that is not its fault still surfaces."""
    path, meta, _ = step_graph
    feeds = feeds_for(meta, 2)
    want = ortb.open_graph(str(path), "ort-cpu").run(feeds)
    real = ortb.OrtGraph._new_session
    monkeypatch.setattr(ortb, "fuse_conv_bias_default", lambda meta, config, version: True)

    def session(self: ortb.OrtGraph, cuda_graph: bool) -> Any:
        made = real(self, cuda_graph)
        if self.fuse_conv_bias or where == "always":
            if where == "open":
                raise RuntimeError("Failed to initialize CUDNN Frontend")
            return _FailingRuns(made)
        return made

    monkeypatch.setattr(ortb.OrtGraph, "_new_session", session)
    config = orto.OrtConfig(backend="ort-cpu", io_binding=where != "run-unbound",
                            cuda_graph=False, threads=1)
    if where == "always":
        graph = ortb.OrtGraph(str(path), meta, config)
        with pytest.warns(RuntimeWarning, match="fuse_conv_bias"), pytest.raises(
                RuntimeError, match="Failed to initialize CUDNN Frontend"):
            graph.run(feeds)
        assert not graph.fuse_conv_bias
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ortb.OrtGraph(str(path), meta, config)
        assert graph.fuse_conv_bias is (where != "open")
        got = graph.run(feeds)
        again = graph.run(feeds)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1 and "model.step.onnx: cuDNN's fused convolution + bias" in said[0]
    assert "Failed to initialize CUDNN Frontend" in said[0] and "'0'" in said[0]
    assert not graph.fuse_conv_bias and not graph.describe()["fuse_conv_bias"]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, want)


def test_fuse_conv_bias_default() -> None:
    """On for ORT-CUDA variant graphs on ort-cuda with ONNX Runtime >= 1.20, unless the
    user's cuda_options name it; never for portable graphs (cuDNN's frontend failed or
    gave wrong images there) or other backends."""
    meta = oo.make_meta("v_prediction", num_classes=4).for_graph(kind="step")
    variant = meta.for_graph(target="ort-cuda")
    cuda = orto.make_config("ort-cuda", "/m/model.ort-cuda.onnx", {}, on_jetson=False)
    assert orto.fuse_conv_bias_default(variant, cuda, (1, 31, 1))
    assert orto.fuse_conv_bias_default(variant, cuda, (1, 20, 0))
    assert not orto.fuse_conv_bias_default(variant, cuda, (1, 19, 2))
    assert not orto.fuse_conv_bias_default(meta, cuda, (1, 31, 1))
    for backend in ("ort-cpu", "ort-tensorrt"):
        other = orto.make_config(backend, "/m/model.ort-cuda.onnx", {}, on_jetson=False)
        assert not orto.fuse_conv_bias_default(variant, other, (1, 31, 1))
    mine = orto.make_config("ort-cuda", "/m/model.ort-cuda.onnx",
                            {"cuda_options": {"fuse_conv_bias": "0"}}, on_jetson=False)
    assert not orto.fuse_conv_bias_default(variant, mine, (1, 31, 1))
    assert orto.cuda_provider_options(cuda, True, fuse_conv_bias=True) == {
        "device_id": "0", "enable_cuda_graph": "1", "fuse_conv_bias": "1"}
    assert orto.cuda_provider_options(mine, False)["fuse_conv_bias"] == "0"
    providers = dict(orto.providers_for(variant, cuda, cuda_graph=False, fuse_conv_bias=True))
    assert providers["CUDAExecutionProvider"]["fuse_conv_bias"] == "1"


def test_old_onnxruntime_runs_without_cuda_graphs(step_graph: tuple[Path, ModelMeta, np.ndarray],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path, meta, _ = step_graph
    monkeypatch.setattr(ort, "__version__", "1.17.3")
    config = orto.OrtConfig(backend="ort-cpu", io_binding=True, cuda_graph=True)
    with pytest.warns(CudaGraphFallback, match=r"CUDA graphs unavailable for model.step.onnx "
                      r"\(onnxruntime 1.17.3 captures one CUDA graph per session; gpu_graph_id "
                      r"needs >= 1.18\); running without them"):
        graph = ortb.OrtGraph(str(path), meta, config)
    assert not graph.cuda_graph


# ---------------------------------------------------------------------------------
# Feeds
# ---------------------------------------------------------------------------------


def test_feeds_are_checked_and_cast(step_graph: tuple[Path, ModelMeta, np.ndarray]) -> None:
    path, meta, _ = step_graph
    graph = backends.load(str(path), "ort-cpu")
    feeds = feeds_for(meta, 2)
    want = graph.run(feeds)
    loose = {k: (v.astype(np.int32) if k == "label" else v.astype(np.float64))
             for k, v in feeds.items()}
    np.testing.assert_array_equal(graph.run(loose), want)
    with pytest.raises(ValueError, match=r"feeds \[.*\] do not match model.step.onnx; pass "
                                         r"exactly \['a_prev', 'a_t', 'eta', 'label', 'noise', "
                                         r"'t', 'x'\]"):
        graph.run({k: v for k, v in feeds.items() if k != "eta"})
    with pytest.raises(ValueError, match="do not match"):
        graph.run({**feeds, "extra": feeds["t"]})
    with pytest.raises(ValueError, match=r"input 'x' has shape \(2, 3, 4, 4\); model.step.onnx "
                                         r"takes \(2, 3, 8, 8\)"):
        graph.run({**feeds, "x": np.zeros((2, 3, 4, 4), np.float32)})
    with pytest.raises(ValueError, match=r"input 't' has shape \(3,\)"):
        graph.run({**feeds, "t": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="run_loop feeds"):
        graph.run_loop(feeds["x"], {"eta": feeds["eta"]}, [{"t": feeds["t"]}])


def test_run_loop_needs_a_step_graph(tmp_path: Path) -> None:
    meta = oo.make_meta("epsilon")
    graph = backends.load(str(oo.write(tmp_path / "m.onnx", meta, oo.pixel_x0(meta))), "ort-cpu")
    with pytest.raises(ValueError, match=r"run_loop needs a step graph; m\.onnx is a denoiser"):
        graph.run_loop(np.zeros((1, 3, 8, 8), np.float32), {}, [])


# ---------------------------------------------------------------------------------
# Files that do not match their metadata, or are not fewstep files at all
# ---------------------------------------------------------------------------------


@pytest.fixture
def meta8() -> ModelMeta:
    return oo.make_meta("epsilon", num_classes=2)


def test_wrong_input_names(tmp_path: Path, meta8: ModelMeta) -> None:
    path = oo.write(tmp_path / "m.onnx", meta8, oo.pixel_x0(meta8), rename={"t": "timestep"})
    with pytest.raises(ArtifactError) as e:
        backends.load(str(path), "ort-cpu")
    msg = str(e.value)
    assert "metadata says inputs ['x', 't', 'label'] but the graph has ['x', 'timestep', " \
           "'label']; re-export it with `fewstep export`" in msg
    assert msg.startswith(str(path))


def test_wrong_dims(tmp_path: Path, meta8: ModelMeta) -> None:
    meta16 = oo.make_meta("epsilon", num_classes=2, size=16)
    path = oo.write(tmp_path / "m.onnx", meta16, oo.pixel_x0(meta16), metadata=meta8.to_json())
    with pytest.raises(ArtifactError, match=r"metadata says 'x' is float32 \(B, 3, 8, 8\) "
                                            r"\(batch dynamic\) but the graph has tensor\(float\) "
                                            r"\(\?, 3, 16, 16\); re-export"):
        backends.load(str(path), "ort-cpu")


def test_wrong_output_format(tmp_path: Path, meta8: ModelMeta) -> None:
    s = meta8.for_graph(kind="sampler", steps=2, spacing="trailing")
    claims_uint8 = s.for_graph(output_format="uint8")
    path = tmp_path / "m.sampler-2.onnx"
    model = oo.build(s, oo.pixel_x0(s), metadata=claims_uint8.to_json())
    model.graph.output[0].name = "image"
    model.graph.node[-1].output[0] = "image"
    onnx.save_model(model, str(path))
    with pytest.raises(ArtifactError, match=r"'image' is uint8 \(B, 8, 8, 3\) .* but the graph "
                                            r"has tensor\(float\) \(\?, 3, 8, 8\)"):
        backends.load(str(path), "ort-cpu")


def test_fixed_batch_is_refused(tmp_path: Path, meta8: ModelMeta) -> None:
    model = oo.build(meta8, oo.pixel_x0(meta8))
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ArtifactError, match=r"'x' is float32 \(B, 3, 8, 8\) \(batch dynamic\) "
                                            r"but the graph has tensor\(float\) \(1, 3, 8, 8\)"):
        backends.load(str(path), "ort-cpu")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, m: p.write_bytes(os.urandom(4096)), "is not an ONNX model"),
        (lambda p, m: p.write_bytes(b""), "is not an ONNX model"),
        (lambda p, m: oo.write(p, m, oo.pixel_x0(m), metadata=""),
         "has no fewstep metadata (metadata_props['fewstep.meta']); it was not exported by "
         "fewstep: export it with `fewstep export CHECKPOINT`"),
        (lambda p, m: oo.write(p, m, oo.pixel_x0(m), metadata=m.to_json().replace(
            f'"schema_version": {SCHEMA_VERSION}', f'"schema_version": {SCHEMA_VERSION + 1}')),
         f"metadata schema version {SCHEMA_VERSION + 1} is newer than this fewstep supports "
         f"({SCHEMA_VERSION}); upgrade fewstep"),
        (lambda p, m: oo.write(p, m, oo.pixel_x0(m), metadata="{not json"),
         "fewstep metadata is not valid JSON"),
        (lambda p, m: oo.write(p, m, oo.pixel_x0(m), unknown_op=True),
         "onnxruntime cannot load"),
    ],
)
def test_bad_files_are_one_artifact_error(make: Any, message: str, tmp_path: Path,
                                          meta8: ModelMeta) -> None:
    path = tmp_path / "m.onnx"
    make(path, meta8)
    with pytest.raises(ArtifactError) as e:
        backends.load(str(path), "ort-cpu")
    assert message in str(e.value)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_file(tmp_path: Path, meta8: ModelMeta) -> None:
    full = oo.write(tmp_path / "full.onnx", meta8, oo.pixel_x0(meta8)).read_bytes()
    for cut in (7, len(full) // 3, len(full) // 2, len(full) - 5):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(full[:cut])
        with pytest.raises(ArtifactError, match=f"cut{cut}.onnx"):
            backends.load(str(path), "ort-cpu")


def test_missing_external_weights(tmp_path: Path, meta8: ModelMeta) -> None:
    model = oo.build(meta8, oo.pixel_x0(meta8))
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.weights.bin",
                    size_threshold=1024)
    graph = backends.load(str(path), "ort-cpu")  # complete: loads
    assert graph.meta == meta8
    (tmp_path / "m.weights.bin").unlink()
    with pytest.raises(ArtifactError, match=r"keeps its weights in 'm\.weights\.bin', "
                                            r"which is missing beside it"):
        backends.load(str(path), "ort-cpu")


# ---------------------------------------------------------------------------------
# Availability and options
# ---------------------------------------------------------------------------------


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ortb.unavailable_reason("ort-cpu") is None
    if not HAS_CUDA:
        reason = ortb.unavailable_reason("ort-cuda")
        assert reason is not None and "has no CUDAExecutionProvider" in reason
        assert "onnxruntime-gpu" in reason and "CPUExecutionProvider" in reason
    trt = ortb.unavailable_reason("ort-tensorrt")
    if trt is not None:
        assert "TensorRT libraries" in trt
    assert backends.resolve("auto") == ("ort-cuda" if HAS_CUDA else "ort-cpu")

    def missing() -> Any:
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(ortb, "_import_ort", missing)
    reason = ortb.unavailable_reason("ort-cpu")
    assert reason is not None and "onnxruntime cannot be imported" in reason
    assert "pip install onnxruntime" in reason


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA EP")
def test_loading_an_unavailable_backend(tmp_path: Path, meta8: ModelMeta) -> None:
    path = oo.write(tmp_path / "m.onnx", meta8, oo.pixel_x0(meta8))
    with pytest.raises(BackendUnavailable, match="backend 'ort-cuda' is not usable here: "):
        backends.load(str(path), "ort-cuda")


def test_options_are_validated(tmp_path: Path, meta8: ModelMeta) -> None:
    path = str(oo.write(tmp_path / "m.onnx", meta8, oo.pixel_x0(meta8)))
    graph = ortb.open_graph(path, "ort-cpu")
    assert graph.config.threads == os.cpu_count()
    assert not graph.config.io_binding and not graph.cuda_graph
    assert ortb.open_graph(path, "ort-cpu", threads=1).config.threads == 1
    with pytest.raises(ValueError, match=r"option\(s\) cuda_graph not supported by "
                                         r"backend 'ort-cpu'; use threads, io_binding"):
        ortb.open_graph(path, "ort-cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="threads=0 must be a whole number >= 1"):
        ortb.open_graph(path, "ort-cpu", threads=0)
    with pytest.raises(ValueError, match="io_binding='yes' must be True or False"):
        ortb.open_graph(path, "ort-cpu", io_binding="yes")
    with pytest.raises(ValueError, match=r"option\(s\) nope not supported"):
        Pipeline.load(path, backend="ort-cpu", nope=1)


def test_cuda_provider_options() -> None:
    desk = orto.make_config("ort-cuda", "/m/model.onnx", {}, on_jetson=False)
    assert desk.io_binding and desk.cuda_graph and desk.threads is None
    assert orto.cuda_provider_options(desk, True) == {"device_id": "0", "enable_cuda_graph": "1"}
    assert orto.cuda_provider_options(desk, False) == {"device_id": "0"}
    off = orto.make_config("ort-cuda", "/m/model.onnx", {"cuda_graph": False, "device_id": 1},
                           on_jetson=False)
    assert not off.cuda_graph and off.device_id == 1
    jet = orto.make_config("ort-cuda", "/m/model.onnx", {}, on_jetson=True)
    opts = orto.cuda_provider_options(jet, True)
    assert opts["arena_extend_strategy"] == "kSameAsRequested"
    assert opts["cudnn_conv_algo_search"] == "HEURISTIC"
    from fewstep.runtime import jetson

    total = jetson.physical_memory_bytes()
    assert total and int(opts["gpu_mem_limit"]) == total // 2
    mine = orto.make_config("ort-cuda", "/m/model.onnx", {"gpu_mem_limit": 1 << 30},
                            on_jetson=True)
    assert orto.cuda_provider_options(mine, True)["gpu_mem_limit"] == str(1 << 30)


def test_tensorrt_provider_options() -> None:
    meta = oo.make_meta("v_prediction", num_classes=4)
    step = meta.for_graph(kind="step")
    config = orto.make_config("ort-tensorrt", "/models/m/model.step.onnx",
                              {"max_batch": 8, "opt_batch": 4, "fp16": True,
                               "workspace_size": 1 << 30}, on_jetson=False)
    assert config.max_batch == 8 and not config.cuda_graph and config.io_binding
    opts = orto.tensorrt_provider_options(step, config)
    cache = str(Path("/models/m/.fewstep-cache/ort-trt"))
    assert opts == {
        "device_id": "0",
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1", "trt_timing_cache_path": cache,
        "trt_profile_min_shapes":
            "x:1x3x8x8,t:1,a_t:1,a_prev:1,eta:1,noise:1x3x8x8,label:1",
        "trt_profile_opt_shapes":
            "x:4x3x8x8,t:4,a_t:4,a_prev:4,eta:4,noise:4x3x8x8,label:4",
        "trt_profile_max_shapes":
            "x:8x3x8x8,t:8,a_t:8,a_prev:8,eta:8,noise:8x3x8x8,label:8",
        "trt_fp16_enable": "1",
        "trt_max_workspace_size": str(1 << 30),
    }
    fp16 = step.for_graph(precision="fp16")
    assert "trt_fp16_enable" not in orto.tensorrt_provider_options(fp16, config)
    sampler = meta.for_graph(kind="sampler", steps=6, spacing="trailing", eta=1.0)
    default = orto.make_config("ort-tensorrt", "m.sampler-6-eta1.onnx",
                               {"cache_dir": "/c"}, on_jetson=False)
    s = orto.tensorrt_provider_options(sampler, default)
    assert s["trt_profile_max_shapes"] == "x:16x3x8x8,label:16,noise:16x6x3x8x8"
    assert s["trt_engine_cache_path"] == "/c" and "trt_fp16_enable" not in s
    names = [p for p, _ in orto.providers_for(sampler, default, cuda_graph=False)]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                     "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="opt_batch=9 exceeds max_batch=8"):
        orto.make_config("ort-tensorrt", "m.onnx", {"max_batch": 8, "opt_batch": 9})


# ---------------------------------------------------------------------------------
# GPU (CUDA EP, CUDA graphs) and TensorRT: skipped where the hardware is missing
# ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_cuda_matches_cpu(cuda_graph: bool, step_graph: tuple[Path, ModelMeta, np.ndarray]
                          ) -> None:
    path, meta, _ = step_graph
    cpu = ortb.open_graph(str(path), "ort-cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the oracle graph must capture cleanly
        gpu = ortb.open_graph(str(path), "ort-cuda", cuda_graph=cuda_graph)
    assert gpu.cuda_graph == cuda_graph and gpu.providers[0] == "CUDAExecutionProvider"
    for n in (1, 3, 3, 7, 3):  # new batch sizes capture new graphs; repeats replay
        feeds = feeds_for(meta, n, seed=n)
        np.testing.assert_allclose(gpu.run(feeds), cpu.run(feeds), atol=1e-5, rtol=1e-5)
        for steps in (1, 4, 5):
            x, fixed, per_step = _loop_inputs(meta, n, steps)
            np.testing.assert_allclose(gpu.run_loop(x, fixed, per_step),
                                       cpu.run_loop(x, fixed, per_step), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_pipeline_threads(tmp_path: Path) -> None:
    meta = oo.make_meta("v_prediction", num_classes=3)
    main = oo.write_artifact(tmp_path, meta, oo.pixel_x0(meta), bias_x=0.3)
    gpu = Pipeline.load(main, backend="ort-cuda")
    cpu = Pipeline.load(main, backend="ort-cpu")
    import threading

    results: dict[int, np.ndarray] = {}

    def work(s: int) -> None:
        results[s] = gpu.generate(5, 6, eta=1.0, seed=s, batch_size=2, output="samples")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(8):
        np.testing.assert_allclose(results[s], cpu.generate(5, 6, eta=1.0, seed=s,
                output="samples"),
                                   atol=1e-4)


@pytest.mark.tensorrt
@pytest.mark.skipif(ortb.unavailable_reason("ort-tensorrt") is not None,
                    reason=f"ort-tensorrt: {ortb.unavailable_reason('ort-tensorrt')}")
def test_tensorrt_ep_matches_cpu(tmp_path: Path) -> None:
    meta = oo.make_meta("v_prediction", num_classes=3)
    main = oo.write_artifact(tmp_path, meta, oo.pixel_x0(meta), bias_x=0.3)
    trt = Pipeline.load(main, backend="ort-tensorrt", max_batch=4)
    cpu = Pipeline.load(main, backend="ort-cpu")
    np.testing.assert_allclose(trt.generate(6, 4, eta=1.0, seed=1, output="samples"),
                               cpu.generate(6, 4, eta=1.0, seed=1, output="samples"), atol=1e-3)
    assert (tmp_path / ".fewstep-cache" / "ort-trt").is_dir()


def test_unchanged_small_inputs_are_not_uploaded_again_but_changed_ones_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = oo.make_meta("epsilon", num_classes=3).for_graph(
        kind="sampler", steps=2, spacing="trailing", guidance=True)
    x0 = oo.pixel_x0(meta)
    path = oo.write(tmp_path / "m.sampler-2.onnx", meta, x0)
    bound = ortb.open_graph(str(path), "ort-cpu", io_binding=True)
    plain = ortb.open_graph(str(path), "ort-cpu")
    uploads: list[str] = []
    real = ortb._Buffers.upload

    def spy(self: Any, name: str, arr: np.ndarray) -> None:
        before = self.last.get(name)
        real(self, name, arr)
        if before is None or not np.array_equal(before, arr) or name == "x":
            uploads.append(name)

    monkeypatch.setattr(ortb._Buffers, "upload", spy)
    calls = [feeds_for(meta, 2, seed=0), feeds_for(meta, 2, seed=0), feeds_for(meta, 2, seed=1),
             feeds_for(meta, 2, seed=0)]
    calls[1]["x"] = calls[2]["x"]  # same labels/guidance, other noise
    for feeds in calls:
        np.testing.assert_array_equal(bound.run(feeds), plain.run(feeds))
    # x every time; label and guidance only when they changed (calls 1, 3 and 4).
    assert uploads.count("x") == 4
    assert uploads.count("label") == 3 and uploads.count("guidance") == 3


def test_extra_cuda_options_pass_through() -> None:
    config = orto.make_config("ort-cuda", "/m/model.onnx",
                              {"cuda_options": {"prefer_nhwc": 1}}, on_jetson=False)
    assert orto.cuda_provider_options(config, True)["prefer_nhwc"] == "1"
    with pytest.raises(ValueError, match="cuda_options=3 must map CUDA EP option names"):
        orto.make_config("ort-cuda", "/m/model.onnx", {"cuda_options": 3}, on_jetson=False)


def test_bf16_graph_on_the_cpu_provider_is_refused_with_the_fix(tmp_path: Path) -> None:
    from fewstep.runtime import backends
    from fewstep.runtime.errors import ArtifactError

    meta = oo.make_meta("epsilon").for_graph(precision="bf16")
    path = oo.write(tmp_path / "m.onnx", meta, oo.pixel_x0(meta))
    with pytest.raises(ArtifactError, match=r"bf16 graph .* --backend ort-cuda"):
        backends.load(str(path), "ort-cpu")



@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_cuda_shipped_sampler_marks_nan_images_and_matches_cpu(cuda_graph: bool) -> None:
    from fewstep.runtime import artifact, images
    from fewstep.runtime import noise as host_noise
    from fewstep.runtime.pipeline import default_model_path

    path = artifact.graph_path(default_model_path(), "sampler", 4)
    meta = artifact.read_onnx_meta(path)
    x, _ = host_noise.generation_noise(5, range(3), meta.image_shape)
    x[1, 0, 4, 4] = np.nan
    feeds = {"x": x, "label": np.array([0, 3, 5], np.int64),
             "guidance": np.full(3, 2.0, np.float32)}
    gpu = ortb.open_graph(str(path), "ort-cuda", cuda_graph=cuda_graph).run(feeds)
    cpu = ortb.open_graph(str(path), "ort-cpu").run(feeds)
    assert list(images.nonfinite_images(gpu)) == [1] == list(images.nonfinite_images(cpu))
    assert np.abs(gpu[[0, 2]].astype(int) - cpu[[0, 2]].astype(int)).max() <= 1


def test_oracle_network_run_is_the_host_computation_repeated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    meta = oo.make_meta("epsilon", num_classes=2).for_graph(kind="step")
    graph = make_oracle(meta, oo.pixel_x0(meta, rows=2))
    assert isinstance(graph, backends.Graph)
    feeds = feeds_for(meta, 3)
    runs: list[dict[str, np.ndarray]] = []
    real = type(graph).run

    def spy(self: Any, f: Any) -> Any:
        runs.append(dict(f))
        return real(self, f)

    monkeypatch.setattr(type(graph), "run", spy)
    net = graph.network_run(feeds, launches=2)
    assert net.method == "2 × the oracle's host computation (no network)"
    net.call()
    assert len(runs) == 2 and all(set(r) == set(meta.graph.inputs) for r in runs)
    with pytest.raises(ValueError, match="do not match the inputs"):
        graph.network_run({"x": feeds["x"]})
