"""TensorRT-RTX plans: `fewstep build --engine tensorrt-rtx`, its sidecar and its refusals.

Without TensorRT-RTX: the sidecar (engine, targets; old sidecars still load), the refusal
of a TensorRT-RTX plan by the ``tensorrt`` backend and ``Pipeline``, ``fewstep info``,
the options TensorRT-RTX does not have and the install hint. With the ``tensorrt-rtx``
wheels (marker ``tensorrt_rtx``): real plans of tiny graphs, and of every graph kind a
tiny trained model exports in fp32, fp16 and bf16. TensorRT-RTX builds ahead of time and needs
no GPU for that, so these run wherever its wheels are installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_tensorrt import build_cli, make_meta, make_sidecar, tiny_onnx

from fewstep.runtime import backends, plan
from fewstep.runtime.artifact import read_onnx_meta as load_meta
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.plan import RTX_DEFAULT_TARGETS, PlanSidecar, load_sidecar, sidecar_path
from fewstep.runtime.plan_check import RuntimeInfo, check_compatible, engine_problem, runs_on

RTX_FOUND = any(importlib.util.find_spec(m) is not None
                for m in ("tensorrt_rtx_bindings", "tensorrt_rtx"))
RTX_SKIP = "TensorRT-RTX is not installed (pip install 'fewstep[tensorrt-rtx]')"
H200 = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA H200", compute_capability="9.0")
RTX4090 = RuntimeInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA GeForce RTX 4090",
                      compute_capability="8.9")


def rtx_sidecar(tmp: Path, targets: tuple[str, ...] = RTX_DEFAULT_TARGETS,
                **changes: Any) -> tuple[PlanSidecar, Path]:
    """A TensorRT-RTX plan + sidecar as a build without a GPU writes it."""
    fields: dict[str, Any] = dict(engine="tensorrt-rtx", targets=targets,
                                  tensorrt_version="1.7.1.116", gpu_name="",
                                  compute_capability="", cuda_runtime_version="",
                                  workspace_bytes=0)
    fields.update(changes)
    return make_sidecar(tmp, **fields)


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("tensorrt", "tensorrt_lean", "tensorrt_rtx", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------------
# The sidecar
# ---------------------------------------------------------------------------------


def test_rtx_sidecar_round_trip(tmp_path: Path) -> None:
    sidecar, plan_path = rtx_sidecar(tmp_path, targets=("8.6", "12.x"))
    assert load_sidecar(plan_path) == sidecar
    data = json.loads(sidecar_path(plan_path).read_text())
    assert data["engine"] == "tensorrt-rtx" and data["targets"] == ["8.6", "12.x"]
    assert data["schema_version"] == 2 and data["compute_capability"] == ""
    assert sidecar.describe_target() == "RTX GPUs of compute capability 8.6, 12.x"
    built_on_gpu, _ = rtx_sidecar(tmp_path, gpu_name="NVIDIA H200", compute_capability="9.0")
    assert load_sidecar(plan_path) == built_on_gpu


def test_tensorrt_sidecar_says_its_engine(tmp_path: Path) -> None:
    sidecar, plan_path = make_sidecar(tmp_path)
    data = json.loads(sidecar_path(plan_path).read_text())
    assert data["engine"] == "tensorrt" and data["targets"] == []
    assert sidecar.describe_target() == "NVIDIA H100 80GB HBM3 (compute capability 9.0)"


def test_schema_1_sidecar_still_loads_as_tensorrt(tmp_path: Path) -> None:
    sidecar, plan_path = make_sidecar(tmp_path)
    side = sidecar_path(plan_path)
    data = json.loads(side.read_text())
    del data["engine"], data["targets"]
    data["schema_version"] = 1
    side.write_text(json.dumps(data))
    old = load_sidecar(plan_path)
    assert old.engine == "tensorrt" and old.targets == () and old.schema_version == 1
    assert dataclasses.replace(old, schema_version=2) == sidecar
    check_compatible(old, RuntimeInfo(tensorrt_version="10.3.0", gpu_name=sidecar.gpu_name,
                                      compute_capability="9.0"), plan_path)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(engine="onnxruntime"), "engine 'onnxruntime' is not one of"),
    (lambda d: d.update(engine=3), "field engine: 3 is not str"),
    (lambda d: d.update(targets=[]), "a tensorrt-rtx plan has no targets"),
    (lambda d: d.update(targets="8.9"), "field targets: '8.9' is not list"),
    (lambda d: d.update(targets=[8.9]), "is not a list of compute capabilities"),
    (lambda d: d.update(targets=["9"]), "target '9' is not a compute capability"),
    (lambda d: d.update(engine="tensorrt"), "a tensorrt plan has targets"),
    (lambda d: d.update(schema_version=1), "engine and targets need schema_version 2"),
    (lambda d: d.update(engine="tensorrt", targets=[], compute_capability=""),
     "compute capability '' is not MAJOR.MINOR"),
])
def test_bad_rtx_sidecar_is_one_artifact_error(tmp_path: Path, mutate: Any,
                                               message: str) -> None:
    _, plan_path = rtx_sidecar(tmp_path)
    side = sidecar_path(plan_path)
    data = json.loads(side.read_text())
    mutate(data)
    side.write_text(json.dumps(data))
    with pytest.raises(ArtifactError) as e:
        load_sidecar(plan_path)
    assert message in str(e.value) and "rebuild with `fewstep build" in str(e.value)


@pytest.mark.parametrize(("cc", "expected"), [
    ("8.0", True), ("8.6", True), ("8.9", True), ("12.0", True), ("12.1", True),
    ("9.0", False), ("10.0", False), ("7.5", False), ("8.7", False),
])
def test_default_targets(cc: str, expected: bool) -> None:
    assert runs_on(RTX_DEFAULT_TARGETS, cc) is expected
    assert runs_on(("8.6",), cc) is (cc == "8.6")


# ---------------------------------------------------------------------------------
# Refusals: TensorRT's runtime, a GPU outside the targets
# ---------------------------------------------------------------------------------


def test_tensorrt_runtime_refuses_an_rtx_plan(tmp_path: Path) -> None:
    sidecar, plan_path = rtx_sidecar(tmp_path)
    with pytest.raises(ArtifactError) as e:
        check_compatible(sidecar, H200, plan_path)
    msg = str(e.value)
    assert msg.startswith("model.plan was built by TensorRT-RTX 1.7.1.116 for RTX GPUs of "
                          "compute capability 8.0, 8.6, 8.9, 12.x; this GPU (NVIDIA H200, "
                          "compute capability 9.0) is not one of its targets")
    assert "TensorRT's runtime cannot load a TensorRT-RTX plan" in msg
    fix = msg.split("`")[1]  # builds a TensorRT plan: no --engine, no --target-cc
    assert fix == f"fewstep build {tmp_path / 'model.onnx'} --out {plan_path} --batch 1:1:16"
    assert "run this plan on an RTX GPU" in msg
    with pytest.raises(ArtifactError, match=r"this GPU \(NVIDIA GeForce RTX 4090, compute "
                                            r"capability 8\.9\) is one of its targets"):
        check_compatible(sidecar, RTX4090, plan_path)
    assert engine_problem(sidecar, plan_path, "tensorrt-rtx") is None


def test_rtx_plan_on_a_gpu_outside_its_targets(tmp_path: Path) -> None:
    sidecar, plan_path = rtx_sidecar(tmp_path, targets=("8.6",))
    rtx_here = dataclasses.replace(RTX4090, tensorrt_version="1.7.1.116",
                                   engine="tensorrt-rtx")
    with pytest.raises(ArtifactError) as e:
        check_compatible(sidecar, rtx_here, plan_path)
    assert ("was built by TensorRT-RTX for RTX GPUs of compute capability 8.6, and this GPU "
            "(NVIDIA GeForce RTX 4090, compute capability 8.9) is not one of them") in str(e.value)
    assert "--target-cc 8.9" in str(e.value)
    check_compatible(sidecar, dataclasses.replace(rtx_here, compute_capability="8.6"),
                     plan_path)  # one of its targets, the same TensorRT-RTX: fine


def test_backend_and_pipeline_refuse_an_rtx_plan_before_needing_tensorrt(
        tmp_path: Path, no_tensorrt: None) -> None:
    from fewstep.runtime import Pipeline
    from fewstep.runtime.backends import tensorrt as trt_backend

    _, plan_path = rtx_sidecar(tmp_path)
    expected = r"model\.plan was built by TensorRT-RTX 1\.7\.1\.116 for RTX GPUs"
    for name in ("auto", "tensorrt"):  # not "TensorRT is not installed": that is no fix
        with pytest.raises(ArtifactError, match=expected):
            backends.load(str(plan_path), name)
    with pytest.raises(ArtifactError, match=expected):
        trt_backend.open_graph(str(plan_path))
    with pytest.raises(ArtifactError, match=expected):
        Pipeline.load(str(plan_path))


def test_sample_refuses_an_rtx_plan_in_one_line(tmp_path: Path, no_tensorrt: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.runtime.cli import main

    _, plan_path = rtx_sidecar(tmp_path)
    code = main(["sample", "--model", str(plan_path), "--n", "1", "--out",
                 str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: model.plan was built by TensorRT-RTX") and "--engine" not in err
    assert not (tmp_path / "a.png").exists()


def test_rebuild_command_of_an_rtx_plan(tmp_path: Path) -> None:
    sidecar, plan_path = rtx_sidecar(tmp_path, targets=("8.6", "8.9"))
    onnx = tmp_path / "model.onnx"
    assert plan.rebuild_command(plan_path, onnx, sidecar) == (
        f"fewstep build {onnx} --out {plan_path} --engine tensorrt-rtx --batch 1:1:16 "
        "--target-cc 8.6,8.9")
    default, _ = rtx_sidecar(tmp_path)
    assert plan.rebuild_command(plan_path, onnx, default) == (
        f"fewstep build {onnx} --out {plan_path} --engine tensorrt-rtx --batch 1:1:16")


def test_info_says_what_a_plan_runs_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       no_tensorrt: None) -> None:
    from fewstep.runtime.cli import main

    _, plan_path = rtx_sidecar(tmp_path)
    assert main(["info", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert ("    TensorRT-RTX 1.7.1.116 plan, batch 1:1:16, runs on RTX GPUs of compute "
            "capability 8.0, 8.6, 8.9, 12.x (built without a GPU; the tensorrt backend "
            "cannot load it)") in out.splitlines()
    assert main(["info", str(plan_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["graphs"][0]
    assert row["plan"]["engine"] == "tensorrt-rtx"
    assert row["plan"]["targets"] == list(RTX_DEFAULT_TARGETS)
    (tmp_path / "trt").mkdir()
    _, trt_plan = make_sidecar(tmp_path / "trt")
    assert main(["info", str(trt_plan)]) == 0
    assert ("    TensorRT 10.3.0 plan, batch 1:1:16, runs on NVIDIA H100 80GB HBM3 (compute "
            "capability 9.0)") in capsys.readouterr().out.splitlines()


def test_triton_export_leaves_an_rtx_plan_out(tmp_path: Path) -> None:
    from fewstep.export import triton
    from fewstep.runtime.artifact import Artifact

    meta = make_meta()
    tiny_onnx(tmp_path / "model.onnx", meta)
    sampler = tiny_onnx(tmp_path / "model.sampler-2.onnx",
                        meta.for_graph(kind="sampler", steps=2, spacing="trailing"))
    plans = tmp_path / "plans"
    plans.mkdir()
    sidecar, plan_path = rtx_sidecar(plans, onnx=sampler, meta=load_meta(sampler))
    art = Artifact.open(tmp_path / "model.onnx")
    logs: list[str] = []
    assert triton._find_plans(art, plans, logs.append) == {}
    assert logs == [f"{plan_path}: left out: a TensorRT-RTX plan, which Triton's TensorRT "
                    "backend cannot load; build it with --engine tensorrt"]
    make_sidecar(plans, onnx=sampler, meta=sidecar.meta)  # the same plan, from TensorRT
    assert list(triton._find_plans(art, plans, logs.append)) == ["model.sampler-2.onnx"]


# ---------------------------------------------------------------------------------
# `fewstep build --engine tensorrt-rtx`: arguments, the install hint
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "message"), [
    (["--fp16-weak"], "--fp16-weak is not available with --engine tensorrt-rtx"),
    (["--bf16-weak"], "--bf16-weak is not available with --engine tensorrt-rtx"),
    (["--version-compatible"], "--version-compatible is not available with --engine "
                               "tensorrt-rtx"),
    (["--version-compatible", "--exclude-lean-runtime"], "--version-compatible is not"),
    (["--exclude-lean-runtime"], "--exclude-lean-runtime is not available with --engine"),
    (["--timing-cache", "cache"], "--timing-cache is not available with --engine "
                                  "tensorrt-rtx"),
    (["--target-cc", "8"], "--target-cc '8' is not a compute capability MAJOR.MINOR"),
    (["--target-cc", "8.9,twelve"], "--target-cc 'twelve' is not a compute capability"),
    (["--opt-level", "7"], "--opt-level 7 must be 0..5"),
])
def test_build_rtx_refuses_what_it_does_not_have(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensorrt: None,
        extra: list[str], message: str) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    code, err = build_cli([str(onnx), "--out", str(tmp_path / "m.plan"), "--engine",
                           "tensorrt-rtx", *extra], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.plan").exists()


def test_build_argument_errors_of_the_engines(tmp_path: Path, no_tensorrt: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    out = str(tmp_path / "m.plan")
    code, err = build_cli([str(onnx), "--out", out, "--target-cc", "8.9"], capsys)
    assert code == 2 and err.strip() == (
        "error: --target-cc 8.9 is for --engine tensorrt-rtx (a TensorRT plan runs on the GPU "
        "that builds it); drop --target-cc or add --engine tensorrt-rtx")
    code, err = build_cli([str(onnx), "--out", out, "--engine", "tensorrt-llm"], capsys)
    assert code == 2 and "invalid choice: 'tensorrt-llm'" in err
    bf16 = tiny_onnx(tmp_path / "half.onnx", make_meta(precision="bf16"))
    code, err = build_cli([str(bf16), "--out", out, "--engine", "tensorrt-rtx",
                           "--target-cc", "8.9,7.5"], capsys)
    assert code == 2 and "compute capability 7.5) has no bf16 support" in err


def test_build_rtx_without_it_says_how_to_install(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensorrt: None) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    code, err = build_cli([str(onnx), "--out", str(tmp_path / "model.plan"), "--engine",
                           "tensorrt-rtx"], capsys)
    assert code == 2
    assert err.strip() == (
        "error: TensorRT-RTX is not installed: pip install 'fewstep[tensorrt-rtx]'")
    assert not (tmp_path / "model.plan").exists()


def test_build_help_names_the_engines(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.export import cli_build

    assert cli_build.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--engine {tensorrt,tensorrt-rtx}" in out and "--target-cc" in out


def test_the_extra_installs_the_tensorrt_rtx_wheels() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["tensorrt-rtx"]
    assert sorted(r.split(">")[0] for r in extra) == ["tensorrt-rtx-cu13-bindings",
                                                       "tensorrt-rtx-cu13-libs"]
    assert all(">=1.7,<2" in r for r in extra)


# ---------------------------------------------------------------------------------
# With TensorRT-RTX: real plans (its builds need no GPU)
# ---------------------------------------------------------------------------------

needs_rtx = pytest.mark.skipif(not RTX_FOUND, reason=RTX_SKIP)


@needs_rtx
@pytest.mark.tensorrt_rtx
def test_rtx_builds_tiny_graphs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = make_meta(num_classes=3)
    tiny_onnx(tmp_path / "model.onnx", meta, conditional=True, external="model.weights.0.bin")
    tiny_onnx(tmp_path / "model.step.onnx", meta.for_graph(kind="step"), kind="step",
              conditional=True, external="model.weights.0.bin")
    code, err = build_cli([str(tmp_path / "model.onnx"), "--engine", "tensorrt-rtx", "--all",
                           "--out", str(tmp_path), "--batch", "1:2:4"], capsys)
    assert code == 0, err
    for stem in ("model", "model.step"):
        sidecar = load_sidecar(tmp_path / f"{stem}.plan")
        assert sidecar.engine == "tensorrt-rtx" and sidecar.targets == RTX_DEFAULT_TARGETS
        assert sidecar.strongly_typed and not sidecar.version_compatible
        assert sidecar.profile == plan.BatchProfile(1, 2, 4)
        assert sidecar.plan_bytes == (tmp_path / f"{stem}.plan").stat().st_size > 0
        assert list(sidecar.external_data_sha256) == ["model.weights.0.bin"]
    assert "for RTX GPUs of compute capability 8.0, 8.6, 8.9, 12.x" in err
    code, err = build_cli([str(tmp_path / "model.onnx"), "--engine", "tensorrt-rtx",
                           "--out", str(tmp_path / "ada.plan"), "--target-cc", "8.9"], capsys)
    assert code == 0, err
    assert load_sidecar(tmp_path / "ada.plan").targets == ("8.9",)
    with pytest.raises(ArtifactError, match="was built by TensorRT-RTX"):
        backends.load(str(tmp_path / "ada.plan"), "tensorrt")


@needs_rtx
@pytest.mark.tensorrt_rtx
def test_rtx_names_the_targets_it_cannot_build_for(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    code, err = build_cli([str(onnx), "--engine", "tensorrt-rtx", "--out",
                           str(tmp_path / "m.plan"), "--target-cc", "8.9,9.0"], capsys)
    assert code == 2 and not (tmp_path / "m.plan").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --target-cc 9.0: TensorRT-RTX ") and "8.9" in last
    assert "build with --engine tensorrt" in last


@needs_rtx
@pytest.mark.tensorrt_rtx
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_rtx_builds_every_graph_kind_of_an_export(
        tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        precision: str) -> None:
    """A trained tiny model's denoiser (with guidance), fused step and fused sampler
    graphs, as `fewstep export` writes them, each parse and build with TensorRT-RTX."""
    pytest.importorskip("onnx")
    from fewstep.export import onnx_export
    from fewstep.runtime.artifact import Artifact
    from fewstep.train import checkpoint as ckpt_io

    ck = ckpt_io.load(tiny_checkpoint)
    options = onnx_export.ExportOptions(precision=precision, guidance=True,
                                        fused=("step", "sampler"), sampler_steps=(2,))
    onnx_export.export_to_folder(ck.build_model(), ck.meta, tmp_path, "model", options)
    graphs = {g.kind: g.path for g in Artifact.open(tmp_path / "model.onnx").graphs}
    assert sorted(graphs) == ["denoiser", "sampler", "step"]
    plans = tmp_path / "plans"
    plans.mkdir()
    code, err = build_cli([str(tmp_path / "model.onnx"), "--engine", "tensorrt-rtx", "--all",
                           "--out", str(plans), "--batch", "1:1:4"], capsys)
    assert code == 0, err
    for kind, onnx in graphs.items():
        plan_path = plans / (onnx.name[: -len(".onnx")] + ".plan")
        sidecar = load_sidecar(plan_path)
        assert sidecar.engine == "tensorrt-rtx" and sidecar.meta.graph.kind == kind
        assert sidecar.precision == precision == sidecar.meta.graph.precision
        assert plan_path.stat().st_size == sidecar.plan_bytes > 0
        assert sidecar.plan_sha256 == plan.file_sha256(plan_path)


# ---------------------------------------------------------------------------------
# benchmarks/lab/trt_rtx_probe.py
# ---------------------------------------------------------------------------------


def probe_main() -> Any:
    spec = importlib.util.spec_from_file_location(
        "trt_rtx_probe", Path(__file__).parents[1] / "benchmarks" / "lab" / "trt_rtx_probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_probe_without_rtx_or_with_bad_arguments_exits_2(
        tmp_path: Path, no_tensorrt: None, capsys: pytest.CaptureFixture[str]) -> None:
    main = probe_main()
    onnx = tiny_onnx(tmp_path / "model.onnx", make_meta())
    out = tmp_path / "probe.json"
    for args, message in (([], "TensorRT-RTX is not installed"),
                          (["--batch", "4:2:1"], "must satisfy 1 <= min <= opt <= max"),
                          (["--target-cc", "eight"], "is not a compute capability")):
        assert main([str(onnx), "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    assert main([str(tmp_path / "missing.onnx"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "holds no ONNX graph" in capsys.readouterr().err
    assert not out.exists()


@needs_rtx
@pytest.mark.tensorrt_rtx
def test_probe_records_what_parsed_and_built(tmp_path: Path) -> None:
    meta = make_meta()
    tiny_onnx(tmp_path / "model.onnx", meta)
    tiny_onnx(tmp_path / "model.step.onnx", meta.for_graph(kind="step"), kind="step")
    out = tmp_path / "probe.json"
    assert probe_main()([str(tmp_path), "--out", str(out), "--target-cc", "8.9"]) == 0
    record = json.loads(out.read_text())
    assert record["summary"] == {"graphs": 2, "parsed": 2, "built": 2}
    assert record["tensorrt_rtx"]["version"] and record["env"]["python"]
    rows = {r["kind"]: r for r in record["graphs"]}
    assert sorted(rows) == ["denoiser", "step"]
    for row in rows.values():
        assert row["parsed"] is True and row["built"] is True and row["error"] is None
        assert row["plan_bytes"] > 0 and row["seconds"] >= 0 and row["targets"] == ["8.9"]
        assert row["precision"] == "fp32" and "plan" not in row
