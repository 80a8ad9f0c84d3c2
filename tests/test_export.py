"""export/: ONNX graphs (plain, fp16, guidance, step, sampler), parity gate, atomic CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fewstep.export import check, onnx_export  # noqa: E402
from fewstep.runtime import artifact, clitools, ddim, images, sampling  # noqa: E402
from fewstep.runtime import noise as host_noise  # noqa: E402
from fewstep.runtime.meta import META_KEY, ModelMeta, Schedule  # noqa: E402
from fewstep.train import checkpoint as ckpt_io  # noqa: E402


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: progress bars draw on it."""

    def isatty(self) -> bool:
        return True


def fewstep(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fewstep.runtime.cli", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


# ---------------------------------------------------------------------------------
# The exported files
# ---------------------------------------------------------------------------------


def test_files_metadata_and_dynamic_batch(tiny_artifact: Path) -> None:
    folder = tiny_artifact.parent
    names = sorted(p.name for p in folder.iterdir())
    assert names[:3] == ["model.onnx", "model.sampler-2.onnx", "model.step.onnx"]
    assert len(names) == 4 and names[3].startswith("model.weights.")
    for path in artifact.siblings(tiny_artifact):
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for value in list(model.graph.input) + list(model.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param, value.name  # batch is symbolic
            assert all(d.dim_value > 0 for d in dims[1:]), value.name  # nothing else is
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta_json = sess.get_modelmeta().custom_metadata_map[META_KEY]
        meta = ModelMeta.from_json(meta_json)
        assert meta == artifact.read_onnx_meta(path)
        assert [i.name for i in sess.get_inputs()] == list(meta.graph.inputs)
        assert [o.name for o in sess.get_outputs()] == list(meta.graph.outputs)
    kinds = {artifact.read_onnx_meta(p).graph.kind for p in artifact.siblings(tiny_artifact)}
    assert kinds == {"denoiser", "step", "sampler"}
    sampler = artifact.read_onnx_meta(folder / "model.sampler-2.onnx")
    assert sampler.graph.inputs == ("x", "label", "guidance")
    assert sampler.graph.outputs == ("image",) and sampler.graph.steps == 2


def test_graphs_share_one_weights_file(tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    headers = [artifact.read_onnx_header(p) for p in artifact.siblings(tiny_artifact)]
    locations = {loc for h in headers for loc in h.external_data}
    assert len(locations) == 1
    weights = tiny_artifact.parent / locations.pop()
    params = sum(v.numel() * 4 for v in ckpt_io.load(tiny_checkpoint).ema.values())
    # One copy of the weights (plus folded per-step constants), not one per graph.
    assert weights.stat().st_size < 1.5 * params


def test_parity_gate_passes_on_cpu_for_every_graph(tiny_artifact: Path,
                                                   tiny_checkpoint: Path) -> None:
    ck = ckpt_io.load(tiny_checkpoint)
    terminal = Terminal()
    with clitools.Progress(3, "check", stream=terminal) as progress:
        rows = check.check_artifact(tiny_artifact, ck.build_model(), ck.meta, providers=["cpu"],
                                    n=6, steps=4, eta=0.5, progress=progress)
        assert progress.bar.n == 3  # one stage per graph, each gated
    for name in ("model.onnx", "model.step.onnx", "model.sampler-2.onnx"):
        assert f"gate {name}" in terminal.getvalue()
    assert {(r.graph, r.what.split(",")[0]) for r in rows} == {
        ("model.onnx", "network output"), ("model.onnx", "final images"),
        ("model.step.onnx", "final images"), ("model.sampler-2.onnx", "final images")}
    for r in rows:
        assert r.passed and r.psnr >= 40, check.table(rows)
    # The images are not trivially equal because the model outputs nothing: it has learnt.
    out = ck.build_model()(torch.randn(2, 3, 16, 16), torch.tensor([500.0, 900.0]),
                           torch.tensor([0, 1]))
    assert float(out.detach().abs().mean()) > 0.1


def test_fp16_export_keeps_fp32_islands_and_passes_its_gate(tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    ck = ckpt_io.load(tiny_checkpoint)
    options = onnx_export.ExportOptions(precision="fp16", fused=("sampler",), sampler_steps=(2,),
                                        sampler_output="float")
    _, reports = onnx_export.export_to_folder(ck.build_model(), ck.meta, tmp_path, "m", options)
    islands = reports[0].fp32_islands
    assert islands.get("LayerNormalization", 0) >= 10 and islands.get("Softmax", 0) >= 1
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    conv_w = [i for i in model.graph.initializer if i.dims and len(i.dims) == 4]
    assert conv_w and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_w)
    rows = check.check_artifact(tmp_path / "m.onnx", ck.build_model(), ck.meta,
                                providers=["cpu"], n=4)
    assert all(r.precision == "fp16" and r.gate == 35 for r in rows)
    assert all(r.passed for r in rows), check.table(rows)
    # fp16 is not bit-identical to fp32: the gate is measuring something.
    assert any(r.max_abs > 0 for r in rows)


def test_stochastic_sampler_has_a_noise_input_and_matches(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    ck = ckpt_io.load(tiny_checkpoint)
    options = onnx_export.ExportOptions(fused=("sampler",), sampler_steps=(3,), eta=1.0)
    onnx_export.export_to_folder(ck.build_model(), ck.meta, tmp_path, "m", options)
    path = tmp_path / "m.sampler-3-eta1.onnx"
    meta = artifact.read_onnx_meta(path)
    assert meta.graph.inputs == ("x", "label", "noise") and meta.graph.eta == 1.0
    rows = check.check_artifact(path, ck.build_model(), ck.meta, providers=["cpu"], n=4)
    assert all(r.passed for r in rows), check.table(rows)


# ---------------------------------------------------------------------------------
# The DDIM math inside the graphs, checked with an oracle network
# ---------------------------------------------------------------------------------


class OracleNet(torch.nn.Module):
    """Returns the exact network output for known x0 (one per class)."""

    def __init__(self, meta: ModelMeta, x0: np.ndarray) -> None:
        super().__init__()
        self.prediction_type = meta.prediction_type
        self.register_buffer("x0", torch.from_numpy(x0).float())
        ac = meta.schedule.alphas_cumprod()
        self.register_buffer("ac", torch.from_numpy(ac).float())

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                label: torch.Tensor | None = None) -> torch.Tensor:
        a = self.ac[t.long()].reshape(-1, 1, 1, 1)
        x0 = self.x0[label] if label is not None else self.x0[0:1]
        eps = ddim.eps_from_x0(x, x0, a)
        return ddim.target_for(self.prediction_type, x0, eps, a)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_fused_graphs_return_x0_for_an_oracle(prediction_type: str, tmp_path: Path) -> None:
    meta = ModelMeta.build(prediction_type=prediction_type,
                           schedule=Schedule(beta_schedule="squaredcos_cap_v2"),
                           channels=3, height=8, width=8, num_classes=3)
    x0 = np.random.default_rng(0).uniform(-0.9, 0.9, (4, 3, 8, 8)).astype(np.float32)
    net = OracleNet(meta, x0)
    options = onnx_export.ExportOptions(fused=("step", "sampler"), sampler_steps=(5,), eta=1.0,
                                        sampler_output="float", shared_weights=False)
    onnx_export.export_to_folder(net, meta, tmp_path, "o", options)
    labels = np.array([0, 2, 1, 0], dtype=np.int64)
    expect = x0[labels]
    plan = sampling.SamplingPlan.create(meta, 5, "trailing", 1.0)
    x_T, noise = host_noise.generation_noise(7, range(4), (3, 8, 8), 5)
    s = ort.InferenceSession(str(tmp_path / "o.sampler-5-eta1.onnx"),
                             providers=["CPUExecutionProvider"])
    out = s.run(None, {"x": x_T, "label": labels, "noise": noise})[0]
    np.testing.assert_allclose(out, expect, atol=2e-5)
    step = ort.InferenceSession(str(tmp_path / "o.step.onnx"), providers=["CPUExecutionProvider"])
    x = x_T
    for i in range(plan.steps):
        def full(v: float) -> np.ndarray:
            return np.full(4, v, dtype=np.float32)
        x = step.run(None, {"x": x, "t": full(plan.timesteps[i]), "a_t": full(plan.a_t[i]),
                            "a_prev": full(plan.a_prev[i]), "eta": full(1.0),
                            "noise": noise[:, i], "label": labels})[0]
    np.testing.assert_allclose(x, expect, atol=2e-5)


def _oracle_uint8_sampler(tmp_path: Path) -> tuple[np.ndarray, ort.InferenceSession]:
    """x0 (1, 3, 8, 8) and an ORT session of its exported 3-step uint8 sampler graph."""
    meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                           height=8, width=8)
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    options = onnx_export.ExportOptions(fused=("sampler",), sampler_steps=(3,))
    terminal = Terminal()
    with clitools.Progress(4, "export", stream=terminal) as progress:
        onnx_export.export_to_folder(OracleNet(meta, x0), meta, tmp_path, "o", options,
                                     progress)
        assert progress.bar.n == 4 == 2 * onnx_export.graph_count(options)  # traced, checked
    shown = terminal.getvalue()
    for stage in ("trace o.onnx", "trace o.sampler-3.onnx", "check o.onnx",
                  "check o.sampler-3.onnx"):
        assert stage in shown
    assert "exporting o.sampler-3.onnx (sampler, fp32)\n" in shown  # log lines above the bar
    s = ort.InferenceSession(str(tmp_path / "o.sampler-3.onnx"), providers=["CPUExecutionProvider"])
    return x0, s


def test_uint8_sampler_output_is_the_runtime_conversion(tmp_path: Path) -> None:
    x0, s = _oracle_uint8_sampler(tmp_path)
    x_T, _ = host_noise.generation_noise(0, range(2), (3, 8, 8))
    img = s.run(None, {"x": x_T})[0]
    assert img.dtype == np.uint8 and img.shape == (2, 8, 8, 3)
    expect = images.to_uint8_nhwc(np.repeat(x0, 2, axis=0))
    assert np.abs(img.astype(int) - expect.astype(int)).max() <= 1


def test_uint8_sampler_graph_marks_nonfinite_images(tmp_path: Path) -> None:
    x0, s = _oracle_uint8_sampler(tmp_path)
    x_T, _ = host_noise.generation_noise(0, range(3), (3, 8, 8))
    x_T[1, 2, 5, 5] = np.nan
    img = s.run(None, {"x": x_T})[0]
    assert list(images.nonfinite_images(img)) == [1]
    np.testing.assert_array_equal(img[1], images.nonfinite_marker((8, 8, 3)))
    expect = images.to_uint8_nhwc(np.repeat(x0, 2, axis=0))
    assert np.abs(img[[0, 2]].astype(int) - expect.astype(int)).max() <= 1


def test_unet_block_tables_and_folded_attention_are_the_same_function() -> None:
    from fewstep.export.graphs import fold_attention_norms
    from fewstep.train.unet import UNet, preset

    torch.manual_seed(0)
    net = UNet(preset("tiny", num_classes=3, image_size=16)).eval()
    with torch.no_grad():  # non-trivial weights everywhere (several are zero-initialised)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 16, 16)
    label = torch.tensor([0, 3, 2, 1])
    t = 417.0
    with torch.no_grad():
        ref = net(x, torch.full((4,), t), label)
        tables = net.block_tables(t)
        assert len(tables) == len(net.resblocks())
        assert all(tab.shape[0] == 4 for tab in tables)  # 3 classes + the null label
        out = net(x, None, None, block_proj=[tab[label] for tab in tables])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        folded = __import__("copy").deepcopy(net)
        fold_attention_norms(folded)
        assert not any(m.norm.affine for m in folded.modules() if hasattr(m, "qkv"))
        torch.testing.assert_close(folded(x, torch.full((4,), t), label), ref,
                                   atol=1e-5, rtol=1e-5)


def test_sampler_graph_looks_up_embeddings_instead_of_recomputing_them(
        tiny_artifact: Path) -> None:
    # Per step: one Gather per residual block, no Gemm (the embedding MLP and the blocks'
    # projections are tables); the attention norms have no affine Mul/Add left.
    sampler = onnx.load(str(artifact.graph_path(tiny_artifact, "sampler", 2)),
                        load_external_data=False)
    plain = onnx.load(str(tiny_artifact), load_external_data=False)
    ops = [n.op_type for n in sampler.graph.node]
    assert "Gemm" not in ops and "MatMul" in ops
    assert ops.count("LayerNormalization") == 2 * sum(
        n.op_type == "LayerNormalization" for n in plain.graph.node)
    assert "IsNaN" in ops and "Where" in ops  # the nonfinite marker


# ---------------------------------------------------------------------------------
# The CLI: clear errors, nothing half-written, existing output replaced only on success
# ---------------------------------------------------------------------------------


def test_cli_export_writes_and_gates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    r = fewstep("export", str(tiny_checkpoint), "--out", str(out), "--fused", "sampler",
                "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out), str(tmp_path / "m.sampler-2.onnx")]
    assert "PSNR" in r.stderr and " NO" not in r.stderr
    assert "\r" not in r.stderr  # stderr is a pipe: no progress bar redraws
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fewstep-tmp")]


def test_cli_failed_gate_leaves_the_old_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    r = fewstep("export", str(tiny_checkpoint), "--out", str(out), "--min-psnr-fp32", "1e9")
    assert r.returncode == 1, r.stderr
    assert "check failed:" in r.stderr and "nothing was written" in r.stderr
    assert "Traceback" not in r.stderr
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/m.onnx", "--fused", "sampler", "--steps", "1200"],
         "steps=1200 exceeds num_train_timesteps=1000; pass steps <= 1000"),
        (["--out", "{tmp}/missing/m.onnx"], "output folder"),
        (["--out", "{tmp}/m.txt"], "must end in .onnx"),
        (["--out", "{tmp}/m.onnx", "--steps", "4"], "--steps applies to sampler graphs"),
    ],
)
def test_cli_bad_arguments(tiny_checkpoint: Path, tmp_path: Path, args: list[str],
                           message: str) -> None:
    r = fewstep("export", str(tiny_checkpoint), *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".fewstep-tmp*"))


