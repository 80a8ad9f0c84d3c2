"""export/triton.py: the Triton model repository of the tiny artifact.

Triton itself does not run here. Every config.pbtxt is parsed with Triton's own
ModelConfig protobuf (``tritonclient.grpc.model_config_pb2``) and checked against the
ONNX graphs as onnxruntime sees them; the graphs in the repository must load and give
the original's output; the Python backend's DDIM loop (``generate_rows`` /
``run_requests`` of the model.py in the repository, imported from there) must give
the images ``fewstep.runtime.Pipeline`` gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")
ort = pytest.importorskip("onnxruntime")

from fewstep.export import triton  # noqa: E402
from fewstep.runtime import artifact, backends, noise  # noqa: E402
from fewstep.runtime import plan as trt_plan  # noqa: E402
from fewstep.runtime.errors import ArtifactError  # noqa: E402
from fewstep.runtime.pipeline import Pipeline  # noqa: E402

ORT_TYPE = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64",
            "tensor(uint8)": "TYPE_UINT8"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse(folder: Path) -> Any:
    """config.pbtxt of a model folder, parsed by Triton's ModelConfig message."""
    return text_format.Parse((folder / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def type_name(value: int) -> str:
    return str(model_config_pb2.DataType.Name(value))


def seen_shape(tensor: Any) -> list[int]:
    """The per-request shape the backend sees: reshape when given, else dims."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def assert_matches_graph(config: Any, onnx_file: Path) -> None:
    """Names, types and non-batch shapes of the config agree with the ONNX graph."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()),
                             (config.output, session.get_outputs())):
        by_name = {t.name: t for t in declared}
        assert sorted(by_name) == sorted(a.name for a in actual)
        for a in actual:
            t = by_name[a.name]
            assert type_name(t.data_type) == ORT_TYPE[a.type], a.name
            assert not isinstance(a.shape[0], int), f"{a.name}: batch axis must be dynamic"
            assert seen_shape(t) == list(a.shape[1:]), a.name
            if t.HasField("reshape"):
                assert list(t.dims) == [1] and list(t.reshape.shape) == []


def load_model_py(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"triton_model_{sha(path)[:8]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repo(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "models"
    written = triton.write_repository(tiny_artifact, out)
    assert [p.name for p in written] == ["model_sampler2", "model_ddim"]
    return out


@pytest.fixture(scope="module")
def model_py(repo: Path) -> ModuleType:
    return load_model_py(repo / "model_ddim" / "1" / "model.py")


def test_layout_and_weights_beside_each_graph(repo: Path, tiny_artifact: Path) -> None:
    folder = tiny_artifact.parent
    weights = artifact.read_onnx_header(tiny_artifact).external_data
    assert len(weights) == 1
    files = {str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()}
    assert files == {
        "model_sampler2/config.pbtxt", "model_sampler2/fewstep-triton.json",
        "model_sampler2/1/model.onnx", f"model_sampler2/1/{weights[0]}",
        "model_ddim/config.pbtxt", "model_ddim/fewstep-triton.json",
        "model_ddim/1/model.py", "model_ddim/1/model.step.onnx", f"model_ddim/1/{weights[0]}",
    }
    pairs = [("model_sampler2/1/model.onnx", "model.sampler-2.onnx"),
             ("model_ddim/1/model.step.onnx", "model.step.onnx"),
             (f"model_ddim/1/{weights[0]}", weights[0]),
             ("model_ddim/1/model.py", None)]
    for copied, original in pairs:
        src = folder / original if original else triton.MODEL_PY
        assert sha(repo / copied) == sha(src), copied
    for graph in ("model_sampler2/1/model.onnx", "model_ddim/1/model.step.onnx"):
        locations = artifact.read_onnx_header(repo / graph).external_data
        assert all((repo / graph).with_name(loc).is_file() for loc in locations), graph
    marker = json.loads((repo / "model_sampler2" / triton.MARKER).read_text())
    assert marker["artifact"] == "model" and marker["source"] == "model.sampler-2.onnx"
    assert not list(repo.parent.glob(".fewstep-tmp-*"))


def test_onnxruntime_config_agrees_with_the_graph(repo: Path) -> None:
    config = parse(repo / "model_sampler2")
    assert config.name == "model_sampler2"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == trt_plan.DEFAULT_MAX_BATCH
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    db = config.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8, 16]
    assert db.max_queue_delay_microseconds == triton.DEFAULT_QUEUE_DELAY_US
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)]
    assert config.version_policy.latest.num_versions == 1
    assert_matches_graph(config, repo / "model_sampler2" / "1" / "model.onnx")
    assert [t.name for t in config.input] == ["x", "label", "guidance"]
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in config.output] == [
        ("image", "TYPE_UINT8", [16, 16, 3])]


