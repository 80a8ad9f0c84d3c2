"""`fewstep bench`: statistics, timing plan, roofline counts, report writers, the runner,
an end-to-end quick run on the tiny model, and the CLI's usage errors (CPU only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx_oracle as oo
import pytest

from fewstep.benchmarks import cli, latency, probes, report, roofline, stats
from fewstep.benchmarks.latency import Runner, SuiteConfig, new_row
from fewstep.benchmarks.paths import BenchPath, Workload
from fewstep.benchmarks.stats import TimingConfig
from fewstep.runtime import backends

# ---------------------------------------------------------------------------------
# Statistics and the timing plan
# ---------------------------------------------------------------------------------


def test_percentiles_and_summary_on_synthetic_timings() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100 ms, shuffled
    rng = np.random.default_rng(0)
    s = stats.summarize(list(rng.permutation(values)))
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert s["mean"] == pytest.approx(50.5)
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert (s["min"], s["max"], s["n"]) == (1.0, 100.0, 100)
    assert stats.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_warmup_is_discarded() -> None:
    samples = [250.0, 40.0, 10.0, 11.0, 9.0]
    assert stats.discard_warmup(samples, 2) == [10.0, 11.0, 9.0]
    assert stats.summarize(stats.discard_warmup(samples, 2))["max"] == 11.0
    with pytest.raises(ValueError):
        stats.discard_warmup(samples, 5)


class FakeClock:
    """A clock that advances by the duration scripted for each call."""

    def __init__(self, durations: list[float]) -> None:
        self.now = 0.0
        self.durations = durations
        self.calls = 0

    def __call__(self) -> float:
        return self.now

    def work(self, _: int) -> None:
        self.now += self.durations[min(self.calls, len(self.durations) - 1)]
        self.calls += 1


def test_time_calls_discards_warmup_and_adapts_the_count() -> None:
    # A slow first call (allocation, capture), then 1 ms calls: ~1 s of 1 ms calls.
    clock = FakeClock([0.5] + [0.001] * 5000)
    cfg = TimingConfig(warmup=4, iters=50, target_seconds=1.0, warmup_seconds=100)
    t = stats.time_calls(clock.work, cfg, clock=clock)
    assert t.warmup_s == pytest.approx([0.5, 0.001, 0.001, 0.001])
    assert len(t.samples_s) == 1000 and not t.reduced
    assert max(t.samples_s) == pytest.approx(0.001)  # the slow call is not a statistic
    assert t.summary_ms()["p50"] == pytest.approx(1.0)
    # Slow calls: the warm-up stops after 3 calls past warmup_seconds, and the timed
    # calls are capped by max_config_seconds.
    clock = FakeClock([2.0])
    cfg = TimingConfig(warmup=10, iters=50, warmup_seconds=1.0, max_config_seconds=20.0)
    t = stats.time_calls(clock.work, cfg, clock=clock)
    assert len(t.warmup_s) == 3 and len(t.samples_s) == 10 and t.reduced
    # Past the deadline (the run's time budget) one warm-up call and min_iters_floor
    # samples remain (never a p50 of one call).
    clock = FakeClock([1.0])
    cfg = TimingConfig(warmup=5, iters=50, warmup_seconds=100, max_config_seconds=1000)
    t = stats.time_calls(clock.work, cfg, clock=clock, deadline=0.5)
    assert len(t.warmup_s) == 1 and len(t.samples_s) == cfg.min_iters_floor == 5
    assert t.reduced
    cfg = TimingConfig(warmup=0, iters=2, max_iters=2, warmup_seconds=100,
                       max_config_seconds=1000)
    clock = FakeClock([1.0])
    t = stats.time_calls(clock.work, cfg, clock=clock, deadline=0.5)
    assert len(t.samples_s) == 2 and not t.reduced  # fewer planned than the floor: all


def test_iteration_plan() -> None:
    cfg = TimingConfig(iters=50, max_iters=2000, target_seconds=1.0, max_config_seconds=10.0)
    assert stats.plan_iterations(0.001, cfg) == (1000, False)
    assert stats.plan_iterations(1e-6, cfg) == (2000, False)
    assert stats.plan_iterations(0.05, cfg) == (50, False)
    assert stats.plan_iterations(0.5, cfg) == (20, True)   # 50 calls would take 25 s
    assert stats.plan_iterations(30.0, cfg) == (5, True)   # never below the floor
    with pytest.raises(ValueError):
        TimingConfig(iters=0)


def test_parity_numbers() -> None:
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    assert stats.parity(a, a.copy()) == (0, stats.PSNR_IDENTICAL)
    b = a.copy()
    b[0, 0, 0, 0] = 110
    err, psnr = stats.parity(a, b)
    mse = 100 / a.size
    assert err == 10 and psnr == pytest.approx(10 * math.log10(255**2 / mse))


# ---------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------


def _hand_graph() -> Any:
    """Conv(3→4, 3x3, pad 1) on (N, 3, 8, 8) → Relu → Reshape (N, 256) → MatMul (256, 10)
    → Add bias: 2·(4·64·27 + 256·10) = 18944 matrix FLOPs and 256 + 10 elementwise per image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(10, np.float32) + 0.5, "b2"),
        numpy_helper.from_array(np.array([0, 256], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_roofline_counts_a_hand_built_graph() -> None:
    pytest.importorskip("onnx")
    model = _hand_graph()
    for n in (1, 3):
        c = roofline.count(model, n)
        assert c.matmul_flops == n * 2 * (4 * 64 * 27 + 256 * 10)
        assert c.elementwise_flops == n * (4 * 64 + 10)
        assert c.weight_bytes == (108 + 2560 + 10) * 4 + 2 * 8
        assert c.io_bytes == n * (3 * 64 + 10) * 4
        # every node's activations: conv in/out, relu in/out, reshape in/out, matmul in/out,
        # add in/out (weights excluded)
        per = (192 + 256 + 256 + 256 + 256 + 256 + 256 + 10 + 10 + 10) * 4
        assert c.activation_bytes == n * per
        assert c.bytes_min == c.weight_bytes + c.io_bytes < c.bytes_max
        assert c.unknown == ()


def test_roofline_of_the_tiny_unet_is_linear_in_batch(tiny_artifact: Path) -> None:
    pytest.importorskip("onnx")
    c1, c2, c5 = (roofline.count(tiny_artifact, b) for b in (1, 2, 5))
    assert c1.unknown == () and c1.matmul_flops > 1e6
    assert c2.matmul_flops == 2 * c1.matmul_flops and c5.matmul_flops == 5 * c1.matmul_flops
    assert c5.elementwise_flops == pytest.approx(5 * c1.elementwise_flops, rel=0.01)
    assert c1.weight_bytes == c5.weight_bytes > 0
    step = roofline.count(tiny_artifact.with_name("model.step.onnx"), 1)
    assert step.matmul_flops == c1.matmul_flops  # the DDIM update adds no matrix work
    # Two UNet evaluations; the sampler shares one time embedding per step (its t is a
    # constant), so its small time-MLP runs at batch 1: a hair under twice the denoiser.
    sampler = roofline.count(tiny_artifact.with_name("model.sampler-2.onnx"), 1)
    assert sampler.matmul_flops == pytest.approx(2 * c1.matmul_flops, rel=1e-3)
    assert sampler.matmul_flops <= 2 * c1.matmul_flops


def test_roofline_floor_and_fraction() -> None:
    r = roofline.Roofline()
    r.costs[("fp32", 1)] = roofline.GraphCost(1, 2_000_000_000, 0, 4_000_000, 0, 0, 1)
    r.ceilings["cuda"] = {"matmul_fp32_tflops": 1.0, "matmul_bf16_tflops": 4.0, "copy_gbps": 1.0}
    r.sources["fp32"] = "m.onnx"
    assert r.floor_ms("cuda", "fp32", 1) == (pytest.approx(4.0), "memory")  # 4 MB at 1 GB/s
    r.ceilings["cuda"]["copy_gbps"] = 1000.0
    assert r.floor_ms("cuda", "fp32", 1) == (pytest.approx(2.0), "compute")  # 2 GFLOP at 1 TF
    assert r.floor_ms("cuda", "fp16", 1) == (pytest.approx(0.5), "compute")
    row = new_row(device="cuda", precision="fp32", batch=1, per_step_ms=8.0)
    r.annotate(row)
    assert row["floor_fraction"] == pytest.approx(0.25) and row["roofline_bound"] == "compute"


# ---------------------------------------------------------------------------------
# Report and plots on synthetic rows
# ---------------------------------------------------------------------------------


def _row(name: str, family: str, path: str, steps: int, batch: int, p50: float,
         **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        run_id="r", name=name, family=family, path=path, backend="x", precision="fp16",
        device="cuda", steps=steps, batch=batch, status="ok", p50_ms=p50, p90_ms=p50 * 1.1,
        p99_ms=p50 * 1.2, std_ms=0.1, per_step_ms=p50 / steps, images_per_s=batch / p50 * 1e3,
        network_ms=p50 * 0.9, host_overhead_ms=p50 * 0.1, host_overhead_pct=100 / 9,
        iterations=50, psnr_db=45.0, max_abs_err=2)
    fields.update(extra)
    return new_row(**fields)


def _synthetic_rows() -> list[dict[str, Any]]:
    rows = []
    for steps in (1, 4):
        for batch in (1, 4):
            rows.append(_row("fewstep ort-cuda sampler fp16", "fewstep", "fewstep", steps,
                             batch, 2.5 * steps * batch))
            rows.append(_row("torch-eager fp16", "baseline", "torch-eager", steps, batch,
                             30.0 * steps * batch))
    # torch.compile beats fewstep at 4 steps, batch 1 only: 8.0 < 10.0 ms
    rows.append(_row("torch-compile reduce-overhead fp16", "baseline", "torch-compile", 4, 1,
                     8.0))
    rows.append(_row("torch-compile reduce-overhead fp16", "baseline", "torch-compile", 1, 1,
                     4.0))
    rows.append(new_row(run_id="r", name="fewstep tensorrt", family="fewstep", path="fewstep",
                        backend="tensorrt", status="unavailable", reason="TensorRT is missing"))
    rows.append(new_row(run_id="r", name="fewstep ort-cuda sampler fp16", family="fewstep",
                        path="fewstep", steps=2, batch=1, status="n/a",
                        reason="no sampler graph for 2 steps"))
    return rows


def _run_record() -> dict[str, Any]:
    return {"record": "run", "run_id": "r", "command": "fewstep bench", "reference": "ref",
            "environment": {"date_utc": "2026-01-01T00:00:00Z", "gpus_start": None},
            "roofline": None}


def test_comparisons_and_loses_lines() -> None:
    comps = report.comparisons(_synthetic_rows())
    lost = [c for c in comps if c.loses]
    assert [(c.steps, c.batch, c.baseline) for c in lost] == [
        (4, 1, "torch-compile reduce-overhead fp16")]
    assert lost[0].ratio == pytest.approx(10.0 / 8.0)
    eager = [c for c in comps if c.baseline == "torch-eager fp16" and c.steps == 4
             and c.batch == 4]
    assert eager[0].ratio == pytest.approx(40.0 / 480.0) and not eager[0].loses
    lines = report.target_lines(_synthetic_rows())
    assert any("MISSED by 2.08x" in line for line in lines)  # 10/8 = 1.25 vs 0.6
    assert any("torch-eager fp16" in line and "met" in line for line in lines)


def test_report_and_plots_are_written(tmp_path: Path) -> None:
    rows = _synthetic_rows()
    run = _run_record()
    results = report.write_results(tmp_path / report.RESULTS, run,
                                   [*rows, _row("x", "fewstep", "fewstep", 1, 1, float("inf"))])
    back_run, back_rows = report.read_results(results)
    assert back_run["run_id"] == "r" and len(back_rows) == len(rows) + 1
    assert back_rows[-1]["p50_ms"] is None  # inf is not JSON: written as null
    files = report.write_report(tmp_path, run, rows)
    text = (tmp_path / report.REPORT).read_text()
    assert "fewstep loses at steps=4, batch=1: torch-compile reduce-overhead fp16 8.000 ms " \
           "vs fewstep's best (fewstep ort-cuda sampler fp16) 10.000 ms, 1.25x slower" in text
    assert text.count("fewstep loses at") == 1
    assert "| fewstep ort-cuda sampler fp16 | 2.5 | n/a | 10 | 45.0 / 2 |" in text
    assert "| torch-eager fp16 | 30 |  | 120 | 45.0 / 2 |" in text
    assert "fewstep tensorrt: unavailable: TensorRT is missing" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
        return
    for png in (report.PLOT_STEPS, report.PLOT_BATCH):
        assert (tmp_path / png) in files
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = report.summary_table(rows)
    assert summary.splitlines()[0].split()[1:3] == ["s4/b1", "s4/b4"]
    assert "fewstep loses at steps=4, batch=1" in summary


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    files = report.write_report(tmp_path, _run_record(), _synthetic_rows())
    assert files == [tmp_path / report.REPORT]
    assert "matplotlib is not installed" in (tmp_path / report.REPORT).read_text()


def test_report_keeps_the_jetson_line_when_a_tool_gave_nothing() -> None:
    board = {"model": "NVIDIA Jetson Orin Nano Developer Kit", "l4t_release": "36.4.3",
             "power_mode": "15W (0)", "clocks": "pinned to maximum (jetson_clocks on)"}
    run = _run_record()
    run["environment"]["jetson"] = board
    text = report.render_markdown(run, _synthetic_rows())
    assert ("| Jetson | NVIDIA Jetson Orin Nano Developer Kit, L4T 36.4.3, nvpmodel 15W (0), "
            "clocks pinned to maximum (jetson_clocks on) |") in text
    # jetson_clocks --show without root, nvpmodel missing, release file unreadable
    run["environment"]["jetson"] = {**board, "clocks": None, "power_mode": None,
                                    "l4t_release": ""}
    text = report.render_markdown(run, _synthetic_rows())
    assert ("| Jetson | NVIDIA Jetson Orin Nano Developer Kit, L4T ?, nvpmodel unknown, "
            "clocks unknown |") in text
    assert "Jetson" not in report.render_markdown(_run_record(), _synthetic_rows())


# ---------------------------------------------------------------------------------
# The runner on fake paths (no model): statuses, budget, errors
# ---------------------------------------------------------------------------------


class FakePath(BenchPath):
    def __init__(self, name: str, meta: Any, fail: bool = False, only_steps: int = 0) -> None:
        self.name, self.meta, self.fail, self.only_steps = name, meta, fail, only_steps
        self.loads = 0

    def supports(self, steps: int, batch: int) -> str | None:
        return None if not self.only_steps or steps == self.only_steps else "no graph"

    def load(self, steps: int, batch: int) -> float | None:
        self.loads += 1
        return 0.001 if self.loads == 1 else None

    def call(self, steps: int, batch: int) -> Any:
        c, h, w = self.meta.image_shape
        if self.fail:
            raise RuntimeError("boom\nsecond line")
        return lambda i: np.full((batch, h, w, c), 7, np.uint8)

    def network(self, steps: int, batch: int) -> Any:
        return (lambda i: None), "nothing"


def test_runner_statuses_and_budget() -> None:
    meta = oo.make_meta("epsilon", num_classes=2)
    work = Workload(meta, "trailing", None)
    rows: list[dict[str, Any]] = []
    cfg = SuiteConfig(models=(), steps=(1, 4), batches=(1, 2),
                      timing=TimingConfig(warmup=1, iters=3, target_seconds=0.001))
    good, bad, sampler = FakePath("good", meta), FakePath("bad", meta, fail=True), FakePath(
        "sampler", meta, only_steps=4)
    Runner(cfg, "r", probes.Cuda(probe=False), rows.append, log=lambda s: None).run(
        [(good, work), (bad, work), (sampler, work)])
    assert all(set(r) == set(latency.ROW_FIELDS) for r in rows)
    by = {(r["name"], r["steps"], r["batch"]): r for r in rows}
    assert len(by) == 12
    assert all(by[("good", s, b)]["status"] == "ok" for s in (1, 4) for b in (1, 2))
    first = by[("good", 4, 1)]  # the first job: 4 steps at batch 1
    assert first["cold_start_fresh"] and first["load_ms"] == pytest.approx(1.0)
    assert not by[("good", 1, 1)]["cold_start_fresh"]
    assert first["iterations"] >= 3 and first["clock"] == "perf_counter"
    assert first["network_method"] == "nothing" and first["network_ms"] is not None
    assert by[("bad", 1, 2)]["status"] == "error"
    assert by[("bad", 1, 2)]["reason"] == "RuntimeError: boom"
    assert by[("sampler", 1, 1)]["status"] == "n/a"
    assert by[("sampler", 4, 2)]["status"] == "ok"
    assert first["psnr_db"] is None and first["parity_ref"].startswith("none")

    rows.clear()
    tight = SuiteConfig(models=(), steps=(1,), batches=(1,), time_budget_s=1e-9,
                        timing=TimingConfig(warmup=1, iters=3, target_seconds=0.001))
    Runner(tight, "r", probes.Cuda(probe=False), rows.append, log=lambda s: None).run(
        [(FakePath("late", meta), work)])
    assert rows[0]["status"] == "skipped" and "time budget" in rows[0]["reason"]


def test_new_row_rejects_unknown_fields() -> None:
    assert set(new_row()) == set(latency.ROW_FIELDS)
    with pytest.raises(AssertionError):
        new_row(p50=1.0)


# ---------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------


def test_quick_bench_on_the_tiny_model(tiny_artifact: Path, tiny_checkpoint: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench"
    code = cli.main([
        "--quick", "--model", str(tiny_artifact), "--checkpoint", str(tiny_checkpoint),
        "--backends", "ort-cpu", "ort-cuda", "--graphs", "denoiser", "step", "sampler",
        "--steps", "1", "2", "--batch", "1", "2",
        "--baselines", "torch-eager", "torch-compile", "ort-steps",
        "--warmup", "1", "--iters", "2", "--target-seconds", "0.01", "--time-budget", "600",
        "--torch-threads", "1",
        "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = (out / report.RESULTS).read_text().splitlines()
    run = json.loads(lines[0])
    rows = [json.loads(line) for line in lines[1:]]
    assert run["record"] == "run" and all(r["run_id"] == run["run_id"] for r in rows)
    assert run["environment"]["onnxruntime"]["version"]

    def get(name: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["name"] == name]

    expected_ok = ["fewstep ort-cpu denoiser fp32", "fewstep ort-cpu step fp32",
                   "ort-steps cpu fp32", "torch-eager fp32"]
    for name in expected_ok:
        got = get(name)
        assert sorted((r["steps"], r["batch"]) for r in got) == [(1, 1), (1, 2), (2, 1), (2, 2)]
        assert all(r["status"] == "ok" for r in got), [r["reason"] for r in got]
    sampler = {(r["steps"], r["batch"]): r for r in get("fewstep ort-cpu sampler fp32")}
    assert sampler[(1, 1)]["status"] == "n/a" and "no sampler graph for 1 steps" in sampler[
        (1, 1)]["reason"]
    assert sampler[(2, 1)]["status"] == sampler[(2, 2)]["status"] == "ok"
    measured = [r for r in rows if r["status"] == "ok"]
    assert len(measured) == 4 * 4 + 2
    for r in measured:
        for key in ("p50_ms", "p90_ms", "p99_ms", "per_step_ms", "images_per_s", "cold_start_ms",
                    "first_call_ms", "noise_ms", "host_rss_mb"):
            assert r[key] is not None and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["iterations"] >= 2 and r["clock"] == "perf_counter"
        assert r["network_ms"] is not None and r["network_method"]
        assert r["psnr_db"] > 40, (r["name"], r["steps"], r["batch"], r["psnr_db"])
        assert r["max_abs_err"] <= 2
        assert r["flops_per_step"] > 0 and r["floor_fraction"] is not None
    reason = backends.availability()["ort-cuda"]
    if reason is not None:
        cuda_rows = [r for r in rows if r["backend"] == "ort-cuda"]
        assert sorted(r["name"] for r in cuda_rows) == ["fewstep ort-cuda", "ort-steps cuda fp32"]
        assert all(r["status"] == "unavailable" and r["reason"] == reason for r in cuda_rows)
        compile_rows = get("torch-compile reduce-overhead fp32")
        assert [r["status"] for r in compile_rows] == ["unavailable"]
        assert "needs a CUDA GPU" in compile_rows[0]["reason"]
    text = (out / report.REPORT).read_text()
    assert "fewstep ort-cpu step fp32" in text and "## Roofline" in text
    assert "fewstep ort-cuda: unavailable" in text
    assert "s2/b1" in captured.out or "s1/b1" in captured.out
    # --render re-draws the report from results.jsonl alone
    (out / report.REPORT).unlink()
    assert cli.main(["--render", str(out)]) == 0
    assert (out / report.REPORT).read_text() == text


# ---------------------------------------------------------------------------------
# Usage errors: exit 2, one line, no traceback
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "--batch 0 must be a whole number >= 1"),
        (["--steps", "4", "-2"], "--steps -2 must be a whole number >= 1"),
        (["--backends", "ort-gpu"], "--backends 'ort-gpu' is unknown; use one or more of"),
        (["--graphs", "unet"], "--graphs 'unet' is unknown"),
        (["--baselines", "diffusers"], "--baselines 'diffusers' is unknown"),
        (["--model", "{tmp}/missing.onnx"], "missing.onnx' does not exist"),
        (["--checkpoint", "{tmp}/missing.pt"], "missing.pt' does not exist"),
        (["--guidance", "lots"], "--guidance 'lots' is not a number"),
        (["--steps", "5000"], "--steps 5000 exceeds num_train_timesteps=1000"),
        (["--render", "{tmp}"], "does not exist; pass the --out folder of a bench run"),
        (["--cuda-options", "fuse_conv_bias"], "--cuda-options: fuse_conv_bias is not KEY=VALUE"),
        (["--cuda-options", "a=1,=2"], "--cuda-options: =2 is not KEY=VALUE"),
    ],
)
def test_cli_bad_arguments(args: list[str], message: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "o" / report.RESULTS).exists()


def test_cuda_options_add_tagged_ort_cuda_rows(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--cuda-options K=V (repeatable) times every ort-cuda graph once more with those CUDA
    EP options, each its own row named with them; other backends are untouched."""
    from fewstep.benchmarks.paths import FewstepPath, open_models

    meta = oo.make_meta(num_classes=2)
    (tmp_path / "a").mkdir()
    art = oo.write_artifact(tmp_path / "a", meta, oo.pixel_x0(meta))
    cfg = cli.config_from_args(cli.build_parser("fewstep bench").parse_args(
        ["--model", str(art), "--backends", "ort-cpu", "ort-cuda", "--graphs", "step",
         "--baselines", "--cuda-options", "fuse_conv_bias=1",
         "--cuda-options", "prefer_nhwc=1,cudnn_conv_algo_search=HEURISTIC",
         "--out", str(tmp_path / "o")]))
    assert cfg.cuda_options == ((("fuse_conv_bias", "1"),),
                                (("prefer_nhwc", "1"), ("cudnn_conv_algo_search", "HEURISTIC")))
    monkeypatch.setattr(backends, "availability", lambda: {"ort-cpu": None, "ort-cuda": None})
    models = open_models([art])
    work = Workload(meta, "trailing", None)
    src = type("Src", (), {"cuda": False, "scheduler": None})()
    built = [p for p, _ in cli.build_paths(cfg, models, work, src)]
    fewstep = [p for p in built if isinstance(p, FewstepPath)]
    assert [p.name for p in fewstep] == [
        "fewstep ort-cpu step fp32",
        "fewstep ort-cuda step fp32",
        "fewstep ort-cuda step fp32 {fuse_conv_bias=1}",
        "fewstep ort-cuda step fp32 {prefer_nhwc=1,cudnn_conv_algo_search=HEURISTIC}",
    ]
    assert [p.options for p in fewstep] == [
        {}, {},
        {"cuda_options": {"fuse_conv_bias": "1"}},
        {"cuda_options": {"prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"}},
    ]


def test_models_of_another_source_are_refused_and_precisions_label_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.benchmarks.paths import open_models

    meta = oo.make_meta(num_classes=2)
    x0 = oo.pixel_x0(meta)
    for name in "abho":
        (tmp_path / name).mkdir()
    a = oo.write_artifact(tmp_path / "a", meta, x0)
    b = oo.write_artifact(tmp_path / "b", meta, x0)
    half = oo.write_artifact(tmp_path / "h", meta.for_graph(precision="fp16"), x0)
    other = oo.write_artifact(tmp_path / "o", oo.make_meta(num_classes=2,
                                                           source_hash="sha256:other"), x0)
    models = open_models([a, b, half])
    assert [m.label for m in models] == ["fp32 [model]", "fp32 [model]", "fp16"]
    assert [p.name for p, _ in models[0].graphs("step", ".onnx")] == ["model.step.onnx"]
    code = cli.main(["--model", str(a), "--model", str(other), "--baselines",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is another model than" in err and "source_hash ('sha256:other'" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
