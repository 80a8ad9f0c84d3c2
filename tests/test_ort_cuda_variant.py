"""The ORT-CUDA variant (``fewstep export --target ort-cuda``): files, metadata, the graph
rewrite's structure, who may load it, and (GPU) its parity gate and Pipeline's use of it.

ONNX Runtime's CPU provider has no kernels for the variant's contrib ops; the numbers of
the rewrite are checked on the CPU by lowering them to standard ops
(``test_ort_cuda_lowered.py``) and on a GPU by the gate here.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime.transformers.onnx_model_unet",
                    reason="onnxruntime without its transformers optimizer")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fewstep.runtime import artifact, backends  # noqa: E402
from fewstep.runtime.errors import ArtifactError, BackendUnavailable  # noqa: E402
from fewstep.runtime.meta import META_KEY, ModelMeta  # noqa: E402

CONTRIB = ("GroupNorm", "SkipGroupNorm", "NhwcConv")


def _cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _export(checkpoint: Path, out: Path, *, variants: tuple[str, ...] = ("ort-cuda",),
            precision: str = "fp32", check: bool = False,
            fused: tuple[str, ...] = ("step", "sampler")) -> list[Path]:
    from fewstep.export import api, onnx_export
    from fewstep.train import checkpoint as ckpt_io

    ck = ckpt_io.load(checkpoint)
    options = onnx_export.ExportOptions(precision=precision, guidance=True,
                                        fused=fused, sampler_steps=(2,) if fused else (),
                                        variants=variants)
    return api.write_artifact(ck.build_model(), ck.meta, out, options, check_parity=check)


@pytest.fixture(scope="module")
def exported(tiny_variant: Path) -> Path:
    """The tiny model exported with the variant (conftest: no gate, shared)."""
    return tiny_variant


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _meta_json(path: Path) -> dict[str, Any]:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
             .metadata_props}
    return json.loads(props[META_KEY])  # type: ignore[no-any-return]


# -- files and metadata -----------------------------------------------------------------


def test_variant_is_an_artifact_of_its_own(exported: Path) -> None:
    folder = exported.parent
    names = sorted(p.name for p in folder.iterdir())
    for kind in ("", ".step", ".sampler-2"):
        assert f"model{kind}.onnx" in names and f"model.ort-cuda{kind}.onnx" in names
    weights = [n for n in names if n.endswith(".bin")]
    assert len(weights) == 2 and sum(n.startswith("model.ort-cuda.weights.") for n in weights) == 1

    portable = artifact.Artifact.open(exported)
    variant = artifact.Artifact.open(artifact.variant_path(exported, "ort-cuda"))
    assert not portable.rejected and not variant.rejected
    assert sorted(g.path.name for g in portable.graphs) == [
        "model.onnx", "model.sampler-2.onnx", "model.step.onnx"]
    assert sorted(g.kind for g in variant.graphs) == ["denoiser", "sampler", "step"]
    assert {g.meta.graph.target for g in variant.graphs if g.meta} == {"ort-cuda"}
    assert {g.meta.graph.target for g in portable.graphs if g.meta} == {"portable"}
    # One model: same source, schedule and shape; only the target differs.
    assert portable.same_model(variant) is None
    assert artifact.mismatch(portable.meta, variant.meta) == "target ('ort-cuda' vs 'portable')"
    # The variant's weights are its own (NHWC): the portable graphs never reference them.
    assert all(loc.startswith("model.weights.") for loc in portable.weights())
    assert all(loc.startswith("model.ort-cuda.weights.") for loc in variant.weights())


def test_portable_metadata_has_no_target_key_and_variant_round_trips(exported: Path) -> None:
    assert "target" not in _meta_json(exported)["graph"]
    vpath = artifact.variant_path(exported, "ort-cuda")
    doc = _meta_json(vpath)
    assert doc["graph"]["target"] == "ort-cuda"
    meta = ModelMeta.from_json(json.dumps(doc))
    assert meta.graph.target == "ort-cuda" and json.loads(meta.to_json()) == doc
    doc["graph"]["target"] = "jetson"
    with pytest.raises(ArtifactError, match=r"graph\.target"):
        ModelMeta.from_json(json.dumps(doc))


def test_variant_path_naming() -> None:
    assert artifact.variant_path("a/model.onnx", "ort-cuda") == Path("a/model.ort-cuda.onnx")
    assert artifact.variant_path("a/model.sampler-4.onnx", "ort-cuda") == Path(
        "a/model.ort-cuda.onnx")
    with pytest.raises(ValueError, match="target"):
        artifact.variant_path("model.onnx", "portable")


# -- the rewrite's structure ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["", ".step", ".sampler-2"])
def test_every_group_norm_and_conv_uses_the_fused_kernels(exported: Path, kind: str) -> None:
    folder = exported.parent
    portable = _ops(folder / f"model{kind}.onnx")
    variant = _ops(folder / f"model.ort-cuda{kind}.onnx")
    # The portable graph's GroupNorms are LayerNormalization over (B, G, C/G*H*W).
    assert portable["LayerNormalization"] > 0 and portable["Conv"] > 0
    assert variant["GroupNorm"] + variant["SkipGroupNorm"] == portable["LayerNormalization"]
    assert variant["SkipGroupNorm"] > 0  # residual adds before a norm are fused in
    assert variant["NhwcConv"] == portable["Conv"]
    assert variant["LayerNormalization"] == 0 and variant["Conv"] == 0
    model = onnx.load(str(folder / f"model.ort-cuda{kind}.onnx"), load_external_data=False)
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    for node in model.graph.node:
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert node.domain == "com.microsoft" and attrs["channels_last"] == 1
    onnx.checker.check_model(str(folder / f"model.ort-cuda{kind}.onnx"), full_check=True)


def _group_norm_graph(channels: int, groups: int, silu: bool,
                      expand: float | None = None) -> onnx.ModelProto:
    """A portable-form GroupNorm as the exporter writes it: Reshape (B, G, -1) →
    LayerNormalization → Reshape (B, C, H, W) → Mul γ → Add β [→ Sigmoid, Mul].
    ``expand``: the LayerNormalization's scale is ``Expand`` of this one value and it
    has no bias, as the exporter writes a large one (a GroupNorm at 128 px and up)."""
    rng = np.random.default_rng(0)
    per_group = channels // groups * 16
    inits = [
        numpy_helper.from_array(np.array([-1, groups, per_group], np.int64), "s3"),
        numpy_helper.from_array(np.array([-1, channels, 4, 4], np.int64), "s4"),
        numpy_helper.from_array(np.ones(per_group, np.float32), "one"),
        numpy_helper.from_array(np.zeros(per_group, np.float32), "zero"),
        numpy_helper.from_array(rng.normal(size=(channels, 1, 1)).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(size=(channels, 1, 1)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(expand or 1.0, np.float32), "scalar"),
        numpy_helper.from_array(np.array([per_group], np.int64), "n_per_group"),
    ]
    norm_inputs = ["v", "one", "zero"]
    nodes = []
    if expand is not None:
        nodes.append(helper.make_node("Expand", ["scalar", "n_per_group"], ["scale"]))
        norm_inputs = ["v", "scale"]
    nodes += [
        helper.make_node("Reshape", ["x", "s3"], ["v"]),
        helper.make_node("LayerNormalization", norm_inputs, ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Reshape", ["n", "s4"], ["r"]),
        helper.make_node("Mul", ["r", "g"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y" if not silu else "a"]),
    ]
    if silu:
        nodes += [helper.make_node("Sigmoid", ["a"], ["sg"]),
                  helper.make_node("Mul", ["a", "sg"], ["y"])]
    graph = helper.make_graph(
        nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", channels, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("silu", [False, True])
def test_rewrite_fuses_a_group_norm_with_its_silu(silu: bool) -> None:
    from fewstep.export import ort_cuda

    result = ort_cuda.rewrite(_group_norm_graph(8, 2, silu))
    assert result.group_norms == 1 and result.silu == int(silu)
    norm = next(n for n in result.model.graph.node if n.op_type == "GroupNorm")
    attrs = {a.name: helper.get_attribute_value(a) for a in norm.attribute}
    assert attrs["groups"] == 2 and attrs["activation"] == int(silu)
    assert abs(attrs["epsilon"] - 1e-5) < 1e-9
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["LayerNormalization"] == 0 and ops["Sigmoid"] == 0
    assert "GroupNorm x1" in result.summary()


def test_rewrite_fuses_a_group_norm_whose_scale_is_an_expand_of_ones() -> None:
    """At 128 px and up the exporter writes the LayerNormalization scale as Expand(1.0,
    [C/G·H·W]) with no bias; before this was matched, those GroupNorms stayed in the
    layer-norm form, whose kernel runs one block per group (22 of 29 ms of busy time of
    a 256 px model on an H200)."""
    from fewstep.export import ort_cuda

    result = ort_cuda.rewrite(_group_norm_graph(8, 2, True, expand=1.0))
    assert result.group_norms == 1 and result.silu == 1
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["LayerNormalization"] == 0 and ops["Expand"] == 0 and ops["GroupNorm"] == 1
    # a scale of 2 is not a plain norm: left, and said why
    with pytest.raises(ValueError, match=r"scale and bias are not a recognisable constant 1 "
                                         r"and 0\); leave --target ort-cuda out"):
        ort_cuda.rewrite(_group_norm_graph(8, 2, True, expand=2.0))


def test_rewrite_summary_counts_the_group_norms_it_left() -> None:
    from fewstep.export import ort_cuda

    result = ort_cuda.Rewrite(onnx.ModelProto(), left=["ln_a: why a", "ln_b: why b"])
    result.ops["GroupNorm"] = 3
    assert result.summary() == "GroupNorm x3; 2 GroupNorm(s) left unfused (ln_a: why a, ...)"


def test_rewrite_refuses_a_graph_whose_groups_have_odd_channel_counts() -> None:
    from fewstep.export import ort_cuda

    with pytest.raises(ValueError, match="3 per group, odd"):
        ort_cuda.rewrite(_group_norm_graph(6, 2, silu=True))


# -- who may load it ----------------------------------------------------------------------


def test_only_ort_cuda_opens_a_variant_graph(exported: Path) -> None:
    vpath = str(artifact.variant_path(exported, "ort-cuda"))
    with pytest.raises(ArtifactError, match=r"ORT-CUDA variant.*ort-cpu"):
        backends.load(vpath, "ort-cpu")
    if not _cuda():
        with pytest.raises(BackendUnavailable, match="ORT-CUDA variant"):
            backends.resolve("auto", vpath)


def test_pipeline_on_the_cpu_uses_the_portable_graphs(exported: Path) -> None:
    from fewstep.runtime.pipeline import Pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the variant beside it is not a problem on the CPU
        pipe = Pipeline.load(exported, backend="ort-cpu")
    assert all(".ort-cuda" not in g["path"] for g in pipe.describe()["graphs"])
    assert pipe.generate(1, steps=2, seed=0).shape == (1, 16, 16, 3)


def test_tensorrt_and_triton_refuse_the_variant(exported: Path, tmp_path: Path) -> None:
    from fewstep.export import tensorrt_build, triton

    vpath = artifact.variant_path(exported, "ort-cuda")
    with pytest.raises(ArtifactError, match=r"pass 'model\.onnx'"):
        tensorrt_build.build_plan(vpath, tmp_path / "m.plan")
    with pytest.raises(ArtifactError, match="Triton"):
        triton.write_repository(vpath, tmp_path / "repo")


def test_check_skips_the_variant_off_cuda(exported: Path, tiny_checkpoint: Path) -> None:
    from fewstep.export import check
    from fewstep.train import checkpoint as ckpt_io

    ck = ckpt_io.load(tiny_checkpoint)
    rows = check.check_artifact(artifact.variant_path(exported, "ort-cuda"), ck.build_model(),
                                ck.meta, providers=["cpu"], n=1)
    assert rows and all(r.skipped == check.VARIANT_CUDA_ONLY and not r.failed for r in rows)


# -- export options -------------------------------------------------------------------------


def test_options_refuse_bf16_and_unknown_targets() -> None:
    from fewstep.export import onnx_export

    with pytest.raises(ValueError, match="no bfloat16"):
        onnx_export.ExportOptions(precision="bf16", variants=("ort-cuda",))
    with pytest.raises(ValueError, match="must be one of ort-cuda"):
        onnx_export.ExportOptions(variants=("tensorrt",))
    assert onnx_export.graph_count(onnx_export.ExportOptions(
        fused=("step", "sampler"), sampler_steps=(2, 4), variants=("ort-cuda",))) == 8


@pytest.mark.skipif("_cuda()", reason="checks the refusal on a machine without CUDA")
def test_gated_export_needs_the_cuda_provider(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="--no-check"):
        _export(tiny_checkpoint, out, check=True)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_cli_export_of_the_variant_without_cuda(tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    import subprocess
    import sys

    if _cuda():
        pytest.skip("checks the refusal on a machine without CUDA")
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-m", "fewstep.runtime.cli", "export",
                        str(tiny_checkpoint), "--out", str(out), "--target", "ort-cuda"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "CUDA provider" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    # --no-check writes it ungated, and says which fused kernels each variant graph uses
    # (the denoiser alone here: the fused graphs' variants are the module export's).
    r = subprocess.run([sys.executable, "-m", "fewstep.runtime.cli", "export",
                        str(tiny_checkpoint), "--out", str(out), "--target", "ort-cuda",
                        "--no-check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "m.ort-cuda.onnx" in r.stdout and "NhwcConv x" in r.stderr
    assert sorted(p.name for p in tmp_path.glob("m.ort-cuda*.onnx")) == ["m.ort-cuda.onnx"]


def test_reexport_without_the_target_removes_the_old_variant(
        exported: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    for f in exported.parent.iterdir():  # the module's export, variant included
        if f.is_file():
            shutil.copy2(f, tmp_path / f.name)
    out = tmp_path / exported.name
    assert (tmp_path / "model.ort-cuda.sampler-2.onnx").is_file()
    _export(tiny_checkpoint, out, variants=(), fused=())  # the denoiser alone: quicker
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert not [n for n in left if "ort-cuda" in n], left
    assert "model.onnx" in left


# -- GPU: the gate on the CUDA provider, and Pipeline's choice -------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_variant_passes_the_gate_and_pipeline_prefers_it(
        tiny_checkpoint: Path, tmp_path: Path, precision: str) -> None:
    if not _cuda():
        pytest.skip("no ONNX Runtime CUDA provider")
    from fewstep.runtime.pipeline import Pipeline

    out = tmp_path / "model.onnx"
    _export(tiny_checkpoint, out, precision=precision, check=True)  # raises below the gate
    pipe = Pipeline.load(out, backend="ort-cuda")
    images = pipe.generate(4, steps=2, seed=1, guidance=2.0)
    info = pipe.last_info
    assert info is not None and info.path == "sampler" and ".ort-cuda." in info.graph, info
    portable = Pipeline.load(out, backend="ort-cuda")
    portable._entries = [e for e in portable._entries if e.meta.graph.target == "portable"]
    reference = portable.generate(4, steps=2, seed=1, guidance=2.0)
    diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 3 and (diff > 1).mean() < 0.01
    # Step and denoiser paths of the variant too (a step count without a sampler graph).
    three = pipe.generate(2, steps=3, seed=1, guidance=2.0)
    assert pipe.last_info is not None and ".ort-cuda." in pipe.last_info.graph
    ref3 = portable.generate(2, steps=3, seed=1, guidance=2.0)
    assert np.abs(three.astype(np.int16) - ref3.astype(np.int16)).max() <= 3


def test_bench_counts_a_variant_graph_on_its_portable_twin(exported: Path) -> None:
    from fewstep.benchmarks import roofline

    folder = exported.parent
    variant = folder / "model.ort-cuda.sampler-2.onnx"
    assert roofline.portable_twin(variant) == folder / "model.sampler-2.onnx"
    assert roofline.portable_twin(folder / "model.step.onnx") == folder / "model.step.onnx"
    cost = roofline.count(variant, 1)
    assert cost.flops == roofline.count(folder / "model.sampler-2.onnx", 1).flops > 0
    assert not cost.unknown


def test_a_variant_graph_that_cannot_open_falls_back_to_the_portable_one(
        exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Pipeline.load does on ort-cuda, with ONNX Runtime refusing the variant (say a
    build without the contrib kernels): one warning, then the portable graph."""
    from fewstep.runtime import pipeline as pl

    real = backends.load

    def load(path: str, name: str = "auto", **options: Any) -> Any:
        if ".ort-cuda" in path:
            raise RuntimeError("Could not find an implementation for GroupNorm(1)")
        return real(path, "ort-cpu", **options)

    monkeypatch.setattr(pl.backends, "load", load)
    art = artifact.Artifact.open(exported)
    variant = pl._variant_entries(art, artifact.variant_path(exported, "ort-cuda"),
                                  "ort-cuda", {})
    assert sorted(Path(e.path).name for e in variant) == [
        "model.ort-cuda.onnx", "model.ort-cuda.sampler-2.onnx", "model.ort-cuda.step.onnx"]
    portable = [pl._Entry(str(g.path), g.meta, None, lambda f=str(g.path): load(f))
                for g in art.graphs if g.meta is not None]
    pipe = pl.Pipeline(portable + variant, "ort-cuda", str(exported))
    with pytest.warns(UserWarning, match="could not open this ORT-CUDA variant"):
        images = pipe.generate(2, steps=2, seed=0)
    assert images.shape == (2, 16, 16, 3)
    info = pipe.last_info
    assert info is not None and info.graph.endswith("model.sampler-2.onnx"), info