def test_cli_not_a_checkpoint_and_guidance_without_classes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = fewstep("export", str(bad), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "is not a readable PyTorch checkpoint" in r.stderr
    from conftest import quiet_options, tiny_config

    from fewstep.train.fit import train

    ckpt = train(tiny_config(steps=1, batch_size=2, conditional=False), quiet_options(tmp_path))
    r = fewstep("export", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--guidance")
    assert r.returncode == 2
    assert "--guidance needs a conditional model with null conditioning" in r.stderr
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_check(tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    r = fewstep("check", str(tiny_artifact), "--against", str(tiny_checkpoint),
                "--providers", "cpu", "--n", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("yes") == 4
    r = fewstep("check", str(tiny_artifact), "--against", str(tiny_checkpoint),
                "--providers", "cpu", "--n", "2", "--min-psnr-fp32", "1e9")
    assert r.returncode == 1 and "rows below the gate" in r.stderr
    assert r.stdout.count(" NO") >= 3  # a bit-identical uint8 row has PSNR inf
    r = fewstep("check", str(tiny_artifact), "--against", str(tiny_checkpoint),
                "--providers", "tpu")
    assert r.returncode == 2 and "--providers 'tpu' is unknown" in r.stderr


def test_meta_json_inside_onnx_is_the_checkpoint_meta(tiny_artifact: Path,
                                                      tiny_checkpoint: Path) -> None:
    ck = ckpt_io.load(tiny_checkpoint)
    meta = artifact.read_onnx_meta(tiny_artifact)
    assert meta.source_hash == ck.meta.source_hash
    assert meta.train_config == json.loads(ck.meta.to_json())["train_config"]
    assert meta.graph.guidance and meta.graph.kind == "denoiser"


# ---------------------------------------------------------------------------------
# bf16 export, re-export tidying, flags that need their graphs, the fp32 node list
# ---------------------------------------------------------------------------------


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


def test_bf16_export_keeps_fp32_islands_and_the_gate_says_where_it_cannot_run(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    ck = ckpt_io.load(tiny_checkpoint)
    options = onnx_export.ExportOptions(precision="bf16", fused=("sampler",), sampler_steps=(2,),
                                        sampler_output="float")
    assert options.target_opset == onnx_export.BF16_MIN_OPSET == 22
    _, reports = onnx_export.export_to_folder(ck.build_model(), ck.meta, tmp_path, "m", options)
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    for report in reports:
        assert report.meta.graph.precision == "bf16"
        model = onnx.load(str(report.path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 22
        types = _elem_types(model)
        # The graph's inputs and outputs stay float32 (int64 labels).
        assert all(types[v.name] in (f32, onnx.TensorProto.INT64)
                   for v in [*model.graph.input, *model.graph.output])
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs and all(types[n.output[0]] == bf16 for n in convs)
        conv_w = [i for i in model.graph.initializer if len(i.dims) == 4]
        assert conv_w and all(i.data_type == bf16 for i in conv_w)
        # The same islands as fp16: normalisation statistics and softmax in float32 ...
        islands = report.fp32_islands
        assert islands["LayerNormalization"] >= 10 and islands["Softmax"] >= 1
        assert all(types[n.output[0]] == f32 for n in model.graph.node
                   if n.op_type in ("LayerNormalization", "Softmax"))
        # ... listed by node name and the torch module it came from.
        names = report.fp32_nodes["LayerNormalization"]
        assert len(names) == islands["LayerNormalization"]
        assert any(n.startswith("node_layer_norm") and ".norm1)" in n for n in names), names
    denoiser = reports[0]
    assert denoiser.path.name == "m.onnx"
    assert denoiser.fp32_islands["Sin"] == denoiser.fp32_islands["Cos"] == 1  # time embedding
    rows = check.check_artifact(tmp_path / "m.onnx", ck.build_model(), ck.meta,
                                providers=["cpu"], n=2)
    assert len(rows) == 3 and all(r.precision == "bf16" and r.gate == 30 for r in rows)
    if any(r.skipped for r in rows):
        # ONNX Runtime's CPU provider has no bfloat16 Conv/Gemm kernels: every row is
        # skipped with that reason; neither passed nor failed, and the gate is not passed.
        assert all(r.skipped and not r.passed and not r.failed for r in rows)
        assert all("CPUExecutionProvider has no bfloat16 kernel for" in r.skipped for r in rows)
        text = check.table(rows)
        assert text.count("SKIPPED (not run)") == 3
        assert "skipped m.onnx on cpu: ONNX Runtime" in text
        assert check.summary(rows).startswith("parity gate NOT passed: 3 of 3 rows skipped")
    else:  # an ONNX Runtime that runs bf16 on the CPU: real parity at the bf16 gate
        assert all(r.passed for r in rows), check.table(rows)
        assert check.summary(rows) == "parity gate passed (3 rows)"


def test_cli_bf16_export_lists_fp32_nodes_and_does_not_claim_the_gate(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    r = fewstep("export", str(tiny_checkpoint), "--out", str(out), "--precision", "bf16",
                "--check-n", "2", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out)]
    assert artifact.read_onnx_meta(out).graph.precision == "bf16"
    ln = [line.strip() for line in r.stderr.splitlines()
          if line.strip().startswith("fp32 LayerNormalization x")]
    assert len(ln) == 1 and "more; --verbose" not in ln[0]  # --verbose: every name
    count = int(ln[0].split(" x")[1].split(":")[0])
    assert ln[0].count("node_layer_norm") == count >= 10
    assert "parity gate passed" not in r.stderr
    if "SKIPPED" in r.stderr:
        assert "parity gate NOT passed" in r.stderr
        assert "warning: the bf16 graphs were written without a parity check on cpu" in r.stderr


def test_cli_fp32_islands_are_named_compactly_without_verbose() -> None:
    nodes = {"LayerNormalization": [f"node_layer_norm_{i} (unet.b{i}.norm1)" for i in range(5)],
             "Softmax": ["node_softmax (unet.mid.1)"]}
    assert onnx_export.describe_islands(nodes) == [
        "LayerNormalization x5: node_layer_norm_0 (unet.b0.norm1), node_layer_norm_1 "
        "(unet.b1.norm1), node_layer_norm_2 (unet.b2.norm1), ... (+2 more; --verbose lists all)",
        "Softmax x1: node_softmax (unet.mid.1)",
    ]
    assert onnx_export.describe_islands(nodes, first=None)[0].count("node_layer_norm") == 5


def test_fp32_island_nodes_of_a_small_fp16_graph() -> None:
    from onnx import TensorProto, helper

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=f16, name="to_half"),
             helper.make_node("Relu", ["xh"], ["h"], name="relu_half"),
             helper.make_node("Cast", ["h"], ["hf"], to=f32, name="to_float"),
             helper.make_node("Softmax", ["hf"], ["s"], name="softmax_float"),
             helper.make_node("Sigmoid", ["s"], ["y"], name="sigmoid_float")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [2, 3])],
                              [helper.make_tensor_value_info("y", f32, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert onnx_export.fp32_island_nodes(model, {"softmax_float": "unet.mid.1"}) == {
        "Sigmoid": ["sigmoid_float"], "Softmax": ["softmax_float (unet.mid.1)"]}
    assert onnx_export.fp32_islands(model) == {"Sigmoid": 1, "Softmax": 1}


def _oracle_export(tmp_path: Path, name: str, seed: int,
                   **options: object) -> tuple[list[Path], ModelMeta]:
    meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                           height=8, width=8, num_classes=3)
    x0 = np.random.default_rng(seed).uniform(-0.9, 0.9, (3, 3, 8, 8)).astype(np.float32)
    staging = tmp_path / name
    staging.mkdir()
    files, _ = onnx_export.export_to_folder(OracleNet(meta, x0), meta, staging, "m",
                                            onnx_export.ExportOptions(**options))
    return files, meta


def test_reexport_removes_every_graph_and_weights_file_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "other.onnx").write_bytes(b"another artifact")  # another stem: left alone
    (out / "m2.weights.0123456789ab.bin").write_bytes(b"another artifact's weights")
    first, meta = _oracle_export(tmp_path, "a", 0, fused=("step", "sampler"),
                                 sampler_steps=(3,))
    onnx_export.place(first, out, "m", meta.source_hash)
    old = sorted(p.name for p in out.iterdir())
    assert {"m.onnx", "m.step.onnx", "m.sampler-3.onnx"} < set(old)
    old_weights = [n for n in old if n.startswith("m.weights.")]
    assert len(old_weights) == 1
    # The same checkpoint re-exported with no fused graphs and other weights (fp16 here):
    # the stale step/sampler graphs and the old weights file go.
    second, _ = _oracle_export(tmp_path, "b", 0, precision="fp16")
    final = onnx_export.place(second, out, "m", meta.source_hash)
    new_weights = [p.name for p in final if p.suffix == ".bin"]
    assert len(new_weights) == 1 and new_weights != old_weights
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["m.onnx", *new_weights, "other.onnx", "m2.weights.0123456789ab.bin",
         ".m.onnx.lock"])  # the placement lock stays (see fileio.file_lock)
    assert artifact.read_onnx_meta(out / "m.onnx").graph.precision == "fp16"
    assert artifact.read_onnx_header(out / "m.onnx").external_data == tuple(new_weights)
    s = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    assert s.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32), "t": np.zeros(1, np.float32),
                        "label": np.zeros(1, np.int64)})[0].shape == (1, 3, 8, 8)


