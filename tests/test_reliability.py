"""Nothing half-written, concurrent use is safe, memory stays bounded.

Processes are killed (SIGTERM, SIGKILL) in the middle of an export and of training
with a checkpoint written every step; the previous files must survive intact, and no
temporary may outlive the next write.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fewstep.runtime import fileio

CLI = [sys.executable, "-m", "fewstep.runtime.cli"]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(fileio.TMP_MARK)]


def wait_for(predicate, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert temporaries(tmp_path) == []
    fileio.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and temporaries(tmp_path) == []


WRITER = """
import sys, time
from fewstep.runtime import fileio
with fileio.atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        for _ in range(1000):
            f.write(b"x" * 65536); f.flush()
            print("writing", flush=True)
            time.sleep(0.01)
"""


def test_sigkill_mid_write_leaves_old_file_and_the_next_write_cleans_up(tmp_path: Path
                                                                        ) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"previous")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for _ in range(5):
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert target.read_bytes() == b"previous"
    assert len(temporaries(tmp_path)) == 1  # what SIGKILL leaves behind...
    fileio.write_bytes(target, b"next")  # ...is removed by the next write
    assert target.read_bytes() == b"next" and temporaries(tmp_path) == []


def test_a_live_writers_temporary_is_not_removed(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"in progress")
        # Another writer of the same file starts meanwhile: it must not delete ours.
        fileio.write_bytes(target, b"other")
        assert tmp.exists()
    assert target.read_bytes() == b"in progress"


# ---------------------------------------------------------------------------------
# Export killed midway
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_export_killed_midway(sig: int, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous model")
    proc = subprocess.Popen(
        [*CLI, "export", str(tiny_checkpoint), "--out", str(out), "--fused", "sampler",
         "--steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the export is writing into its staging folder, then stop it.
    wait_for(lambda: any(p.is_dir() for p in temporaries(tmp_path)) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["m.onnx"]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        stale = temporaries(tmp_path)
        assert stale  # the killed process could not clean up; the next export does:
        with fileio.staging_dir(tmp_path, "export-m"):
            pass
    else:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------
# Training killed while it writes a checkpoint every step
# ---------------------------------------------------------------------------------


def test_training_sigkill_then_resume(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from fewstep.train import checkpoint as ckpt_io

    run = tmp_path / "run"
    args = [*CLI, "train", "--preset", "tiny", "--image-size", "16", "--batch-size", "2",
            "--steps", "40", "--checkpoint-every", "1", "--sample-every", "1000",
            "--sample-steps", "1", "--log-every", "1", "--no-progress", "--out", str(run)]
    rng = np.random.default_rng(int(time.time()))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = run / "checkpoint.pt"
    wait_for(lambda: ckpt.exists() or proc.poll() is not None)
    time.sleep(float(rng.uniform(0.2, 1.5)))
    proc.kill()
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("training finished before it could be killed (machine too fast)")
    saved = ckpt_io.load(ckpt)  # never a partial file
    assert 1 <= saved.step < 40
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = ckpt_io.load(ckpt)
    assert final.step == 40
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the lost tail was dropped, then re-run once
    assert temporaries(run) == []


# ---------------------------------------------------------------------------------
# Concurrency and memory
# ---------------------------------------------------------------------------------


def test_eight_threads_two_hundred_batches_equal_serial(tiny_artifact: Path) -> None:
    from fewstep.runtime import Pipeline

    pipe = Pipeline.load(tiny_artifact, backend="ort-cpu")
    jobs = list(range(200))
    serial = {seed: pipe.generate(2, 2, seed=seed, labels=[seed % 6, (seed + 1) % 6])
              for seed in jobs}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(mine: list[int]) -> None:
        try:
            for seed in mine:
                img = pipe.generate(2, 2, seed=seed, labels=[seed % 6, (seed + 1) % 6])
                with lock:
                    results[seed] = img
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == jobs
    for seed in jobs:
        np.testing.assert_array_equal(results[seed], serial[seed])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (before the threaded run {before:.0f} MiB)")
    assert peak - before < 64, (before, peak)


def test_soak_memory_is_bounded(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, "-m", "fewstep.benchmarks.soak", "--model", str(tiny_artifact),
         "--generations", "600", "--warmup", "100", "--sample-every", "100", "--steps", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["passed"] and result["generations"] == 600
    assert result["rss_growth_mib"] < 16
    assert len(result["rss_series"]) == 6


def test_soak_fails_when_memory_grows(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    from fewstep.benchmarks import soak

    hoard: list[bytes] = []
    real = soak.rss_mib

    def leaky() -> float:
        # 40 MiB more per sample: above glibc's largest mmap threshold (32 MiB), so it is
        # fresh memory, and written (ones), so it is resident.
        hoard.append(np.ones(40 << 20, dtype=np.uint8))
        return real()

    monkeypatch.setattr(soak, "rss_mib", leaky)
    result = soak.soak(str(tiny_artifact), 60, 1, 1, "ort-cpu", 10, 10, 8.0, progress=False)
    assert not result["passed"] and result["rss_growth_mib"] > 8



def test_training_sigterm_saves_after_the_current_step(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from fewstep.train import checkpoint as ckpt_io

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "train", "--preset", "tiny", "--image-size", "16", "--batch-size", "2",
         "--steps", "100000", "--checkpoint-every", "100000", "--log-every", "1",
         "--no-progress", "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
             or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)  # what a cluster sends before preempting a job
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "SIGTERM: saving after this step" in err and "Traceback" not in err
    saved = ckpt_io.load(run / "checkpoint.pt")  # saved although no checkpoint was due
    assert 3 <= saved.step < 100000
    assert temporaries(run) == []