def test_python_config(repo: Path) -> None:
    config = parse(repo / "model_ddim")
    assert config.name == "model_ddim" and config.backend == "python" and not config.platform
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    ins = {t.name: (type_name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert ins == {"seed": ("TYPE_INT64", [1], False), "label": ("TYPE_INT64", [1], True),
                   "guidance": ("TYPE_FP32", [1], True), "steps": ("TYPE_INT64", [1], True),
                   "eta": ("TYPE_FP32", [1], True)}
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in config.output] == [
        ("image", "TYPE_UINT8", [16, 16, 3])]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"graph": "model.step.onnx", "default_steps": "4", "spacing": "trailing",
                      "backend": "auto"}
    assert (repo / "model_ddim" / "1" / params["graph"]).is_file()


def test_repository_graph_gives_the_original_output(repo: Path, tiny_artifact: Path,
                                                     rng: np.random.Generator) -> None:
    feeds = {"x": rng.standard_normal((3, 3, 16, 16)).astype(np.float32),
             "label": np.array([0, 3, 5], np.int64),
             "guidance": np.array([1.0, 2.0, 3.5], np.float32)}
    cpu = ["CPUExecutionProvider"]
    served = ort.InferenceSession(str(repo / "model_sampler2" / "1" / "model.onnx"),
                                  providers=cpu)
    original = ort.InferenceSession(str(tiny_artifact.with_name("model.sampler-2.onnx")),
                                    providers=cpu)
    a, b = served.run(None, feeds)[0], original.run(None, feeds)[0]
    assert a.dtype == np.uint8 and a.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(a, b)


def test_model_py_loop_equals_the_pipeline(repo: Path, model_py: ModuleType,
                                           tiny_artifact: Path) -> None:
    assert model_py.pb_utils is None  # imported outside Triton: no stub anywhere
    graph = backends.load(str(repo / "model_ddim" / "1" / "model.step.onnx"), "ort-cpu")
    pipe = Pipeline.load(tiny_artifact, backend="ort-cpu")
    labels = np.array([5, 0, 2, 2, 1], np.int64)
    for steps, eta in ((3, 0.0), (5, 0.6)):
        want = pipe.generate(5, steps=steps, eta=eta, seed=7, labels=labels, guidance=2.5)
        assert pipe.last_path == "step"
        got = model_py.generate_rows(graph, [7] * 5, range(5), labels,
                                     np.full(5, 2.5, np.float32), steps, eta, "trailing")
        np.testing.assert_array_equal(got, want)


def test_model_py_denoiser_loop_equals_the_pipeline(tiny_artifact: Path, model_py: ModuleType,
                                                    tmp_path: Path) -> None:
    for name in ("model.onnx", *artifact.read_onnx_header(tiny_artifact).external_data):
        shutil.copyfile(tiny_artifact.with_name(name), tmp_path / name)
    pipe = Pipeline.load(tmp_path / "model.onnx", backend="ort-cpu")  # no step graph here
    want = pipe.generate(3, steps=3, seed=11, guidance=2.0)
    assert pipe.last_path == "denoiser"
    graph = backends.load(str(tmp_path / "model.onnx"), "ort-cpu")
    got = model_py.generate_rows(graph, [11] * 3, range(3), np.arange(3) % 6,
                                 np.full(3, 2.0, np.float32), 3, 0.0, "trailing")
    np.testing.assert_array_equal(got, want)