def test_reexport_removes_nothing_until_every_new_file_is_in_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    first, meta = _oracle_export(tmp_path, "a", 0, fused=("step",))
    onnx_export.place(first, out, "m", meta.source_hash)
    before = sorted(p.name for p in out.iterdir())
    second, _ = _oracle_export(tmp_path, "b", 1)
    missing = tmp_path / "b" / "m.sampler-9.onnx"  # a staged file that vanished
    with pytest.raises(FileNotFoundError):
        onnx_export.place([*second, missing], out, "m", meta.source_hash)
    after = {p.name for p in out.iterdir()}
    assert set(before) <= after  # the old step graph and its weights are still there


@pytest.mark.parametrize(("args", "message"), [
    (["--eta", "0.5"], "--eta applies to sampler graphs; add --fused sampler"),
    (["--spacing", "leading"], "--spacing applies to sampler graphs; add --fused sampler"),
    (["--fused", "step", "--eta", "0"], "--eta applies to sampler graphs"),
    (["--precision", "bf16", "--opset", "18"], "--precision bf16 needs --opset >= 22"),
])
def test_cli_refuses_sampler_flags_without_sampler_graphs(tiny_checkpoint: Path, tmp_path: Path,
                                                          args: list[str], message: str) -> None:
    r = fewstep("export", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".fewstep-tmp*"))