def test_a_variant_of_another_model_is_ignored_with_a_warning(
        exported: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from fewstep.runtime import pipeline as pl

    for f in exported.parent.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, tmp_path / f.name)
    # A portable model whose variant beside it describes another model (another sample
    # shape): the variant is not used.
    vpath = artifact.variant_path(tmp_path / "model.onnx", "ort-cuda")
    model = onnx.load(str(vpath), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    doc = json.loads(props[META_KEY])
    doc["source_hash"] = "sha256:" + "0" * 64
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(doc)})
    onnx.save_model(model, str(vpath))
    art = artifact.Artifact.open(tmp_path / "model.onnx")
    with pytest.warns(UserWarning, match="not the ORT-CUDA variant of model.onnx"):
        assert pl._variant_entries(art, vpath, "ort-cuda", {}) == []


def test_a_variant_that_leads_out_of_the_folder_is_refused(exported: Path,
                                                           tmp_path: Path) -> None:
    """A model.ort-cuda.onnx beside the model that is a link to a file elsewhere: nothing
    reads it (info, Pipeline's lookup, an export placing into that folder)."""
    import os
    import shutil
    import subprocess
    import sys

    from fewstep.runtime import pipeline as pl

    folder, outside = tmp_path / "m", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    for f in exported.parent.iterdir():
        if f.is_file() and "ort-cuda" not in f.name and not f.name.startswith("."):
            shutil.copy(f, folder / f.name)
    fifo = outside / "model.ort-cuda.onnx"
    os.mkfifo(fifo)  # opening it would block: the test proves nothing opens it
    (folder / "model.ort-cuda.onnx").symlink_to(fifo)
    with pytest.raises(ArtifactError, match="outside"):
        artifact.find_variant(folder / "model.onnx", "ort-cuda")
    r = subprocess.run([sys.executable, "-m", "fewstep.runtime.cli", "info",
                        str(folder / "model.onnx")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "outside the model's folder" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert pl.Pipeline.load(folder / "model.onnx", backend="ort-cpu") is not None  # not looked at
