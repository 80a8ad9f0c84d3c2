"""export/: ONNX graphs (plain, fp16, guidance, step, sampler), parity gate, atomic CLI."""

from __future__ import annotations

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
from fewstep.runtime import artifact, ddim, images, sampling  # noqa: E402
from fewstep.runtime import noise as host_noise  # noqa: E402
from fewstep.runtime.meta import META_KEY, ModelMeta, Schedule  # noqa: E402
from fewstep.train import checkpoint as ckpt_io  # noqa: E402


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
    rows = check.check_artifact(tiny_artifact, ck.build_model(), ck.meta, providers=["cpu"],
                                n=6, steps=4, eta=0.5)
    assert {(r.graph, r.what.split(",")[0]) for r in rows} == {
        ("model.onnx", "network output"), ("model.onnx", "final images"),
        ("model.step.onnx", "final images"), ("model.sampler-2.onnx", "final images")}
    for r in rows:
        assert r.passed and r.psnr >= 40, check.table(rows)
    # The images are not trivially equal because the model outputs nothing: it has learnt.
    out = ck.build_model()(torch.randn(2, 3, 16, 16), torch.tensor([500.0, 900.0]),
                           torch.tensor([0, 1]))
    assert float(out.abs().mean()) > 0.1


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


def test_uint8_sampler_output_is_the_runtime_conversion(tmp_path: Path) -> None:
    meta = ModelMeta.build(prediction_type="epsilon", schedule=Schedule(), channels=3,
                           height=8, width=8)
    x0 = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    options = onnx_export.ExportOptions(fused=("sampler",), sampler_steps=(3,))
    onnx_export.export_to_folder(OracleNet(meta, x0), meta, tmp_path, "o", options)
    s = ort.InferenceSession(str(tmp_path / "o.sampler-3.onnx"), providers=["CPUExecutionProvider"])
    x_T, _ = host_noise.generation_noise(0, range(2), (3, 8, 8))
    img = s.run(None, {"x": x_T})[0]
    assert img.dtype == np.uint8 and img.shape == (2, 8, 8, 3)
    expect = images.to_uint8_nhwc(np.repeat(x0, 2, axis=0))
    assert np.abs(img.astype(int) - expect.astype(int)).max() <= 1


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
    assert r.returncode == 2 and "--guidance needs a class-conditional checkpoint" in r.stderr
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
