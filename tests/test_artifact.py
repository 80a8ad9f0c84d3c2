"""runtime/artifact.py: one model's files read once, and the one same-model answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_oracle as oo
import pytest

from fewstep.runtime import plan as trt_plan
from fewstep.runtime.artifact import Artifact, mismatch
from fewstep.runtime.backends.oracle import write_oracle_file
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta


@pytest.fixture
def meta() -> ModelMeta:
    return oo.make_meta(num_classes=2)


@pytest.fixture
def x0(meta: ModelMeta) -> np.ndarray:
    return oo.pixel_x0(meta)


def test_siblings_read_once_with_kind_steps_and_meta(tmp_path: Path, meta: ModelMeta,
                                                     x0: np.ndarray) -> None:
    main = oo.write_artifact(tmp_path, meta, x0, samplers=((4, "trailing", 0.0, "uint8"),
                                                           (8, "trailing", 1.0, "float")))
    oo.write(tmp_path / "model-other.onnx", meta, x0)  # another artifact's main file
    art = Artifact.open(main)
    assert art.path == main and art.ext == ".onnx" and art.meta == meta
    assert [f.path.name for f in art.files] == [
        "model.onnx", "model.sampler-4.onnx", "model.sampler-8-eta1.onnx", "model.step.onnx"]
    assert art.graphs[0].path.name == "model.onnx"  # the main file first
    assert {g.path.name: (g.kind, g.meta.graph.steps if g.meta else -1) for g in art.graphs} \
        == {"model.onnx": ("denoiser", 0), "model.step.onnx": ("step", 0),
            "model.sampler-4.onnx": ("sampler", 4), "model.sampler-8-eta1.onnx": ("sampler", 8)}
    eta1 = next(g for g in art.graphs if g.path.name == "model.sampler-8-eta1.onnx")
    assert eta1.meta is not None and eta1.meta.graph.eta == 1.0
    assert art.rejected == () and art.weights() == {}
    # Opened from a sibling, the artifact is the same set of files.
    same = Artifact.open(tmp_path / "model.step.onnx")
    assert [f.path for f in same.files] == [f.path for f in art.files]
    assert same.graphs[0].kind == "step"


def test_bad_and_foreign_siblings_are_rejected_with_the_reason(
        tmp_path: Path, meta: ModelMeta, x0: np.ndarray) -> None:
    main = oo.write_artifact(tmp_path, meta, x0, step=False)
    other = oo.make_meta(num_classes=2, source_hash="sha256:other")
    oo.write(tmp_path / "model.step.onnx", other.for_graph(kind="step"), x0)
    fp16 = meta.for_graph(kind="sampler", steps=4, spacing="trailing", precision="fp16")
    oo.write(tmp_path / "model.sampler-4.onnx", fp16, x0)
    (tmp_path / "model.sampler-8.onnx").write_bytes(b"\x08\x07garbage")
    art = Artifact.open(main)
    assert [g.path.name for g in art.graphs] == ["model.onnx"]
    why = {f.path.name: f.problem for f in art.rejected}
    assert why["model.step.onnx"] is not None and why["model.step.onnx"].startswith(
        "its source_hash ('sha256:other' vs 'sha256:oracle') differs from model.onnx")
    assert "precision ('fp16' vs 'fp32')" in str(why["model.sampler-4.onnx"])
    assert "is not an ONNX model" in str(why["model.sampler-8.onnx"])
    rejected = {f.path.name: f for f in art.rejected}
    assert rejected["model.sampler-8.onnx"].meta is None
    assert rejected["model.step.onnx"].meta is not None  # read, but another model's


def test_same_model_answer(meta: ModelMeta) -> None:
    fp16 = meta.for_graph(kind="step", precision="fp16")
    assert mismatch(meta, meta.for_graph(kind="step")) is None
    assert mismatch(meta, fp16) == "precision ('fp16' vs 'fp32')"
    assert mismatch(meta, fp16, precision=False) is None
    for other, what in [
        (oo.make_meta(num_classes=2, source_hash="sha256:b"), "source_hash"),
        (oo.make_meta("v_prediction", num_classes=2), "prediction type"),
        (oo.make_meta(num_classes=2, size=16), "sample shape"),
        (oo.make_meta(num_classes=3), "classes"),
    ]:
        assert str(mismatch(meta, other, precision=False)).startswith(what)


def test_same_model_across_artifacts_of_other_precisions(
        tmp_path: Path, meta: ModelMeta, x0: np.ndarray) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    a = Artifact.open(oo.write_artifact(tmp_path / "a", meta, x0, step=False))
    b = Artifact.open(oo.write(tmp_path / "b" / "m16.onnx", meta.for_graph(precision="fp16"),
                               x0))
    c = Artifact.open(oo.write(tmp_path / "c" / "x.onnx",
                               oo.make_meta(num_classes=2, source_hash="sha256:c"), x0))
    assert a.same_model(b) is None and a.same_model(b.meta) is None
    assert str(a.same_model(c)).startswith("source_hash ('sha256:c'")


def test_external_weights_are_listed_and_a_missing_file_is_named(
        tmp_path: Path, meta: ModelMeta, x0: np.ndarray) -> None:
    proto = oo.build(meta, x0)
    main = tmp_path / "model.onnx"
    onnx.save_model(proto, str(main), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.weights.bin",
                    size_threshold=0)
    step = oo.build(meta.for_graph(kind="step"), x0)
    onnx.save_model(step, str(tmp_path / "model.step.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.step.weights.bin",
                    size_threshold=0)
    art = Artifact.open(main)
    size = (tmp_path / "model.weights.bin").stat().st_size
    assert art.weights() == {"model.weights.bin": size,
                             "model.step.weights.bin": (tmp_path / "model.step.weights.bin")
                             .stat().st_size}
    (tmp_path / "model.step.weights.bin").unlink()
    art = Artifact.open(main)
    assert [f.path.name for f in art.rejected] == ["model.step.onnx"]
    assert "keeps its weights in 'model.step.weights.bin', which is missing" in str(
        art.rejected[0].problem)
    assert art.weights()["model.step.weights.bin"] == -1  # still listed, as missing
    (tmp_path / "model.weights.bin").unlink()
    with pytest.raises(ArtifactError, match="which is missing beside it"):
        Artifact.open(main)


def _plan(path: Path, meta: ModelMeta, onnx_file: Path) -> Path:
    data = hashlib.sha256(path.name.encode()).digest() * 8
    path.write_bytes(data)
    onnx_sha, external = trt_plan.onnx_hashes(onnx_file)
    trt_plan.write_sidecar(path, trt_plan.new_sidecar(
        meta=meta, tensorrt_version="10.3.0", cuda_runtime_version="12.6",
        gpu_name="NVIDIA H100", compute_capability="9.0",
        profile=trt_plan.BatchProfile(1, 1, 16), precision="fp32", strongly_typed=True,
        fp16_weak=False, builder_optimization_level=3, workspace_bytes=1 << 30,
        version_compatible=False, exclude_lean_runtime=False, onnx_file=onnx_file.name,
        onnx_sha256=onnx_sha, external_data_sha256=external,
        plan_sha256=hashlib.sha256(data).hexdigest(), plan_bytes=len(data)))
    return path


def test_plans_with_sidecars(tmp_path: Path, meta: ModelMeta, x0: np.ndarray) -> None:
    main = oo.write_artifact(tmp_path, meta, x0, samplers=((4, "trailing", 0.0, "uint8"),))
    plans = tmp_path / "plans"
    plans.mkdir()
    _plan(plans / "model.plan", meta, main)
    step = meta.for_graph(kind="step")
    _plan(plans / "model.step.plan", step, tmp_path / "model.step.onnx")
    (plans / "model.sampler-4.plan").write_bytes(b"plan without a sidecar")
    (plans / "other.plan").write_bytes(b"not this artifact's")
    art = Artifact.open(main)
    assert art.plans() == ()  # none beside the ONNX
    found = {f.path.name: f for f in art.plans(plans)}
    assert set(found) == {"model.plan", "model.step.plan", "model.sampler-4.plan"}
    assert found["model.step.plan"].sidecar is not None
    assert found["model.step.plan"].meta == step and found["model.step.plan"].problem is None
    assert found["model.sampler-4.plan"].meta is None
    assert "no sidecar model.sampler-4.plan.json" in str(found["model.sampler-4.plan"].problem)
    # A plan artifact reads its metadata from the sidecars, never from the plans.
    art = Artifact.open(plans / "model.plan")
    assert art.ext == ".plan" and art.meta == meta and art.main.sidecar is not None
    assert [g.path.name for g in art.graphs] == ["model.plan", "model.step.plan"]
    assert [f.path.name for f in art.rejected] == ["model.sampler-4.plan"]
    # ... and finds the ONNX graphs it was built from, each checked against the plan's meta.
    onnx_files = {f.path.name: f for f in art.files_of(".onnx", tmp_path)}
    assert set(onnx_files) == {"model.onnx", "model.step.onnx", "model.sampler-4.onnx"}
    assert all(f.problem is None for f in onnx_files.values())
    assert onnx_files["model.step.onnx"].meta == step
    assert art.files_of(".onnx") == ()  # none beside the plans
    (plans / "model.plan.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        Artifact.open(plans / "model.plan")


def test_oracle_artifact(tmp_path: Path, meta: ModelMeta) -> None:
    main = write_oracle_file(tmp_path / "m.oracle.json", meta)
    write_oracle_file(tmp_path / "m.step.oracle.json", meta.for_graph(kind="step"))
    art = Artifact.open(main)
    assert art.ext == ".oracle.json"
    assert [g.kind for g in art.graphs] == ["denoiser", "step"]


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist; pass --model PATH"),
    (b"", "no ir_version or graph"),
    (b"\x08\x07garbage", "is not an ONNX model"),
    (b"\x08", "truncated varint"),
    (b"\x3a\xff\xff\xff\x0f", "truncated length-delimited field"),
    ("folder", "is a folder, not a model file"),
    ("no-meta", "has no fewstep metadata"),
    ("bad-meta", "model.onnx"),
])
def test_bad_main_files_are_one_artifact_error(tmp_path: Path, meta: ModelMeta, x0: np.ndarray,
                                               content: bytes | str | None,
                                               message: str) -> None:
    path = tmp_path / "model.onnx"
    if content == "folder":
        path.mkdir()
    elif content == "no-meta":
        oo.write(path, meta, x0, metadata="")
    elif content == "bad-meta":
        oo.write(path, meta, x0, metadata='{"schema_version": 1}')
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match=message) as e:
        Artifact.open(path)
    assert "\n" not in str(e.value)