def test_run_requests_batches_requests_and_keeps_each_its_own(
        repo: Path, model_py: ModuleType, tiny_artifact: Path) -> None:
    graph = backends.load(str(repo / "model_ddim" / "1" / "model.step.onnx"), "ort-cpu")
    pipe = Pipeline.load(tiny_artifact, backend="ort-cpu")
    col = np.array
    requests = [
        {"seed": col([[3], [3], [3]]), "label": col([[1], [4], [0]]),
         "guidance": col([[2.0], [2.0], [2.0]], np.float32)},
        {"seed": col([[9], [9]]), "steps": col([[3], [3]])},  # default labels r % 6
        {"seed": col([[1]]), "label": col([[6]])},  # no class 6: an error for this one only
        {"label": col([[1]])},  # no seed
        {"seed": col([[5], [5]]), "eta": col([[0.5], [0.5]], np.float32)},
    ]
    defaults = model_py.Defaults(steps=4, spacing="trailing")
    out = model_py.run_requests(graph, requests, defaults, max_batch=4)
    np.testing.assert_array_equal(
        out[0], pipe.generate(3, steps=4, seed=3, labels=[1, 4, 0], guidance=2.0))
    np.testing.assert_array_equal(out[1], pipe.generate(2, steps=3, seed=9))
    assert isinstance(out[2], ValueError) and "outside the model's classes 0..5" in str(out[2])
    assert isinstance(out[3], ValueError) and "'seed' is required" in str(out[3])
    np.testing.assert_array_equal(out[4], pipe.generate(2, steps=4, eta=0.5, seed=5))


def test_generate_rows_uses_the_pipeline_noise_per_row(model_py: ModuleType,
                                                       repo: Path) -> None:
    graph = backends.load(str(repo / "model_ddim" / "1" / "model.step.onnx"), "ort-cpu")
    # Rows of different seeds in one batch = each row generated on its own.
    both = model_py.generate_rows(graph, [4, 8], [0, 1], np.array([2, 3]), None, 2, 0.0,
                                  "trailing")
    one = model_py.generate_rows(graph, [8], [1], np.array([3]), None, 2, 0.0, "trailing")
    np.testing.assert_array_equal(both[1:], one)


def write_fake_plan(folder: Path, tiny_artifact: Path, profile: trt_plan.BatchProfile,
                    plans: Path | None = None, graph: str = "sampler-2") -> Path:
    """A stand-in plan file + a well-formed sidecar for the graph ``model.<graph>.onnx``.

    For repository-layout tests only: there is no TensorRT here, so the "plan" is a few
    bytes that nothing ever deserializes; what is tested is where it is looked up, which
    model folder it lands in and the config.pbtxt written for it. ``plans``: the folder
    the plan goes to (default: beside the ONNX, ``folder``); the sidecar records the ONNX
    path relative to it, as ``fewstep build --all --out PLANS`` does.
    """
    onnx_file = folder / f"model.{graph}.onnx"
    plan_file = (plans or folder) / f"model.{graph}.plan"
    plan_file.write_bytes(b"not a real engine: Triton is not run here")
    digest, external = trt_plan.onnx_hashes(onnx_file)
    sidecar = trt_plan.new_sidecar(
        meta=artifact.read_onnx_meta(onnx_file), tensorrt_version="10.13.0",
        cuda_runtime_version="13.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        profile=profile, precision="fp32", strongly_typed=True, fp16_weak=False,
        builder_optimization_level=3, workspace_bytes=0, version_compatible=False,
        exclude_lean_runtime=False,
        onnx_file=os.path.relpath(onnx_file.resolve(), plan_file.resolve().parent),
        onnx_sha256=digest,
        external_data_sha256=external, plan_sha256=sha(plan_file),
        plan_bytes=plan_file.stat().st_size)
    trt_plan.write_sidecar(plan_file, sidecar)
    return plan_file


