"""TensorRT plans: sidecar, profiles, compatibility, locked writes, `fewstep build`, backend.

Everything but the TensorRT calls runs here without TensorRT. Tests that need TensorRT
and a GPU carry ``@pytest.mark.tensorrt`` and build real plans from tiny ONNX files,
comparing them with ONNX Runtime; they skip where TensorRT is missing. Nothing fakes
TensorRT: hiding it (``sys.modules["tensorrt"] = None``) only checks the messages a
machine without it gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fewstep.runtime import backends, plan
from fewstep.runtime.errors import ArtifactError, BackendUnavailable
from fewstep.runtime.meta import META_KEY, CondSpec, GraphInfo, ModelMeta, Schedule
from fewstep.runtime.plan import (
    BatchProfile,
    PlanSidecar,
    default_profile,
    load_sidecar,
    profile_shapes,
    sidecar_path,
)
from fewstep.runtime.plan_check import RuntimeInfo, check_compatible

TRT_SKIP = "TensorRT is not installed (it cannot be installed in this environment)"
H100 = "NVIDIA H100 80GB HBM3"


# ---------------------------------------------------------------------------------
# Helpers: metadata, tiny ONNX files, sidecars
# ---------------------------------------------------------------------------------


def make_meta(num_classes: int = 0, **graph: Any) -> ModelMeta:
    meta = ModelMeta.build(
        prediction_type="epsilon", schedule=Schedule(), channels=3, height=8, width=8,
        num_classes=num_classes, graph=GraphInfo(),
    )
    return meta.for_graph(**graph) if graph else meta


def tiny_onnx(path: Path, meta: ModelMeta | None, *, kind: str = "denoiser",
              conditional: bool = False, external: str | None = None,
              scale: float = 0.5) -> Path:
    """A small real ONNX graph of the given kind, with fewstep metadata unless meta=None.

    denoiser: out = x * w + t / 1000 (+ label / 100); step: x_prev = x * a_prev / a_t +
    eta * noise + t / 10000 (+ label / 100). ``w`` (C,) is an initializer, stored as
    external data named ``external`` when given.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, h, w = (meta.image_shape if meta is not None else (3, 8, 8))
    f32 = TensorProto.FLOAT
    img = ["B", c, h, w]
    vec = ["B"]
    inputs = [helper.make_tensor_value_info("x", f32, img),
              helper.make_tensor_value_info("t", TensorProto.INT64, vec)]
    inits = [numpy_helper.from_array(np.full((1, c, 1, 1), scale, np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "k_t"),
             numpy_helper.from_array(np.array(1e-2, np.float32), "k_label")]
    nodes = [helper.make_node("Cast", ["t"], ["tf"], to=f32),
             helper.make_node("Reshape", ["tf", "shape4"], ["t4"]),
             helper.make_node("Mul", ["t4", "k_t"], ["ts"])]
    if kind == "denoiser":
        out_name = "eps"
        nodes += [helper.make_node("Mul", ["x", "w"], ["xw"]),
                  helper.make_node("Add", ["xw", "ts"], ["y0"])]
    else:
        out_name = "x_prev"
        for name in ("a_t", "a_prev", "eta"):
            inputs.append(helper.make_tensor_value_info(name, f32, vec))
        inputs.append(helper.make_tensor_value_info("noise", f32, img))
        nodes += [helper.make_node("Div", ["a_prev", "a_t"], ["r"]),
                  helper.make_node("Reshape", ["r", "shape4"], ["r4"]),
                  helper.make_node("Reshape", ["eta", "shape4"], ["e4"]),
                  helper.make_node("Mul", ["x", "r4"], ["xr"]),
                  helper.make_node("Mul", ["noise", "e4"], ["ne"]),
                  helper.make_node("Mul", ["xr", "w"], ["xrw"]),
                  helper.make_node("Add", ["xrw", "ne"], ["y1"]),
                  helper.make_node("Mul", ["ts", "k_label"], ["ts2"]),
                  helper.make_node("Add", ["y1", "ts2"], ["y0"])]
    last = "y0"
    if conditional:
        inputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, vec))
        nodes += [helper.make_node("Cast", ["label"], ["lf"], to=f32),
                  helper.make_node("Reshape", ["lf", "shape4"], ["l4"]),
                  helper.make_node("Mul", ["l4", "k_label"], ["ls"]),
                  helper.make_node("Add", ["y0", "ls"], ["y2"])]
        last = "y2"
    nodes.append(helper.make_node("Identity", [last], [out_name]))
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info(out_name, f32, img)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="fewstep-test")
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, {META_KEY: meta.to_json()})
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=external, size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def fake_plan_bytes(seed: int = 0) -> bytes:
    """Bytes standing in for a plan file in sidecar tests (the sidecar only hashes them)."""
    return hashlib.sha256(str(seed).encode()).digest() * 64


def make_sidecar(tmp: Path, *, onnx: Path | None = None, plan_data: bytes | None = None,
                 **changes: Any) -> tuple[PlanSidecar, Path]:
    """A consistent model.plan + model.plan.json (+ model.onnx) in ``tmp``."""
    meta = make_meta()
    onnx = onnx or tiny_onnx(tmp / "model.onnx", meta)
    plan_path = tmp / "model.plan"
    data = plan_data if plan_data is not None else fake_plan_bytes()
    plan_path.write_bytes(data)
    onnx_sha, ext = plan.onnx_hashes(onnx)
    fields: dict[str, Any] = dict(
        meta=meta, tensorrt_version="10.3.0", cuda_runtime_version="12.6", gpu_name=H100,
        compute_capability="9.0", profile=BatchProfile(1, 1, 16), precision="fp32",
        strongly_typed=True, fp16_weak=False, builder_optimization_level=3,
        workspace_bytes=1 << 30, version_compatible=False, exclude_lean_runtime=False,
        onnx_file=os.path.relpath(onnx, tmp), onnx_sha256=onnx_sha, external_data_sha256=ext,
        plan_sha256=hashlib.sha256(data).hexdigest(), plan_bytes=len(data),
    )
    fields.update(changes)
    sidecar = plan.new_sidecar(**fields)
    plan.write_sidecar(plan_path, sidecar)
    return sidecar, plan_path


HERE = RuntimeInfo(tensorrt_version="10.3.0", gpu_name=H100, compute_capability="9.0")


