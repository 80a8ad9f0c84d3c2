"""benchmarks/first_image.py: a real CPU run of the time-to-first-image levers.

Fresh processes of ``fewstep sample`` on the shipped model with ``--backend ort-cpu``
(the levers that exist on the CPU: the optimised-graph cache and the optimisation
level), then the files it writes: one row per lever with positive times, the kept /
reverted column as the stated rule gives it from the numbers, and the bench figures
read from a ``fewstep bench`` results file. Usage errors are one line, exit code 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fewstep.benchmarks import first_image as fi

MODULE = [sys.executable, "-m", "fewstep.benchmarks.first_image"]
COMPILE_FIRST_CALL_MS = 81234.5  # what the bench file below says; the report must show it


def bench_folder(folder: Path) -> Path:
    folder.mkdir()
    rows = [
        {"record": "run", "run_id": "x"},
        {"record": "result", "name": "torch-compile reduce-overhead fp16", "path": "torch-compile",
         "family": "torch-compile", "graph": None, "status": "ok", "steps": 4, "batch": 1,
         "load_ms": 60.5, "first_call_ms": COMPILE_FIRST_CALL_MS, "cold_start_ms": 81295.0,
         "p50_ms": 2.6},
        {"record": "result", "name": "torch-compile reduce-overhead fp16", "path": "torch-compile",
         "family": "torch-compile", "status": "skipped", "steps": 8, "batch": 1},
        {"record": "result", "name": "fewstep ort-cuda sampler fp32", "path": "fewstep",
         "family": "fewstep", "graph": "sampler", "status": "ok", "steps": 4, "batch": 1,
         "load_ms": 427.0, "first_call_ms": 2559.6, "cold_start_ms": 2986.6, "p50_ms": 4.1},
    ]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("first-image")
    out = tmp / "out"
    proc = subprocess.run(
        [*MODULE, "--out", str(out), "--backend", "ort-cpu", "--repeats", "1", "--levers",
         "cache", "level-basic", "sampler-main", "--steady", "2",
         "--bench", str(bench_folder(tmp / "bench"))],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "first_image.jsonl").read_text().splitlines()]
    return {"out": out, "stdout": proc.stdout, "records": records,
            "md": (out / "first_image.md").read_text()}


def rows_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["lever"]: r for r in run["records"] if r["record"] == "row"}


def test_one_row_per_lever_with_positive_times(run: dict[str, Any]) -> None:
    assert run["records"][0]["record"] == "environment"
    assert run["records"][0]["onnxruntime"]["version"]
    rows = rows_of(run)
    assert set(rows) == {"baseline", "cache", "level-basic", "sampler-main", "fewstep-cli",
                         "fewstep-cli-default", "cache-write"}
    for name in ("baseline", "cache", "level-basic", "sampler-main", "cache-write"):
        r = rows[name]
        assert r["ok"] == r["runs"] == 1 and "error" not in r, r
        for f in ("png_s", "interpreter_s", "import_runtime_s", "import_sample_s", "load_s",
                  "first_generate_s", "second_generate_s", "steady_s"):
            assert r[f] > 0, (name, f)
        assert r["load_first_s"] == pytest.approx(r["load_s"] + r["first_generate_s"])
        assert r["png_s"] > r["load_first_s"]  # the PNG comes after load and generate
        assert r["path"] == "sampler"
    for name in ("fewstep-cli", "fewstep-cli-default"):
        assert rows[name]["ok"] == 1 and rows[name]["png_s"] > 0
        assert rows[name]["exit_s"] >= rows[name]["png_s"]
    # The cache row read what the unrecorded run wrote; the level row ran at its level.
    assert {g["optimized_cache"] for g in rows["cache"]["graphs"]} == {"hit"}
    assert {g["optimized_cache"] for g in rows["cache-write"]["graphs"]} == {"written"}
    assert {g["graph_optimization_level"] for g in rows["level-basic"]["graphs"]} == {"basic"}
    assert rows["cache"]["image_diff"] == 0  # the cached graph gives the same image
    # sampler-main opened the sampler alone; the baseline also opened the denoiser.
    assert len(rows["baseline"]["graphs"]) == 2 and len(rows["sampler-main"]["graphs"]) == 1
    assert rows["sampler-main"]["graphs"][0]["path"].endswith(".sampler-4.onnx")
    assert rows["sampler-main"]["image_diff"] == 0
    processes = [r for r in run["records"] if r["record"] == "process"]
    assert [p["lever"] for p in processes if not p["counted"]] == ["warm-up", "cache-write"]
    assert sorted(p.name for p in (run["out"] / "images").iterdir()) == [
        "baseline-0.png", "cache-0.png", "cache-write.png", "fewstep-cli-0.png",
        "fewstep-cli-default-0.png", "level-basic-0.png", "sampler-main-0.png", "warmup.png"]


def _md_rows(md: str) -> dict[str, list[str]]:
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    out = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header):
            out[cells[0]] = cells
    assert "kept/reverted" in header and "load+first" in header
    return {k: dict(zip(header, v, strict=True)) for k, v in out.items()}  # type: ignore[misc]


def test_kept_or_reverted_follows_the_numbers(run: dict[str, Any]) -> None:
    rows = rows_of(run)
    md = _md_rows(run["md"])
    base = rows["baseline"]
    assert md["baseline"]["kept/reverted"] == "-"
    for name in ("cache", "level-basic", "sampler-main"):
        r = rows[name]
        assert md[name]["load+first"] == f"{r['load_first_s']:.3f}"
        assert md[name]["steady ms"] == f"{r['steady_s'] * 1e3:.2f}"
        gain = 1 - r["load_first_s"] / base["load_first_s"]
        want = ("kept" if gain >= 0.05 and r["steady_s"] <= 1.10 * base["steady_s"]
                and r["image_diff"] <= 2 else "reverted")
        assert md[name]["kept/reverted"] == want == r["verdict"], (name, gain)
        assert f"load+first {-gain * 100:+.1f} %" in md[name]["vs baseline"]
    for name in ("fewstep-cli", "fewstep-cli-default", "cache-write"):
        assert md[name]["kept/reverted"] == "-"
    last = run["stdout"].strip().splitlines()
    assert last[0].split()[0] == "lever" and {ln.split()[0] for ln in last[1:]} == set(rows)


def test_bench_figures_beside_the_measurements(run: dict[str, Any]) -> None:
    assert f"| torch-compile reduce-overhead fp16 | 60.5 | {COMPILE_FIRST_CALL_MS:.1f} |" in \
        run["md"]
    bench = [r for r in run["records"] if r["record"] == "bench"]
    assert [b["name"] for b in bench] == ["torch-compile reduce-overhead fp16",
                                         "fewstep ort-cuda sampler fp32"]
    imports = next(r for r in run["records"] if r["record"] == "imports")
    assert imports["total_ms"] > 0 and imports["cumulative_ms"]["fewstep.runtime.cli_sample"] > 0
    assert "## Import cost of `fewstep sample`" in run["md"]


@pytest.mark.parametrize(("change", "want"), [
    ({}, "kept"),
    ({"load_first_s": 0.97}, "reverted"),             # only 3 % faster
    ({"steady_s": 0.0112}, "reverted"),               # 12 % slower images
    ({"image_diff": 3}, "reverted"),                  # other images
    ({"load_first_s": None}, "reverted"),             # nothing measured
])
def test_verdict_rule(change: dict[str, Any], want: str) -> None:
    base = {"lever": "baseline", "load_first_s": 1.0, "steady_s": 0.010}
    row = {"lever": "x", "load_first_s": 0.90, "steady_s": 0.0105, "image_diff": 0, **change}
    assert fi.verdict(row, base)[0] == want
    # a `fewstep sample` default (one generate a process): the same rule without the
    # steady state
    one_shot = "kept in fewstep sample" if want == "kept" or "steady_s" in change else want
    assert fi.verdict(row, base, one_shot=True)[0] == one_shot


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    (["--backend", "ort-cpu", "--levers", "heuristic"],
     "--levers heuristic is a CUDA EP lever; pass --backend ort-cuda or leave it out"),
    (["--backend", "ort-cpu", "--bench", "/nonexistent/bench"],
     "--bench '/nonexistent/bench' has no results.jsonl"),
    (["--backend", "ort-cpu", "--repeats", "0"], "argument --repeats: 0 must be at least 1"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run([*MODULE, "--out", str(tmp_path / "o"), *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_a_bench_file_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text('{"record": "run"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        fi.bench_figures(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"record": "result", "status": "ok"}\n')
    with pytest.raises(ValueError, match="no ok 4-step batch-1 torch-compile"):
        fi.bench_figures(tmp_path)