def copy_artifact(tiny_artifact: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in artifact.siblings(tiny_artifact):
        shutil.copyfile(p, folder / p.name)
    for name in artifact.read_onnx_header(tiny_artifact).external_data:
        shutil.copyfile(tiny_artifact.with_name(name), folder / name)
    return folder / "model.onnx"


def test_tensorrt_plan_model_and_cpu_variant(tiny_artifact: Path, tmp_path: Path) -> None:
    """Repository layout and configs for a plan beside the ONNX (a stand-in plan file)."""
    onnx_file = copy_artifact(tiny_artifact, tmp_path / "art")
    plan_file = write_fake_plan(onnx_file.parent, tiny_artifact, trt_plan.BatchProfile(1, 8, 32))
    repo = tmp_path / "models"
    options = triton.TritonOptions(instance_kind="cpu", max_queue_delay_us=100)
    names = [p.name for p in triton.write_repository(onnx_file, repo, options)]
    assert names == ["model_sampler2", "model_sampler2_trt", "model_ddim"]
    trt = parse(repo / "model_sampler2_trt")
    assert trt.platform == "tensorrt_plan" and trt.backend == "tensorrt"
    assert trt.max_batch_size == 32
    assert list(trt.dynamic_batching.preferred_batch_size) == [8, 32]
    assert trt.dynamic_batching.max_queue_delay_microseconds == 100
    assert [g.kind for g in trt.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_GPU]  # a plan needs the GPU
    assert_matches_graph(trt, onnx_file.with_name("model.sampler-2.onnx"))
    assert sha(repo / "model_sampler2_trt" / "1" / "model.plan") == sha(plan_file)
    for name in ("model_sampler2", "model_ddim"):
        config = parse(repo / name)
        assert [g.kind for g in config.instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_CPU]
        assert config.max_batch_size == (32 if name == "model_sampler2" else 16)
    # A profile that does not start at 1 cannot take the dynamic batcher's batches.
    write_fake_plan(onnx_file.parent, tiny_artifact, trt_plan.BatchProfile(4, 8, 32))
    with pytest.raises(ValueError, match=r"profile 4:8:32; .*--batch 1:8:32"):
        triton.plan_repository(onnx_file)


def test_plans_folder_of_fewstep_build_all(tiny_artifact: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Plans in the folder ``fewstep build model.onnx --all --out plans/`` writes.

    A layout test: stand-in plan files (no TensorRT here). Without --plans they are not
    beside the ONNX, and stderr says the tensorrt_plan model was left out and how to
    include it; with --plans they are found and stderr names the plans included.
    """
    onnx_file = copy_artifact(tiny_artifact, tmp_path / "art")
    plans = tmp_path / "plans"
    plans.mkdir()
    plan_file = write_fake_plan(onnx_file.parent, tiny_artifact, trt_plan.BatchProfile(1, 4, 8),
                                plans=plans)
    write_fake_plan(onnx_file.parent, tiny_artifact, trt_plan.BatchProfile(1, 4, 8),
                    plans=plans, graph="step")  # --all builds every graph's plan
    assert json.loads(trt_plan.sidecar_path(plan_file).read_text())["onnx_file"] == (
        "../art/model.sampler-2.onnx")
    repo = tmp_path / "models"

    assert triton.main([str(onnx_file), "--out", str(repo)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(repo / "model_sampler2"), str(repo / "model_ddim")]
    assert (f"no usable TensorRT plan of model.sampler-2.onnx in {onnx_file.parent}/: "
            "model_sampler2_trt (tensorrt_plan) left out") in err
    assert (f"`fewstep build {onnx_file} --all --out plans/`, then `python -m "
            f"fewstep.export.triton {onnx_file} --out {repo} --plans plans/`") in err

    assert triton.main([str(onnx_file), "--out", str(repo), "--plans", str(plans)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(repo / n) for n in ("model_sampler2", "model_sampler2_trt",
                                                   "model_ddim")]
    assert (f"{plan_file}: included as model_sampler2_trt (TensorRT 10.13.0 plan for "
            "NVIDIA H100 80GB HBM3, batch 1:4:8)") in err
    assert f"{plans / 'model.step.plan'}: not used (a step graph;" in err
    assert "left out" not in err and "--plans" not in err
    trt = parse(repo / "model_sampler2_trt")
    assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 8
    assert_matches_graph(trt, onnx_file.with_name("model.sampler-2.onnx"))
    assert sha(repo / "model_sampler2_trt" / "1" / "model.plan") == sha(plan_file)
    marker = json.loads((repo / "model_sampler2_trt" / triton.MARKER).read_text())
    assert marker["source"] == "model.sampler-2.plan" and marker["backend"] == "tensorrt"
    assert parse(repo / "model_sampler2").max_batch_size == 8  # the plan profile's max

    # Without --plans again: the folder of the plan that is no longer found goes.
    assert triton.main([str(onnx_file), "--out", str(repo)]) == 0
    assert f"removed {repo / 'model_sampler2_trt'}" in capsys.readouterr().err
    assert not (repo / "model_sampler2_trt").exists()

    assert triton.main([str(onnx_file), "--out", str(repo), "--plans",
                        str(tmp_path / "nope")]) == 2
    assert "--plans" in (err := capsys.readouterr().err) and "does not exist" in err


def test_plans_that_do_not_fit_the_graph_are_left_out_with_the_reason(
        tiny_artifact: Path, tmp_path: Path) -> None:
    """A plan whose ONNX changed since the build, or whose bytes are not the ones its
    sidecar describes, is left out and the rebuild command is named (stand-in plans)."""
    onnx_file = copy_artifact(tiny_artifact, tmp_path / "art")
    plans = tmp_path / "plans"
    plans.mkdir()
    plan_file = write_fake_plan(onnx_file.parent, tiny_artifact, trt_plan.BatchProfile(1, 4, 8),
                                plans=plans)
    lines: list[str] = []
    entries = triton.plan_repository(onnx_file, plans=plans, log=lines.append)
    assert [e.name for e in entries] == ["model_sampler2", "model_sampler2_trt", "model_ddim"]

    side = trt_plan.sidecar_path(plan_file)
    data = json.loads(side.read_text())
    side.write_text(json.dumps({**data, "onnx_sha256": "f" * 64}))
    lines.clear()
    entries = triton.plan_repository(onnx_file, plans=plans, log=lines.append)
    assert [e.name for e in entries] == ["model_sampler2", "model_ddim"]
    assert lines[0].startswith(f"{plan_file}: left out: stale (model.sampler-2.onnx changed "
                               "since the plan was built); rebuild it with `fewstep build ")
    assert f"--out {plan_file} --batch 1:4:8`" in lines[0]
    assert lines[1].startswith("no usable TensorRT plan of model.sampler-2.onnx")

    side.write_text(json.dumps(data))
    plan_file.write_bytes(b"another engine")
    lines.clear()
    entries = triton.plan_repository(onnx_file, plans=plans, log=lines.append)
    assert [e.name for e in entries] == ["model_sampler2", "model_ddim"]
    assert "is not the plan its sidecar model.sampler-2.plan.json describes" in lines[0]

    # Silent without a log; a plans folder that is a file is refused.
    assert len(triton.plan_repository(onnx_file, plans=plans)) == 2
    with pytest.raises(ValueError, match=r"--plans .* is not a folder; pass the folder"):
        triton.plan_repository(onnx_file, plans=plan_file)


def test_rewrite_replaces_ours_refuses_others_and_drops_stale(tiny_artifact: Path,
                                                               tmp_path: Path) -> None:
    onnx_file = copy_artifact(tiny_artifact, tmp_path / "art")
    repo = tmp_path / "models"
    (repo / "someone_elses").mkdir(parents=True)
    (repo / "someone_elses" / "config.pbtxt").write_text('name: "someone_elses"\n')
    triton.write_repository(onnx_file, repo)
    # The artifact loses its sampler graph: the rewrite removes that model folder.
    onnx_file.with_name("model.sampler-2.onnx").unlink()
    assert [p.name for p in triton.write_repository(onnx_file, repo)] == ["model_ddim"]
    assert sorted(p.name for p in repo.iterdir()) == ["model_ddim", "someone_elses"]
    (repo / "model_ddim" / triton.MARKER).unlink()  # now it looks like someone else's
    with pytest.raises(ValueError, match="exists and was not written by fewstep"):
        triton.write_repository(onnx_file, repo)
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        triton.write_repository(onnx_file, onnx_file)


def test_standalone_command_on_an_existing_artifact(tiny_artifact: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "models"
    code = triton.main([str(tiny_artifact), "--out", str(repo), "--cpu", "--max-batch", "4"])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(repo / "model_sampler2"),
                                               str(repo / "model_ddim")]
    config = parse(repo / "model_ddim")
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [
        1, 2, 4]
    assert triton.main([str(tmp_path / "nope.onnx"), "--out", str(repo)]) == 2


@pytest.mark.slow
def test_fewstep_export_triton(tiny_checkpoint: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.export import cli as export_cli

    out = tmp_path / "model.onnx"
    code = export_cli.main([str(tiny_checkpoint), "--out", str(out), "--fused", "step",
                            "--no-check", "--triton", str(tmp_path / "repo"), "--triton-cpu"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(tmp_path / "repo" / "model_ddim")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["model_ddim"]
    config = parse(tmp_path / "repo" / "model_ddim")
    assert "guidance" not in [t.name for t in config.input]  # exported without --guidance
    assert [g.kind for g in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert (tmp_path / "repo" / "model_ddim" / "1" / "model.step.onnx").is_file()


def test_default_model_repository(tmp_path: Path) -> None:
    """The shipped default model: repository written, every config parsed and matched."""
    from fewstep.runtime.pipeline import default_model_path

    try:
        model = default_model_path()
    except ArtifactError as e:  # this build ships no default model
        pytest.skip(str(e))
    repo = tmp_path / "models"
    names = [p.name for p in triton.write_repository(model, repo)]
    assert names == ["landscapes_sampler4", "landscapes_ddim"]
    sampler = parse(repo / "landscapes_sampler4")
    assert sampler.max_batch_size == 16 and sampler.HasField("dynamic_batching")
    assert_matches_graph(sampler, repo / "landscapes_sampler4" / "1" / "model.onnx")
    ddim = parse(repo / "landscapes_ddim")
    assert {k: v.string_value for k, v in ddim.parameters.items()}["graph"] == (
        "landscapes.step.onnx")
    assert [t.name for t in ddim.output] == ["image"] and list(ddim.output[0].dims) == [32, 32, 3]
    # The served loop gives the Pipeline's images; the served sampler the Pipeline's too.
    model_py = load_model_py(repo / "landscapes_ddim" / "1" / "model.py")
    graph = backends.load(str(repo / "landscapes_ddim" / "1" / "landscapes.step.onnx"), "ort-cpu")
    pipe = Pipeline.load(model, backend="ort-cpu")
    spacing = pipe.meta.distilled_spacing or "trailing"
    got = model_py.generate_rows(graph, [3, 3], [0, 1], np.array([2, 5]),
                                 np.full(2, 3.0, np.float32), 6, 0.0, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "model was distilled for 4 steps" (6 on purpose)
        want = pipe.generate(2, steps=6, seed=3, labels=[2, 5], guidance=3.0)
    np.testing.assert_array_equal(got, want)
    x_T, _ = noise.generation_noise(3, range(2), (3, 32, 32))
    session = ort.InferenceSession(str(repo / "landscapes_sampler4" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    served = session.run(None, {"x": x_T, "label": np.array([2, 5]),
                                "guidance": np.full(2, 3.0, np.float32)})[0]
    np.testing.assert_array_equal(served, pipe.generate(2, steps=4, seed=3, labels=[2, 5],
                                                        guidance=3.0))
    assert pipe.last_path == "sampler"


# ---------------------------------------------------------------------------------
# A model that is not an image model: (16, 2) sequences, named conditioning inputs
# ---------------------------------------------------------------------------------

HORIZON, ACTIONS, OBS = 16, 2, 36


def sequence_artifact(folder: Path) -> Path:
    """A (T, D) sequence denoiser conditioned on an observation vector ``global_cond``
    float32 (36,) and a task id ``task`` int64 (), both with a null for guidance;
    exported with the step graph and a 3-step float sampler graph."""
    torch = pytest.importorskip("torch")
    from fewstep.export.api import Conditioning, export_module

    class SequenceNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(ACTIONS, 16)
            self.film = torch.nn.Linear(OBS + 1, 32)
            self.task = torch.nn.Embedding(3, 32)
            self.out = torch.nn.Linear(16, ACTIONS)

        def forward(self, x: Any, t: Any, global_cond: Any, task: Any) -> Any:
            film = self.film(torch.cat([global_cond, (t / 100.0)[:, None]], 1))
            scale, bias = (film + self.task(task)).chunk(2, 1)
            return self.out(torch.tanh(self.inp(x) * (1 + scale[:, None]) + bias[:, None]))

    torch.manual_seed(0)
    out = folder / "policy.onnx"
    export_module(
        SequenceNet().eval(), out, sample_shape=(HORIZON, ACTIONS),
        schedule={"_class_name": "DDIMScheduler", "num_train_timesteps": 100,
                  "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
                  "timestep_spacing": "leading"},
        cond=[Conditioning("global_cond", (OBS,), null=0.0),
              Conditioning("task", (), "int64", null=0)],
        guidance=True, fused=("step", "sampler"), steps=(3,), check_parity=False)
    return out


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sequence_artifact(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def policy_repo(policy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy_triton") / "models"
    written = triton.write_repository(policy, out, log=lambda _msg: None)
    assert [p.name for p in written] == ["policy_sampler3", "policy_ddim"]
    return out


def observations(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, OBS)).astype(np.float32)


def test_sequence_model_configs_declare_its_conditioning_and_samples(policy_repo: Path) -> None:
    sampler = parse(policy_repo / "policy_sampler3")
    assert_matches_graph(sampler, policy_repo / "policy_sampler3" / "1" / "model.onnx")
    assert [(t.name, type_name(t.data_type), seen_shape(t)) for t in sampler.input] == [
        ("x", "TYPE_FP32", [HORIZON, ACTIONS]), ("global_cond", "TYPE_FP32", [OBS]),
        ("task", "TYPE_INT64", []), ("guidance", "TYPE_FP32", [])]
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in sampler.output] == [
        ("x0", "TYPE_FP32", [HORIZON, ACTIONS])]
    config = parse(policy_repo / "policy_ddim")
    ins = {t.name: (type_name(t.data_type), list(t.dims), t.optional) for t in config.input}
    assert ins == {"seed": ("TYPE_INT64", [1], False),
                   "global_cond": ("TYPE_FP32", [OBS], False),
                   "task": ("TYPE_INT64", [1], False),
                   "guidance": ("TYPE_FP32", [1], True), "steps": ("TYPE_INT64", [1], True),
                   "eta": ("TYPE_FP32", [1], True)}
    assert [(t.name, type_name(t.data_type), list(t.dims)) for t in config.output] == [
        ("x0", "TYPE_FP32", [HORIZON, ACTIONS])]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"graph": "policy.step.onnx", "default_steps": "4", "spacing": "leading",
                      "backend": "auto"}


def test_sequence_model_served_sampler_gives_the_pipelines_samples(
        policy_repo: Path, policy: Path) -> None:
    pipe = Pipeline.load(policy, backend="ort-cpu")
    obs, task = observations(3), np.array([0, 2, 1], np.int64)
    want = pipe.generate(3, 3, seed=5, cond={"global_cond": obs, "task": task}, guidance=2.0)
    assert pipe.last_path == "sampler"
    x_T, _ = noise.generation_noise(5, range(3), (HORIZON, ACTIONS))
    session = ort.InferenceSession(str(policy_repo / "policy_sampler3" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x_T, "global_cond": obs, "task": task,
                             "guidance": np.full(3, 2.0, np.float32)})[0]
    assert got.dtype == np.float32 and got.shape == (3, HORIZON, ACTIONS)
    np.testing.assert_array_equal(got, want)


def test_sequence_model_py_loop_and_requests_equal_the_pipeline(policy_repo: Path) -> None:
    folder = policy_repo / "policy_ddim" / "1"
    model_py = load_model_py(folder / "model.py")
    graph = backends.load(str(folder / "policy.step.onnx"), "ort-cpu")
    pipe = Pipeline.load(folder / "policy.step.onnx", backend="ort-cpu")
    obs = observations(4, seed=1)
    task = np.array([1, 1, 0, 2], np.int64)
    col = np.array
    requests = [
        {"seed": col([[3]] * 4), "global_cond": obs, "task": task[:, None],
         "guidance": col([[2.5]] * 4, np.float32), "steps": col([[5]] * 4)},
        {"seed": col([[8], [8]]), "global_cond": obs[:2], "task": task[:2],  # (B,) is fine
         "eta": col([[0.5], [0.5]], np.float32)},
    ]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"seed": col([[1]]), "task": col([[0]])},
         "input 'global_cond' is required: this model is conditioned on it (FP32, dims [36]"),
        ({"seed": col([[1]]), "global_cond": obs[:1]}, "input 'task' is required"),
        ({"seed": col([[1]]), "global_cond": obs[:1, :5], "task": col([[0]])},
         "input 'global_cond' has shape [1, 5]; pass one value of dims [36] per row: "
         "shape [1, 36]"),
        ({"seed": col([[1], [2]]), "global_cond": obs[:1], "task": col([[0], [1]])},
         "shape [2, 36]"),
        ({"seed": col([[1]]), "global_cond": obs[:1].astype(np.int64), "task": col([[0]])},
         "input 'global_cond' is int64; pass FP32 values"),
        ({"seed": col([[1]]), "global_cond": obs[:1], "task": col([[0.5]], np.float32)},
         "input 'task' is float32; pass INT64 values"),
        ({"seed": col([[1]]), "global_cond": np.full((1, OBS), np.nan, np.float32),
          "task": col([[0]])}, "input 'global_cond' holds NaN or Inf; pass finite values"),
        ({"seed": col([[1]]), "global_cond": obs[:1], "task": col([[0]]),
          "other": col([[1]])}, "unknown input(s) ['other']; this model takes ['seed', "),
        ({"seed": col([[1]]), "global_cond": obs[:1], "task": col([[0]]), "label": col([[1]])},
         "this model is unconditional; leave the 'label' input out"),
    ]
    defaults = model_py.Defaults(steps=4, spacing="leading")
    out = model_py.run_requests(graph, [*requests, *(b for b, _ in bad)], defaults, max_batch=4)
    want = pipe.generate(4, 5, seed=3, cond={"global_cond": obs, "task": task}, guidance=2.5)
    assert pipe.last_path == "step"
    assert out[0].dtype == np.float32 and out[0].shape == (4, HORIZON, ACTIONS)
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1], pipe.generate(2, 4, eta=0.5, seed=8, cond={
        "global_cond": obs[:2], "task": task[:2]}))
    for result, (_, message) in zip(out[2:], bad, strict=True):
        assert isinstance(result, ValueError), message
        assert message in str(result) and "\n" not in str(result), str(result)


def test_sequence_model_py_denoiser_loop_equals_the_pipeline(policy: Path, tmp_path: Path) -> None:
    for name in ("policy.onnx", *artifact.read_onnx_header(policy).external_data):
        shutil.copyfile(policy.with_name(name), tmp_path / name)
    pipe = Pipeline.load(tmp_path / "policy.onnx", backend="ort-cpu")  # no step graph here
    obs, task = observations(3, seed=2), np.array([2, 0, 1], np.int64)
    want = pipe.generate(3, 4, seed=6, cond={"global_cond": obs, "task": task})
    assert pipe.last_path == "denoiser"
    model_py = load_model_py(triton.MODEL_PY)
    graph = backends.load(str(tmp_path / "policy.onnx"), "ort-cpu")
    got = model_py.generate_rows(graph, [6] * 3, range(3), None, None, 4, 0.0, "leading",
                                 {"global_cond": obs, "task": task})
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="conditioned on 'global_cond': pass cond"):
        model_py.generate_rows(graph, [6], [0], None, None, 4, 0.0, "leading")


def test_conditioning_named_like_a_request_input_is_refused() -> None:
    """'seed' and 'steps' are request inputs of the Triton model: a conditioning input
    cannot take either name (refused when the metadata is made, before any export)."""
    from fewstep.runtime.errors import ArtifactError
    from fewstep.runtime.meta import CondSpec

    for name in ("steps", "seed"):
        with pytest.raises(ArtifactError, match=f"'{name}' is a name fewstep's graphs use"):
            CondSpec(name, "int64", ())