# ---------------------------------------------------------------------------------
# Batch profiles and shapes
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1:4:16", (1, 4, 16)), ("8", (8, 8, 8)), (" 2:2:2 ", (2, 2, 2)), ("1:1:1", (1, 1, 1)),
])
def test_batch_profile_parse(text: str, expected: tuple[int, int, int]) -> None:
    p = BatchProfile.parse(text)
    assert (p.min, p.opt, p.max) == expected
    assert BatchProfile.parse(str(p)) == p


@pytest.mark.parametrize(("text", "message"), [
    ("4:2:8", "1 <= min <= opt <= max"),
    ("1:8:4", "1 <= min <= opt <= max"),
    ("0:1:2", "min=0 must be at least 1"),
    ("0", "min=0 must be at least 1"),
    ("-1", "must be at least 1"),
    ("a:b:c", "is not MIN:OPT:MAX or N"),
    ("1:2", "is not MIN:OPT:MAX or N"),
    ("1:2:3:4", "is not MIN:OPT:MAX or N"),
    ("", "is not MIN:OPT:MAX or N"),
    ("1.5", "is not MIN:OPT:MAX or N"),
])
def test_batch_profile_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        BatchProfile.parse(text)
    assert message in str(e.value)


def test_default_profile_scales_with_device_and_image() -> None:
    assert default_profile(make_meta()) == BatchProfile(1, 1, 16)
    assert default_profile(make_meta(), jetson=True) == BatchProfile(1, 1, 4)
    big = dataclasses.replace(make_meta(), sample_shape=(3, 256, 256))
    assert default_profile(big) == BatchProfile(1, 1, 4)
    huge = dataclasses.replace(make_meta(), sample_shape=(3, 512, 512))
    assert default_profile(huge) == BatchProfile(1, 1, 1)
    assert default_profile(huge, jetson=True) == BatchProfile(1, 1, 1)


def test_profile_shapes_cover_every_input() -> None:
    step = make_meta(num_classes=2).for_graph(kind="step", guidance=True)
    shapes = profile_shapes(step, BatchProfile(1, 4, 16))
    assert set(shapes) == set(step.graph.inputs)
    assert shapes["noise"] == ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    assert shapes["guidance"] == ((1,), (4,), (16,))


def make_seq_meta(sample_shape: tuple[int, ...] = (16, 2), **graph: Any) -> ModelMeta:
    """A non-image model: (T, D) sequences conditioned on global_cond float32 (36,) and
    task int64 (), both with a null value (guidance graphs allowed)."""
    meta = ModelMeta.build(
        prediction_type="epsilon", schedule=Schedule("squaredcos_cap_v2", 100),
        sample_shape=sample_shape, images=False,
        cond=(CondSpec("global_cond", "float32", (36,), 0.0), CondSpec("task", "int64", (), 0)),
        graph=GraphInfo(),
    )
    return meta.for_graph(**graph) if graph else meta


def test_sequence_model_profile_reads_the_graph_io_contract() -> None:
    assert default_profile(make_seq_meta()) == BatchProfile(1, 1, 16)
    assert default_profile(make_seq_meta(), jetson=True) == BatchProfile(1, 1, 4)
    # 4096 x 8 = 32768 values per sample: twice the 128 x 128 that gets the full batch.
    assert default_profile(make_seq_meta((4096, 8))) == BatchProfile(1, 1, 8)
    step = make_seq_meta(kind="step", guidance=True)
    shapes = profile_shapes(step, BatchProfile(1, 4, 16))
    assert shapes == {
        "x": ((1, 16, 2), (4, 16, 2), (16, 16, 2)),
        "t": ((1,), (4,), (16,)), "a_t": ((1,), (4,), (16,)), "a_prev": ((1,), (4,), (16,)),
        "eta": ((1,), (4,), (16,)), "noise": ((1, 16, 2), (4, 16, 2), (16, 16, 2)),
        "global_cond": ((1, 36), (4, 36), (16, 36)), "task": ((1,), (4,), (16,)),
        "guidance": ((1,), (4,), (16,)),
    }
    sampler = make_seq_meta(kind="sampler", steps=3, spacing="leading", eta=0.5)
    shapes = profile_shapes(sampler, BatchProfile(2, 2, 2))
    assert list(shapes) == ["x", "global_cond", "task", "noise"]
    assert shapes["noise"] == ((2, 3, 16, 2),) * 3


def tiny_seq_onnx(path: Path, meta: ModelMeta) -> Path:
    """A real denoiser graph of ``make_seq_meta``'s model: eps = x * 0.5 + t / 1000 +
    mean(global_cond) + task / 100, each term broadcast over (T, D)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    seq = ["B", *meta.sample_shape]
    inputs = [helper.make_tensor_value_info("x", f32, seq),
              helper.make_tensor_value_info("t", f32, ["B"]),
              helper.make_tensor_value_info("global_cond", f32, ["B", 36]),
              helper.make_tensor_value_info("task", i64, ["B"])]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape3"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "k_t"),
             numpy_helper.from_array(np.array(1e-2, np.float32), "k_task")]
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("Mul", ["t", "k_t"], ["ts"]),
             helper.make_node("ReduceMean", ["global_cond"], ["gm"], axes=[1], keepdims=0),
             helper.make_node("Cast", ["task"], ["taskf"], to=f32),
             helper.make_node("Mul", ["taskf", "k_task"], ["tk"]),
             helper.make_node("Add", ["ts", "gm"], ["s1"]),
             helper.make_node("Add", ["s1", "tk"], ["s2"]),
             helper.make_node("Reshape", ["s2", "shape3"], ["s3"]),
             helper.make_node("Add", ["xw", "s3"], ["eps"])]
    graph = helper.make_graph(nodes, "tiny-seq", inputs,
                              [helper.make_tensor_value_info("eps", f32, seq)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="fewstep-test")
    model.ir_version = 8
    helper.set_model_props(model, {META_KEY: meta.to_json()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def seq_feeds(meta: ModelMeta, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    return {"x": rng.standard_normal((batch, *meta.sample_shape)).astype(np.float32),
            "t": rng.integers(0, 100, batch).astype(np.float32),
            "global_cond": rng.standard_normal((batch, 36)).astype(np.float32),
            "task": rng.integers(0, 3, batch).astype(np.int64)}


def test_tiny_sequence_graph_follows_the_contract(tmp_path: Path,
                                                  rng: np.random.Generator) -> None:
    meta = make_seq_meta()
    onnx_path = tiny_seq_onnx(tmp_path / "policy.onnx", meta)
    feeds = seq_feeds(meta, 3, rng)
    expect = (feeds["x"] * 0.5 + (feeds["t"] * 1e-3 + feeds["global_cond"].mean(1)
                                  + feeds["task"] * 1e-2)[:, None, None])
    np.testing.assert_allclose(ort_run(onnx_path, feeds), expect, rtol=1e-6, atol=1e-6)
    assert list(meta.graph.inputs) == list(feeds)


def test_sequence_model_build_request_and_sidecar(tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import plan_name_for, prepare_build

    meta = make_seq_meta()
    onnx_path = tiny_seq_onnx(tmp_path / "policy.onnx", meta)
    req = prepare_build(onnx_path, tmp_path / "policy.plan", batch="1:2:8")
    assert req.meta == meta and req.profile == BatchProfile(1, 2, 8)
    assert plan_name_for(onnx_path, tmp_path, meta) == tmp_path / "policy.plan"
    sidecar, plan_path = make_sidecar(tmp_path, onnx=onnx_path, meta=meta,
                                      profile=BatchProfile(1, 2, 8))
    loaded = load_sidecar(plan_path)
    assert loaded == sidecar and loaded.meta == meta and not loaded.meta.images
    data = json.loads(sidecar_path(plan_path).read_text())
    assert data["meta"]["sample_shape"] == [16, 2] and data["meta"]["images"] is False
    assert [c["name"] for c in data["meta"]["cond"]] == ["global_cond", "task"]
    assert data["meta"]["graph"]["inputs"] == ["x", "t", "global_cond", "task"]
    check_compatible(loaded, HERE, plan_path)
    assert profile_shapes(loaded.meta, loaded.profile)["global_cond"] == (
        (1, 36), (2, 36), (8, 36))


def test_build_all_of_a_sequence_artifact_gets_to_tensorrt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensorrt: None) -> None:
    meta = make_seq_meta()
    onnx_path = tiny_seq_onnx(tmp_path / "policy.onnx", meta)
    step = tmp_path / "policy.step.onnx"
    step.write_bytes(onnx_path.read_bytes())  # named a step graph, its metadata a denoiser
    code, err = build_cli([str(onnx_path), "--out", str(tmp_path), "--all"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("policy.onnx and policy.step.onnx hold the same kind of graph and would both be "
            f"built into {tmp_path / 'policy.plan'}") in err
    tiny_seq_onnx(step, meta.for_graph(kind="step"))  # its inputs do not matter here
    code, err = build_cli([str(onnx_path), "--out", str(tmp_path), "--all", "--batch", "1:4:8"],
                          capsys)
    assert code == 2 and "TensorRT is not installed" in err
    assert not list(tmp_path.glob("*.plan"))


def test_default_workspace() -> None:
    gib, mib = plan.GIB, plan.MIB
    assert plan.default_workspace_bytes(60 * gib, 80 * gib, integrated=False) == 8 * gib
    assert plan.default_workspace_bytes(6 * gib, 8 * gib, integrated=False) == 3 * gib
    assert plan.default_workspace_bytes(28 * gib, 32 * gib, integrated=True) == 2 * gib
    assert plan.default_workspace_bytes(2 * gib, 8 * gib, integrated=True) == 512 * mib
    assert plan.default_workspace_bytes(400 * mib, 8 * gib, integrated=True) == 256 * mib
    assert plan.default_workspace_bytes(100 * mib, 8 * gib, integrated=True) == 100 * mib


# ---------------------------------------------------------------------------------
# The sidecar: round trip and one ArtifactError for anything else
# ---------------------------------------------------------------------------------


def test_sidecar_round_trip(tmp_path: Path) -> None:
    ext = "model.weights.ab12.bin"
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta(), external=ext)
    sidecar, plan_path = make_sidecar(tmp_path, onnx=onnx, version_compatible=True,
                                      exclude_lean_runtime=True, extra={"note": [1, 2]})
    assert sidecar_path(plan_path) == tmp_path / "model.plan.json"
    assert list(sidecar.external_data_sha256) == [ext]
    loaded = load_sidecar(plan_path)
    assert loaded == sidecar
    assert loaded.to_json() == sidecar.to_json()
    assert PlanSidecar.from_json(sidecar.to_json()) == sidecar
    assert loaded.meta == make_meta()
    assert loaded.created.endswith("+00:00") and loaded.fewstep_version
    check_compatible(loaded, HERE, plan_path)  # consistent: no error


def test_missing_sidecar(tmp_path: Path) -> None:
    (tmp_path / "model.step.plan").write_bytes(b"plan")
    with pytest.raises(ArtifactError) as e:
        load_sidecar(tmp_path / "model.step.plan")
    msg = str(e.value)
    assert "no sidecar model.step.plan.json" in msg and "fewstep needs it" in msg
    assert f"`fewstep build {tmp_path / 'model.step.onnx'} --out {tmp_path / 'model.step.plan'}`" \
        in msg


def _mutated(tmp_path: Path, mutate: Callable[[dict[str, Any]], object]) -> Path:
    _, plan_path = make_sidecar(tmp_path)
    side = sidecar_path(plan_path)
    d = json.loads(side.read_text())
    mutate(d)
    side.write_text(json.dumps(d))
    return plan_path


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(schema_version=3), "schema version 3 is newer than this fewstep"),
    (lambda d: d.update(schema_version=0), "schema_version: 0 is not a valid version"),
    (lambda d: d.update(schema_version="1"), "schema_version: '1' is not int"),
    (lambda d: d.pop("gpu_name"), "field gpu_name: missing"),
    (lambda d: d.update(gpu_name=5), "field gpu_name: 5 is not str"),
    (lambda d: d.update(strongly_typed="yes"), "field strongly_typed: 'yes' is not bool"),
    (lambda d: d.update(plan_bytes=True), "field plan_bytes: True is not int"),
    (lambda d: d.update(profile=[1, 1, 16]), "field profile: [1, 1, 16] is not dict"),
    (lambda d: d.update(profile={"min": 1, "max": 16}), "field profile"),
    (lambda d: d.update(profile={"min": 4, "opt": 2, "max": 8}), "1 <= min <= opt <= max"),
    (lambda d: d.update(compute_capability="sm90"), "compute capability 'sm90'"),
    (lambda d: d.update(tensorrt_version="ten"), "TensorRT version 'ten'"),
    (lambda d: d.update(plan_sha256="abc"), "is not a sha256 hex digest"),
    (lambda d: d.update(surprise=1), "unknown keys ['surprise']"),
    (lambda d: d["meta"].update(sample_shape=[3, "8", 8]),
     "field sample_shape: [3, '8', 8] is not a list of up to 6 whole numbers"),
    (lambda d: d.update(exclude_lean_runtime=True), "only meaningful with version_compatible"),
])
def test_bad_sidecar_is_one_artifact_error(tmp_path: Path, mutate: Any, message: str) -> None:
    plan_path = _mutated(tmp_path, mutate)
    with pytest.raises(ArtifactError) as e:
        load_sidecar(plan_path)
    msg = str(e.value)
    assert message in msg
    assert str(sidecar_path(plan_path)) in msg
    assert "fewstep build" in msg  # the fix


@pytest.mark.parametrize("text", ["", "{", "null", "[]", "42", "NaN", '{"a": }'])
def test_sidecar_that_is_not_a_sidecar(tmp_path: Path, text: str) -> None:
    (tmp_path / "m.plan").write_bytes(b"x")
    (tmp_path / "m.plan.json").write_text(text)
    with pytest.raises(ArtifactError, match=r"m\.plan\.json") as e:
        load_sidecar(tmp_path / "m.plan")
    assert "rebuild with `fewstep build" in str(e.value)


# ---------------------------------------------------------------------------------
# check_compatible: exactly why a plan must be rebuilt
# ---------------------------------------------------------------------------------


def test_gpu_mismatch(tmp_path: Path) -> None:
    sidecar, plan_path = make_sidecar(tmp_path)
    orin = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(ArtifactError) as e:
        check_compatible(sidecar, orin, plan_path)
    assert str(e.value) == (
        f"model.plan was built for GPU '{H100}' (compute 9.0) but this is 'Orin' (compute 8.7); "
        f"plans are tied to the GPU: rebuild with `fewstep build {tmp_path / 'model.onnx'} "
        f"--out {plan_path} --batch 1:1:16`"
    )
    pcie = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H100 PCIe",
                       compute_capability="9.0")
    with pytest.raises(ArtifactError, match=r"but this is 'NVIDIA H100 PCIe' \(compute 9\.0\)"):
        check_compatible(sidecar, pcie, plan_path)


@pytest.mark.parametrize(("built", "running", "vc", "exclude", "lean", "problem"), [
    ("10.3.0", "10.3.0", False, False, False, None),
    ("10.3.0", "10.3.0.26", False, False, False, None),
    ("10.3.0", "10.4.0", False, False, False, "plans are tied to the TensorRT version"),
    ("10.4.0", "10.3.0", False, False, False, "plans are tied to the TensorRT version"),
    ("10.3.0", "10.8.0", True, False, False, None),
    ("10.3.0", "10.3.0", True, False, True, None),
    ("10.3.0", "10.9.1", True, False, True, None),
    ("10.8.0", "10.3.0", True, False, False, "runs only on that version or newer"),
    ("10.3.0", "11.1.0", True, False, False, None),  # NVIDIA: 10 VC plans run on 11
    ("11.1.0", "12.0.0", True, False, False, "good for later 11.x"),
    ("10.3.0", "10.4.0", True, True, False, "needs exactly that version's runtime"),
    ("10.3.0", "10.3.0", True, True, True, None),
    ("10.3.0", "10.3.0", False, False, True, "lean runtime runs only version-compatible"),
])
def test_tensorrt_version_rules(tmp_path: Path, built: str, running: str, vc: bool,
                                exclude: bool, lean: bool, problem: str | None) -> None:
    sidecar, plan_path = make_sidecar(tmp_path, tensorrt_version=built, version_compatible=vc,
                                      exclude_lean_runtime=exclude)
    here = dataclasses.replace(HERE, tensorrt_version=running, lean=lean)
    if problem is None:
        check_compatible(sidecar, here, plan_path)
        return
    with pytest.raises(ArtifactError) as e:
        check_compatible(sidecar, here, plan_path)
    msg = str(e.value)
    assert problem in msg and msg.startswith("model.plan ")
    assert f"--out {plan_path}" in msg
    assert "--version-compatible" in msg  # how to build one that would run here


def test_plan_replaced_or_corrupt(tmp_path: Path) -> None:
    sidecar, plan_path = make_sidecar(tmp_path)
    plan_path.write_bytes(fake_plan_bytes(1))  # same size, other content
    with pytest.raises(ArtifactError, match=r"model.plan is not the plan its sidecar "
                       r"model.plan.json describes \(sha256 differs"):
        check_compatible(sidecar, HERE, plan_path)
    check_compatible(sidecar, HERE, plan_path, verify_plan_hash=False)
    plan_path.unlink()
    with pytest.raises(ArtifactError, match="does not exist; build it with `fewstep build"):
        check_compatible(sidecar, HERE, plan_path)


def test_stale_onnx(tmp_path: Path) -> None:
    sidecar, plan_path = make_sidecar(tmp_path)
    tiny_onnx(tmp_path / "model.onnx", make_meta(), scale=0.25)  # re-exported
    with pytest.raises(ArtifactError) as e:
        check_compatible(sidecar, HERE, plan_path)
    assert "model.plan is stale: model.onnx changed since the plan was built" in str(e.value)
    assert "rebuild with `fewstep build" in str(e.value)
    check_compatible(sidecar, HERE, plan_path, check_source=False)
    (tmp_path / "model.onnx").unlink()  # a deployed plan without its ONNX is fine
    check_compatible(sidecar, HERE, plan_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        check_compatible(sidecar, HERE, plan_path, onnx_path=tmp_path / "model.onnx")


def test_stale_external_weights(tmp_path: Path) -> None:
    ext = "model.weights.cafe.bin"
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta(), external=ext)
    sidecar, plan_path = make_sidecar(tmp_path, onnx=onnx)
    weights = tmp_path / ext
    weights.write_bytes(weights.read_bytes()[::-1])
    with pytest.raises(ArtifactError, match=f"model.plan is stale: {ext} changed"):
        check_compatible(sidecar, HERE, plan_path)


# ---------------------------------------------------------------------------------
# Timing cache names
# ---------------------------------------------------------------------------------


def test_timing_cache_key_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert plan.gpu_slug(H100) == "nvidia-h100-80gb-hbm3"
    assert plan.gpu_slug("Orin (nvgpu)") == "orin-nvgpu"
    key = plan.timing_cache_key(H100, "9.0", "10.3.0.26")
    assert key == "timing-nvidia-h100-80gb-hbm3-cc90-trt10.3.0.cache"
    assert plan.timing_cache_path("Orin", "8.7", "10.3.0", tmp_path) == (
        tmp_path / "timing-orin-cc87-trt10.3.0.cache")
    monkeypatch.setenv("FEWSTEP_CACHE_DIR", str(tmp_path / "c"))
    assert plan.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEWSTEP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert plan.timing_cache_path("Orin", "8.7", "11.1.0") == (
        tmp_path / "x" / "fewstep" / "timing-orin-cc87-trt11.1.0.cache")


def test_write_plan_writes_plan_then_matching_sidecar(tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import write_plan

    sidecar, plan_path = make_sidecar(tmp_path)
    data = fake_plan_bytes(7)
    new = dataclasses.replace(sidecar, plan_sha256=hashlib.sha256(data).hexdigest(),
                              plan_bytes=len(data))
    write_plan(plan_path, data, new)
    assert plan_path.read_bytes() == data and load_sidecar(plan_path) == new
    check_compatible(new, HERE, plan_path)
    with pytest.raises(AssertionError):
        write_plan(plan_path, b"other", new)
    assert plan_path.read_bytes() == data


# ---------------------------------------------------------------------------------
# Build validation (pure) and the TensorRT 10 / 11 typing rules
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "weak", "strongly", "expected"), [
    ("10.3.0", None, None, (True, True, False)),
    ("10.3.0", "fp16", None, (False, False, True)),
    ("10.3.0", None, False, (False, False, False)),
    ("11.1.0", None, None, (True, False, False)),
    ("11.4.0", None, True, (True, False, False)),
])
def test_typing_mode(version: str, weak: str | None, strongly: bool | None,
                     expected: tuple[bool, bool, bool]) -> None:
    from fewstep.export.tensorrt_build import typing_mode

    m = typing_mode(version, weak, strongly)
    assert (m.strongly_typed, m.network_flag, m.fp16_flag) == expected


@pytest.mark.parametrize(("version", "weak", "strongly", "message"), [
    ("11.1.0", "fp16", None, "export the model with --precision fp16 instead"),
    ("11.1.0", None, False, "always strongly typed"),
    ("10.3.0", "fp16", True, "needs a weakly typed network"),
    ("8.6.1", None, None, "too old"),
])
def test_typing_mode_refuses(version: str, weak: str | None, strongly: bool | None,
                             message: str) -> None:
    from fewstep.export.tensorrt_build import typing_mode

    with pytest.raises(ValueError, match=message):
        typing_mode(version, weak, strongly)


def test_prepare_build_checks_arguments(tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import prepare_build

    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    out = tmp_path / "model.plan"
    req = prepare_build(onnx, out, batch="1:2:4", workspace_mib=64)
    assert req.profile == BatchProfile(1, 2, 4) and req.precision == "fp32"
    assert req.workspace_bytes == 64 << 20 and req.meta == make_meta()
    assert prepare_build(onnx, out, weak="fp16").precision == "fp16"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"batch": "4:2:8"}, "1 <= min <= opt <= max"),
        ({"opt_level": 6}, "--opt-level 6 must be 0..5"),
        ({"workspace_mib": 0}, "--workspace-mib 0"),
        ({"exclude_lean_runtime": True}, "add --version-compatible"),
        ({"precision": "fp16"}, "export it with `fewstep export --precision fp16`"),
        ({"weak": "fp16", "strongly_typed": True}, "drop one of them"),
        ({"weak": "int8"}, "weak='int8' is not supported; use one of fp16, bf16"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            prepare_build(onnx, out, **kwargs)
        assert message in str(e.value), kwargs
    with pytest.raises(ValueError, match=r"must end in \.plan"):
        prepare_build(onnx, tmp_path / "model.engine")
    with pytest.raises(ValueError, match="does not exist"):
        prepare_build(onnx, tmp_path / "nowhere" / "model.plan")
    fp16 = tiny_onnx(tmp_path / "half.onnx", make_meta(precision="fp16"))
    with pytest.raises(ValueError, match="already fp16"):
        prepare_build(fp16, out, weak="fp16")


def test_plan_names_for_all(tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import plan_name_for

    meta = make_meta()
    sampler = meta.for_graph(kind="sampler", steps=4, spacing="trailing", eta=1.0)
    assert plan_name_for(Path("a/model.onnx"), tmp_path, meta) == tmp_path / "model.plan"
    assert plan_name_for(Path("a/model.step.onnx"), tmp_path, meta.for_graph(kind="step")) == (
        tmp_path / "model.step.plan")
    assert plan_name_for(Path("a/model.sampler-4-eta1.onnx"), tmp_path, sampler) == (
        tmp_path / "model.sampler-4-eta1.plan")
    assert plan_name_for(Path("a/model.onnx"), tmp_path / "fast.plan", sampler) == (
        tmp_path / "fast.sampler-4-eta1.plan")


# ---------------------------------------------------------------------------------
# `fewstep build`: validation before TensorRT, exit codes, the install hint
# ---------------------------------------------------------------------------------


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide TensorRT (and the lean runtime) as on a machine without them."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)


def build_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from fewstep.export.cli_build import main

    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_build_help_is_the_module_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.export import cli_build

    assert cli_build.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert (cli_build.__doc__ or "").splitlines()[0] in out and "--exclude-lean-runtime" in out


@pytest.mark.parametrize(("batch", "message"), [
    ("4:2:8", "must satisfy 1 <= min <= opt <= max"),
    ("0:1:2", "min=0 must be at least 1"),
    ("a:b:c", "is not MIN:OPT:MAX or N"),
])
def test_build_bad_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str], batch: str,
                         message: str) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    code, err = build_cli([str(onnx), "--out", str(tmp_path / "m.plan"), "--batch", batch],
                          capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_build_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          no_tensorrt: None) -> None:
    good = tiny_onnx(tmp_path / "model.onnx", make_meta())
    bare = tiny_onnx(tmp_path / "bare.onnx", None)
    cases = [
        ([str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "m.plan")], "does not exist"),
        ([str(bare), "--out", str(tmp_path / "m.plan")], "has no fewstep metadata"),
        ([str(good), "--out", str(tmp_path / "no" / "m.plan")], "output folder"),
        ([str(good), "--out", str(tmp_path / "m.engine")], "must end in .plan"),
        ([str(good), "--out", str(tmp_path / "m.plan"), "--exclude-lean-runtime"],
         "add --version-compatible"),
        ([str(good), "--out", str(tmp_path / "m.plan"), "--opt-level", "9"], "0..5"),
    ]
    for args, message in cases:
        code, err = build_cli(args, capsys)
        assert code == 2, args
        assert len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_build_without_tensorrt_says_how_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensorrt: None
) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    code, err = build_cli([str(onnx), "--out", str(tmp_path / "model.plan")], capsys)
    assert code == 2
    assert err.strip() == (
        "error: TensorRT is not installed: pip install 'fewstep[tensorrt]' (x86-64) "
        "or use JetPack's tensorrt on Jetson"
    )
    assert not (tmp_path / "model.plan").exists()


def test_build_all_checks_every_sibling_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              no_tensorrt: None) -> None:
    meta = make_meta()
    tiny_onnx(tmp_path / "model.onnx", meta)
    tiny_onnx(tmp_path / "model.step.onnx", None, kind="step")  # lost its metadata
    code, err = build_cli([str(tmp_path / "model.onnx"), "--out", str(tmp_path), "--all"],
                          capsys)
    assert code == 2 and "model.step.onnx" in err and "no fewstep metadata" in err
    tiny_onnx(tmp_path / "model.step.onnx", meta.for_graph(kind="step"), kind="step")
    code, err = build_cli([str(tmp_path / "model.onnx"), "--out", str(tmp_path), "--all"],
                          capsys)
    assert code == 2 and "TensorRT is not installed" in err


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt") is not None,
    reason="TensorRT is installed here; the subprocess cannot hide it",
)
def test_fewstep_build_command_end_to_end_without_tensorrt(tmp_path: Path) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    run = subprocess.run(
        [sys.executable, "-m", "fewstep.runtime.cli", "build", str(onnx), "--out",
         str(tmp_path / "model.plan"), "--batch", "1:2:4"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "TensorRT is not installed: pip install 'fewstep[tensorrt]'" in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fewstep.runtime.cli", "build", str(onnx), "--out",
         str(tmp_path / "model.plan"), "--batch", "4:2:8"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------
# The backend without TensorRT
# ---------------------------------------------------------------------------------


def test_backend_says_why_it_is_unavailable(no_tensorrt: None) -> None:
    from fewstep.runtime.backends import tensorrt as trt_backend
    from fewstep.runtime.backends.tensorrt_engine import TRT_MISSING

    assert trt_backend.unavailable_reason("tensorrt") == TRT_MISSING
    assert backends.availability()["tensorrt"] == TRT_MISSING
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        backends.load("model.plan", "auto")


def test_open_graph_refuses_other_files(tmp_path: Path) -> None:
    from fewstep.runtime.backends import tensorrt as trt_backend

    with pytest.raises(ArtifactError, match="is not a TensorRT plan"):
        trt_backend.open_graph(str(tmp_path / "model.onnx"))
    with pytest.raises(ArtifactError, match="does not exist"):
        trt_backend.open_graph(str(tmp_path / "model.plan"))


def test_options_are_checked_and_spelt_like_the_other_backends(tmp_path: Path) -> None:
    from fewstep.runtime.backends import ort_options
    from fewstep.runtime.backends import tensorrt as trt_backend

    for old in ("device", "cuda_graphs"):
        with pytest.raises(ValueError, match=rf"option\(s\) {old} not supported by backend "
                                             r"'tensorrt'; use device_id, cuda_graph"):
            trt_backend.open_graph(str(tmp_path / "model.plan"), **{old: 0})
    shared = set(trt_backend.OPTIONS) & set(ort_options.OPTIONS["ort-cuda"])
    assert shared == {"device_id", "cuda_graph"}


# ---------------------------------------------------------------------------------
# On a GPU: real TensorRT plans
# ---------------------------------------------------------------------------------


@pytest.fixture
def trt_gpu() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip(TRT_SKIP)
    from fewstep.runtime.backends.tensorrt import unavailable_reason

    reason = unavailable_reason("tensorrt")
    if reason is not None:
        pytest.skip(reason)


def ort_run(onnx: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, feeds)[0]
    return out


def denoiser_feeds(meta: ModelMeta, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    feeds: dict[str, Any] = {
        "x": rng.standard_normal((batch, *meta.image_shape)).astype(np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.int64),
    }
    if meta.conditional:
        feeds["label"] = rng.integers(0, meta.num_classes, batch).astype(np.int64)
    return feeds


@pytest.mark.tensorrt
def test_plan_matches_onnxruntime(trt_gpu: None, tmp_path: Path,
                                  rng: np.random.Generator) -> None:
    from fewstep.export.tensorrt_build import build_plan

    meta = make_meta(num_classes=3)
    onnx = tiny_onnx(tmp_path / "model.onnx", meta, conditional=True,
                     external="model.weights.0123.bin")
    (tmp_path / "cache").mkdir()  # a folder: the cache file inside is named by GPU and version
    sidecar = build_plan(onnx, tmp_path / "model.plan", batch="1:2:4",
                         timing_cache=tmp_path / "cache")
    assert sidecar.meta == meta and sidecar.profile == BatchProfile(1, 2, 4)
    assert sidecar.strongly_typed and list(sidecar.external_data_sha256) == [
        "model.weights.0123.bin"]
    assert load_sidecar(tmp_path / "model.plan") == sidecar
    assert list((tmp_path / "cache").glob("timing-*-cc*-trt*.cache"))
    graph = backends.load(str(tmp_path / "model.plan"), "tensorrt")
    assert graph.backend == "tensorrt" and graph.max_batch == 4
    for batch in (1, 3, 3, 3, 2, 3):  # the repeats launch a captured CUDA graph
        feeds = denoiser_feeds(meta, batch, rng)
        np.testing.assert_allclose(graph.run(feeds), ort_run(onnx, feeds), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match=r"outside model\.plan's profile 1:2:4"):
        graph.run(denoiser_feeds(meta, 5, rng))
    graph.close()  # type: ignore[attr-defined]


@pytest.mark.tensorrt
def test_sequence_plan_with_conditioning_matches_onnxruntime(
        trt_gpu: None, tmp_path: Path, rng: np.random.Generator) -> None:
    from fewstep.export.tensorrt_build import build_plan

    meta = make_seq_meta()
    onnx_path = tiny_seq_onnx(tmp_path / "policy.onnx", meta)
    sidecar = build_plan(onnx_path, tmp_path / "policy.plan", batch="1:2:4",
                         use_timing_cache=False)
    assert sidecar.meta == meta and sidecar.profile == BatchProfile(1, 2, 4)
    graph = backends.load(str(tmp_path / "policy.plan"), "tensorrt")
    assert graph.max_batch == 4
    for batch in (1, 3, 3, 3, 2):  # the repeats launch a captured CUDA graph
        feeds = seq_feeds(meta, batch, rng)
        np.testing.assert_allclose(graph.run(feeds), ort_run(onnx_path, feeds), rtol=1e-5,
                                   atol=1e-5)
    graph.close()  # type: ignore[attr-defined]


@pytest.mark.tensorrt
def test_step_plan_loop_stays_on_device(trt_gpu: None, tmp_path: Path,
                                        rng: np.random.Generator) -> None:
    from fewstep.export.tensorrt_build import build_plan

    meta = make_meta().for_graph(kind="step")
    onnx = tiny_onnx(tmp_path / "model.step.onnx", meta, kind="step")
    build_plan(onnx, tmp_path / "model.step.plan", batch="1:2:4", use_timing_cache=False)
    graph = backends.load(str(tmp_path / "model.step.plan"), "tensorrt")
    for batch, steps in ((2, 3), (2, 3), (2, 3), (3, 4)):  # repeats: the whole loop captured
        x = rng.standard_normal((batch, *meta.image_shape)).astype(np.float32)
        per_step = [{
            "t": np.full(batch, 999 - 250 * i, np.int64),
            "a_t": np.full(batch, 0.1 + 0.2 * i, np.float32),
            "a_prev": np.full(batch, 0.3 + 0.2 * i, np.float32),
            "eta": np.full(batch, 0.5, np.float32),
            "noise": rng.standard_normal((batch, *meta.image_shape)).astype(np.float32),
        } for i in range(steps)]
        expected = x
        for feeds in per_step:
            expected = ort_run(onnx, {"x": expected, **feeds})
        np.testing.assert_allclose(graph.run_loop(x, {}, per_step), expected, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(backends.host_loop(graph, x, {}, per_step), expected,
                                   rtol=1e-5, atol=1e-5)
    graph.close()  # type: ignore[attr-defined]


@pytest.mark.tensorrt
def test_built_plan_is_refused_when_stale(trt_gpu: None, tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import build_plan

    meta = make_meta()
    onnx = tiny_onnx(tmp_path / "model.onnx", meta)
    build_plan(onnx, tmp_path / "model.plan", batch="2", version_compatible=True,
               use_timing_cache=False)
    backends.load(str(tmp_path / "model.plan"), "tensorrt").close()  # type: ignore[attr-defined]
    tiny_onnx(tmp_path / "model.onnx", meta, scale=0.25)
    with pytest.raises(ArtifactError, match=r"model\.plan is stale: model\.onnx changed"):
        backends.load(str(tmp_path / "model.plan"), "tensorrt")


# ---------------------------------------------------------------------------------
# bf16: a bf16 graph builds strongly typed; --bf16-weak is TensorRT 10's BuilderFlag.BF16
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "weak", "strongly", "expected"), [
    # (strongly_typed, network_flag, fp16_flag, bf16_flag); builder flag names
    ("10.3.0", "bf16", None, ((False, False, False, True), ["BF16"])),
    ("10.3.0", "fp16", None, ((False, False, True, False), ["FP16"])),
    ("10.3.0", None, None, ((True, True, False, False), [])),
    ("10.8.0", None, True, ((True, True, False, False), [])),
    ("11.1.0", None, None, ((True, False, False, False), [])),
])
def test_typing_mode_bf16(version: str, weak: str | None, strongly: bool | None,
                          expected: tuple[tuple[bool, bool, bool, bool], list[str]]) -> None:
    from fewstep.export.tensorrt_build import typing_mode, weak_builder_flags

    m = typing_mode(version, weak, strongly)
    assert (m.strongly_typed, m.network_flag, m.fp16_flag, m.bf16_flag) == expected[0]
    assert weak_builder_flags(m) == expected[1]


@pytest.mark.parametrize(("version", "weak", "strongly", "message"), [
    ("11.1.0", "bf16", None, "export the model with --precision bf16 instead"),
    ("10.3.0", "bf16", True, "--bf16-weak needs a weakly typed network"),
])
def test_typing_mode_refuses_bf16(version: str, weak: str | None,
                                  strongly: bool | None, message: str) -> None:
    from fewstep.export.tensorrt_build import typing_mode

    with pytest.raises(ValueError, match=message):
        typing_mode(version, weak, strongly)


def test_prepare_build_bf16(tmp_path: Path) -> None:
    from fewstep.export.tensorrt_build import prepare_build

    out = tmp_path / "model.plan"
    fp32 = tiny_onnx(tmp_path / "model.onnx", make_meta())
    bf16 = tiny_onnx(tmp_path / "bf.onnx", make_meta(precision="bf16"))
    fp16 = tiny_onnx(tmp_path / "half.onnx", make_meta(precision="fp16"))
    # A bf16 graph: the precision comes from the graph, strongly typed by default.
    req = prepare_build(bf16, out)
    assert req.precision == "bf16" and req.weak is None and req.strongly_typed is None
    assert prepare_build(bf16, out, precision="bf16").precision == "bf16"
    # An fp32 graph with --bf16-weak (TensorRT 10's BuilderFlag.BF16).
    weak = prepare_build(fp32, out, weak="bf16")
    assert weak.precision == "bf16" and weak.weak == "bf16"
    cases: list[tuple[Path, dict[str, Any], str]] = [
        (bf16, {"weak": "bf16"}, "bf.onnx is already bf16; drop --bf16-weak"),
        (fp16, {"weak": "bf16"}, "half.onnx is already fp16; drop --bf16-weak"),
        (bf16, {"weak": "fp16"}, "--fp16-weak is for fp32 graphs"),
        (fp32, {"weak": "bf16", "strongly_typed": True}, "drop one of them"),
        (fp32, {"precision": "bf16"}, "export it with `fewstep export --precision bf16` (or, "
                                      "on TensorRT 10 only, build with --bf16-weak)"),
        (bf16, {"precision": "fp16"}, "export it with `fewstep export --precision fp16`"),
        (fp32, {"weak": "bf16", "precision": "fp16"}, "built with --bf16-weak"),
    ]
    for onnx, kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            prepare_build(onnx, out, **kwargs)
        assert message in str(e.value), (onnx.name, kwargs, str(e.value))


def test_bf16_needs_ampere_or_newer() -> None:
    from fewstep.export.tensorrt_build import check_device_precision

    for cc in ("8.0", "8.7", "9.0", "12.0"):  # A100, Jetson Orin, H100, Blackwell
        check_device_precision("bf16", cc)
    for precision in ("fp32", "fp16"):
        check_device_precision(precision, "7.2")
    with pytest.raises(ValueError, match=r"Xavier \(compute capability 7\.2\) has no bf16"):
        check_device_precision("bf16", "7.2", "Xavier")
    with pytest.raises(ValueError, match="export with --precision fp16 instead"):
        check_device_precision("bf16", "7.5")


def test_build_cli_bf16(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        no_tensorrt: None) -> None:
    from fewstep.export import cli_build

    assert cli_build.main(["--help"]) == 0
    assert "--bf16-weak" in capsys.readouterr().out
    fp32 = tiny_onnx(tmp_path / "model.onnx", make_meta())
    bf16 = tiny_onnx(tmp_path / "bf.onnx", make_meta(precision="bf16"))
    code, err = build_cli([str(bf16), "--out", str(tmp_path / "bf.plan"), "--bf16-weak"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "already bf16" in err
    code, err = build_cli([str(fp32), "--out", str(tmp_path / "m.plan"), "--bf16-weak",
                           "--fp16-weak"], capsys)
    assert code == 2 and "exclude each other" in err
    # Valid requests get as far as importing TensorRT.
    for args in ([str(bf16), "--out", str(tmp_path / "bf.plan")],
                 [str(fp32), "--out", str(tmp_path / "m.plan"), "--bf16-weak"]):
        code, err = build_cli(args, capsys)
        assert code == 2 and "TensorRT is not installed" in err, (args, err)
    assert not list(tmp_path.glob("*.plan"))


def tiny_bf16_onnx(path: Path, meta: ModelMeta) -> Path:
    """eps = float(bf16(x) * bf16(0.5)) + t / 1000: a graph with its own bf16 precision."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, h, w = meta.image_shape
    f32, bf16 = TensorProto.FLOAT, TensorProto.BFLOAT16
    inits = [helper.make_tensor("w", bf16, [1, c, 1, 1], [0.5] * c),
             numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "k_t")]
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=bf16),
             helper.make_node("Mul", ["xb", "w"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["y"], to=f32),
             helper.make_node("Cast", ["t"], ["tf"], to=f32),
             helper.make_node("Reshape", ["tf", "shape4"], ["t4"]),
             helper.make_node("Mul", ["t4", "k_t"], ["ts"]),
             helper.make_node("Add", ["y", "ts"], ["eps"])]
    graph = helper.make_graph(
        nodes, "tiny-bf16",
        [helper.make_tensor_value_info("x", f32, ["B", c, h, w]),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("eps", f32, ["B", c, h, w])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="fewstep-test")
    model.ir_version = 8
    helper.set_model_props(model, {META_KEY: meta.to_json()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → nearest bfloat16 (ties to even), as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(
        0xFFFF0000)
    return rounded.view(np.float32)


def test_tiny_bf16_graph_is_valid_onnx(tmp_path: Path) -> None:
    meta = make_meta(precision="bf16")
    path = tiny_bf16_onnx(tmp_path / "bf.onnx", meta)
    from fewstep.runtime.artifact import read_onnx_meta

    assert read_onnx_meta(path).graph.precision == "bf16"
    assert to_bf16(np.array([1.0, 1.00390625, 1.01171875], np.float32)).tolist() == [
        1.0, 1.0, 1.015625]


@pytest.mark.tensorrt
def test_bf16_plans_strongly_typed_and_weak(trt_gpu: None, tmp_path: Path,
                                            rng: np.random.Generator) -> None:
    import tensorrt

    from fewstep.export.tensorrt_build import build_plan

    meta = make_meta(precision="bf16")
    onnx = tiny_bf16_onnx(tmp_path / "bf.onnx", meta)
    sidecar = build_plan(onnx, tmp_path / "bf.plan", batch="1:2:4", use_timing_cache=False)
    assert sidecar.precision == "bf16" and sidecar.strongly_typed and not sidecar.fp16_weak
    assert load_sidecar(tmp_path / "bf.plan").precision == "bf16"
    graph = backends.load(str(tmp_path / "bf.plan"), "tensorrt")
    feeds = denoiser_feeds(meta, 3, rng)
    expect = to_bf16(feeds["x"]) * 0.5 + feeds["t"].reshape(-1, 1, 1, 1) * np.float32(1e-3)
    np.testing.assert_allclose(graph.run(feeds), expect, rtol=1e-6, atol=1e-6)
    graph.close()  # type: ignore[attr-defined]
    if int(tensorrt.__version__.split(".")[0]) >= 11:
        return  # weak typing is gone; test_typing_mode_refuses_bf16 covers the message
    fp32 = tiny_onnx(tmp_path / "model.onnx", make_meta())
    weak = build_plan(fp32, tmp_path / "weak.plan", batch="1:2:4", weak="bf16",
                      use_timing_cache=False)
    assert weak.precision == "bf16" and not weak.strongly_typed
    assert weak.extra["bf16_weak"] is True
    graph = backends.load(str(tmp_path / "weak.plan"), "tensorrt")
    feeds = denoiser_feeds(make_meta(), 2, rng)
    np.testing.assert_allclose(graph.run(feeds), ort_run(fp32, feeds), rtol=1e-2, atol=1e-2)
    graph.close()  # type: ignore[attr-defined]


def test_rebuild_command_repeats_the_weak_typing_flags(tmp_path: Path) -> None:
    side, plan_path = make_sidecar(tmp_path)
    assert "-weak" not in plan.rebuild_command(plan_path, sidecar=side)
    side, plan_path = make_sidecar(tmp_path, precision="bf16", strongly_typed=False,
                                   extra={"bf16_weak": True})
    assert plan.rebuild_command(plan_path, sidecar=side).endswith("--bf16-weak")
    side, plan_path = make_sidecar(tmp_path, precision="fp16", strongly_typed=False,
                                   fp16_weak=True)
    assert plan.rebuild_command(plan_path, sidecar=side).endswith("--fp16-weak")
