"""train/distributed.py + fit.py under DDP: 2 gloo processes on the CPU, tiny preset.

One ``torch.multiprocessing.spawn`` of two ranks runs every multi-process case in turn
(the process group is joined once); the one-process runs they are compared with run in
the test process. Then the CLI path: ``fewstep train --gpus 2 --device cpu`` (torchrun
in-process), and the ways a multi-process run must fail instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mp = pytest.importorskip("torch.multiprocessing")

from conftest import quiet_options, tiny_config  # noqa: E402

from fewstep.train import checkpoint as ckpt_io  # noqa: E402
from fewstep.train import cli as train_cli  # noqa: E402
from fewstep.train import distributed  # noqa: E402
from fewstep.train.data import open_source  # noqa: E402
from fewstep.train.fit import (  # noqa: E402
    CHECKPOINT,
    METRICS,
    TrainConfig,
    Trainer,
    _StepBatches,
    global_batch,
    sample_draws,
    train,
)
from fewstep.train.loop import cpu_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
B = 2  # images per process and micro-batch in the 2-process runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state_hash(module: torch.nn.Module) -> str:
    return ckpt_io.weights_hash(cpu_state(module))


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()])


def first_grads(config: Any, options: Any) -> tuple[torch.Tensor, float, Trainer]:
    """The gradient of step 0 (after the DDP all-reduce), as the loop computes it."""
    trainer = Trainer(config, options)
    model, _, _, start = trainer._fresh()
    batches = trainer._loader(start)
    loss = trainer._accumulate(trainer._wrap(model), batches, 0)
    return flat_grads(model), float(loss), trainer


def losses(folder: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (folder / METRICS).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def sample_hash(image: np.ndarray, label: int, t: int, dropped: bool, eps: np.ndarray) -> str:
    """One training sample as the loss sees it: image bytes, label, t, label dropout, eps."""
    h = hashlib.sha1(np.ascontiguousarray(image, np.uint8).tobytes())
    h.update(np.ascontiguousarray(eps, np.float32).tobytes())
    h.update(f"{int(label)},{int(t)},{int(bool(dropped))}".encode())
    return h.hexdigest()


def record_consumed(trainer: Trainer) -> list[list[str]]:
    """Wrap ``trainer``'s data loader: the list fills, in order, with one list of sample
    hashes per micro-batch that the training loop takes (what it really consumed, not
    what the sampler says it should)."""
    taken: list[list[str]] = []
    make = trainer._loader

    def loader(start: int) -> Iterator[Any]:
        for batch in make(start):
            images, labels, t, drop, eps = batch
            taken.append([sample_hash(images[j].numpy(), int(labels[j]), int(t[j]),
                                      bool(drop[j]), eps[j].numpy())
                          for j in range(len(images))])
            yield batch

    trainer._loader = loader  # type: ignore[method-assign]
    return taken


def one_process_reads(config: TrainConfig, count: int) -> list[str]:
    """Hashes of global samples 0..count-1 straight from the data source and the per-sample
    draws: what one process reads (step k takes samples k*G .. (k+1)*G - 1)."""
    source = open_source(config.data, config.image_size, config.seed)
    shape = (3, source.size, source.size)
    out = []
    for i in range(count):
        image, label = source.image(i)
        t, u, eps = sample_draws(config.seed, i, config.num_train_timesteps, shape)
        out.append(sample_hash(image, label, t, u < config.cfg_dropout, eps))
    return out


def assert_ranks_split_what_one_process_reads(taken: list[list[list[str]]],
                                              config: TrainConfig) -> None:
    """``taken[rank]``: the micro-batches rank took (``record_consumed``) in a run of
    ``config`` on len(taken) processes. They share no sample, and step by step they
    together took exactly the samples one process takes."""
    world, acc = len(taken), config.grad_accum
    g = global_batch(config, world)
    want = one_process_reads(config, config.steps * g)
    assert len(set(want)) == len(want), "two global samples look the same: weak check"
    index = {h: i for i, h in enumerate(want)}  # -1: no sample one process would read
    ranks = [[[index.get(h, -1) for h in micro] for micro in micros] for micros in taken]
    for r, micros in enumerate(ranks):
        assert len(micros) == config.steps * acc, f"rank {r} took {len(micros)} micro-batches"
        assert all(len(m) == config.batch_size for m in micros), (r, micros)
    sets = [{i for m in micros for i in m} for micros in ranks]
    assert -1 not in set.union(*sets), f"samples one process never reads: {ranks}"
    for r in range(world):
        for q in range(r + 1, world):
            assert not sets[r] & sets[q], f"ranks {r} and {q} both read {sets[r] & sets[q]}"
    for k in range(config.steps):
        step = sorted(i for micros in ranks for m in micros[k * acc:(k + 1) * acc] for i in m)
        assert step == list(range(k * g, (k + 1) * g)), f"step {k}: {step}"


def write_image_folder(root: Path) -> Path:
    """Two class folders of small PNGs (sizes differ: the loader resizes and crops)."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for k, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for j in range(3):
            h, w = 16 + 4 * j, 20 + 2 * k
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j}.png")
    return root


def folder_config(root: Path) -> TrainConfig:
    """6 images, 8 samples per step, 3 steps: 4 epochs, each a fresh permutation."""
    return tiny_config(data=str(root / "images"), steps=3, batch_size=B, grad_accum=2,
                       cfg_dropout=0.3)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One intra-op thread, like each worker: OpenMP threads spin badly on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------
# The sample-index maths (no processes)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "acc"), [(2, 1), (2, 3), (3, 2)])
def test_ranks_share_no_sample_and_cover_what_one_process_would(world: int, acc: int) -> None:
    config = tiny_config(steps=5, batch_size=B, grad_accum=acc)
    per_rank = [list(_StepBatches(config, 1, r, world)) for r in range(world)]
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat)), "a sample index appears on two ranks"
    g = global_batch(config, world)
    assert sorted(flat) == list(range(1 * g, 5 * g))
    # Step by step, the ranks together take the indices one process with batch G takes.
    one = tiny_config(steps=5, batch_size=g, grad_accum=1)
    for k, batch in enumerate(_StepBatches(one, 1, 0, 1)):
        step_set = {i for r in range(world) for batch_r in per_rank[r][k * acc:(k + 1) * acc]
                    for i in batch_r}
        assert step_set == set(batch), k
    # Resuming at a recorded sample counter continues the same stream.
    resumed = list(_StepBatches(config, 3, 0, world, first=3 * g))
    assert resumed == per_rank[0][2 * acc:]


def test_per_sample_draws_depend_on_seed_and_index_only() -> None:
    a = sample_draws(0, 12345, 1000, (3, 4, 4))
    b = sample_draws(0, 12345, 1000, (3, 4, 4))
    c = sample_draws(0, 12346, 1000, (3, 4, 4))
    assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2])
    assert 0 <= a[0] < 1000 and 0 <= a[1] < 1


# ---------------------------------------------------------------------------------
# Two gloo processes
# ---------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    root = Path(tmp)
    launch = distributed.from_env()
    assert launch is not None
    with distributed.process_group(launch, torch.device("cpu"), timeout=120) as comm:
        report: dict[str, Any] = {"rank": rank}

        def opts(out: Path, **kw: Any) -> Any:
            return quiet_options(out, rank=rank, world_size=world, log_every=1, **kw)

        # 1. Gradients of step 0: B per process x 2 micro-batches (no_sync on the first).
        grads, loss, _ = first_grads(tiny_config(steps=1, batch_size=B, grad_accum=2),
                                     opts(root / "grads"))
        report["loss0"] = comm.mean(loss)
        torch.save(grads, root / f"grads_{rank}.pt")

        # 2. A fresh run; every rank reports what it holds.
        config = tiny_config(steps=4, batch_size=B, grad_accum=2, cfg_dropout=0.3)
        trainer = Trainer(config, opts(root / "fresh"))
        report["fresh_taken"] = record_consumed(trainer)
        trainer.run()
        report["fresh"] = [state_hash(trainer.model), state_hash(trainer.ema)]

        # 3. The same run stopped after step 2 and resumed on the same 2 processes.
        train(config, opts(root / "stopped", stop_after=2))
        trainer = Trainer(config, opts(root / "stopped", resume=True))
        trainer.run()
        report["resumed"] = [state_hash(trainer.model), state_hash(trainer.ema)]

        # 4. A one-process checkpoint (batch 2B x 2, made by the test) resumed here.
        trainer = Trainer(tiny_config(steps=4, batch_size=B, grad_accum=2, cfg_dropout=0.3),
                          opts(root / "from_one", resume=True))
        trainer.run()
        report["from_one"] = [state_hash(trainer.model), state_hash(trainer.ema)]

        # 5. An image folder (two classes) shared by the ranks; what each rank consumed.
        trainer = Trainer(folder_config(root), opts(root / "folder"))
        report["folder_taken"] = record_consumed(trainer)
        trainer.run()
        (root / f"report_{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run ``_worker`` on 2 gloo ranks once; the folder holds what they left."""
    root = tmp_path_factory.mktemp("ddp")
    one = tiny_config(steps=4, batch_size=2 * B, grad_accum=2, cfg_dropout=0.3)
    train(one, quiet_options(root / "from_one", log_every=1, stop_after=2))
    write_image_folder(root / "images")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


def reports(root: Path) -> list[dict[str, Any]]:
    return [json.loads((root / f"report_{r}.json").read_text()) for r in range(2)]


def test_two_processes_compute_the_gradient_of_one_with_the_global_batch(
        two_ranks: Path, tmp_path: Path) -> None:
    g0, g1 = (torch.load(two_ranks / f"grads_{r}.pt") for r in range(2))
    assert torch.equal(g0, g1), "ranks disagree after the all-reduce"
    # One process, batch 4B in one micro-batch: the same global sample indices 0..4B-1.
    one, loss, _ = first_grads(tiny_config(steps=1, batch_size=4 * B, grad_accum=1),
                               quiet_options(tmp_path))
    assert one.abs().max() > 0
    torch.testing.assert_close(g0, one, rtol=1e-4, atol=1e-6)
    assert reports(two_ranks)[0]["loss0"] == pytest.approx(loss, rel=1e-5)


def test_rank0_checkpoint_holds_what_every_rank_holds(two_ranks: Path) -> None:
    r0, r1 = reports(two_ranks)
    assert r0["fresh"] == r1["fresh"], "weights or EMA differ between the ranks"
    ck = ckpt_io.load(two_ranks / "fresh" / CHECKPOINT)
    assert [ckpt_io.weights_hash(ck.model), ckpt_io.weights_hash(ck.ema)] == r0["fresh"]
    assert ck.meta.source_hash == r0["fresh"][1]
    assert ck.step == 4
    assert ck.extra == {"world_size": 2, "global_batch": 4 * B, "samples": 4 * 4 * B}
    assert ck.meta.train_config["world_size"] == 2
    curve = losses(two_ranks / "fresh")
    assert sorted(curve) == [1, 2, 3, 4] and all(np.isfinite(list(curve.values())))
    assert (two_ranks / "fresh" / "samples" / "step_0000004.png").is_file()
    assert not list((two_ranks / "fresh").glob(".fewstep-tmp-*"))


def test_ranks_read_disjoint_samples_in_the_run(two_ranks: Path) -> None:
    """What the loop of each rank consumed (recorded in the run, not recomputed)."""
    taken = [r["fresh_taken"] for r in reports(two_ranks)]
    config = tiny_config(steps=4, batch_size=B, grad_accum=2, cfg_dropout=0.3)
    assert_ranks_split_what_one_process_reads(taken, config)


def test_ranks_read_disjoint_samples_of_an_image_folder(two_ranks: Path) -> None:
    taken = [r["folder_taken"] for r in reports(two_ranks)]
    config = folder_config(two_ranks)
    assert_ranks_split_what_one_process_reads(taken, config)
    ck = ckpt_io.load(two_ranks / "folder" / CHECKPOINT)
    assert ck.step == 3 and ck.meta.class_names == ("cats", "dogs")


def test_the_consumed_samples_check_catches_a_wrong_split(two_ranks: Path) -> None:
    """The check itself: both ranks reading rank 0's share, or a shifted stream, fail it."""
    config = tiny_config(steps=4, batch_size=B, grad_accum=2, cfg_dropout=0.3)
    r0, r1 = (r["fresh_taken"] for r in reports(two_ranks))
    with pytest.raises(AssertionError, match="both read"):
        assert_ranks_split_what_one_process_reads([r0, r0], config)
    with pytest.raises(AssertionError, match=r"^step 0: "):
        assert_ranks_split_what_one_process_reads([r0[1:] + r0[:1], r1], config)


def test_resume_on_two_processes_is_exact(two_ranks: Path) -> None:
    r0, r1 = reports(two_ranks)
    assert r0["resumed"] == r0["fresh"] == r1["resumed"]
    assert losses(two_ranks / "stopped") == losses(two_ranks / "fresh")


def test_one_process_checkpoint_resumes_on_two(two_ranks: Path, tmp_path: Path) -> None:
    r0, r1 = reports(two_ranks)
    assert r0["from_one"] == r1["from_one"]
    ck = ckpt_io.load(two_ranks / "from_one" / CHECKPOINT)
    assert ck.step == 4 and ck.extra is not None and ck.extra["world_size"] == 2
    assert ck.extra["samples"] == 4 * 4 * B
    # The uninterrupted one-process run: same samples and draws every step, so the
    # same weights up to float rounding (the split of the batch differs).
    whole = train(tiny_config(steps=4, batch_size=2 * B, grad_accum=2, cfg_dropout=0.3),
                  quiet_options(tmp_path, log_every=1))
    ref = ckpt_io.load(whole)
    for k in ref.model:
        torch.testing.assert_close(ck.model[k], ref.model[k], rtol=1e-3, atol=1e-4)
    got, want = losses(two_ranks / "from_one"), losses(tmp_path)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


def test_resume_refuses_another_global_batch(two_ranks: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    train(tiny_config(steps=4, batch_size=2 * B), quiet_options(folder, stop_after=1))
    with pytest.raises(ValueError, match=r"global batch of 4 \(4 per process x 1 accumulated "
                                         r"x 1 process\(es\)\), now 2 .*pass --batch-size 4"):
        train(tiny_config(steps=4, batch_size=B), quiet_options(folder, resume=True))


def _lonely(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    launch = distributed.from_env()
    assert launch is not None
    with distributed.process_group(launch, torch.device("cpu"), timeout=3) as comm:
        if rank == 0:
            os._exit(0)  # gone without a word (killed, OOM, power): no agent to tell rank 1
        comm.barrier()  # rank 1 waits for a rank that is gone: must fail, not hang


def test_a_vanished_rank_makes_the_other_fail_instead_of_hanging() -> None:
    t0 = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="Process 1 terminated"):
        mp.spawn(_lonely, args=(free_port(),), nprocs=2, join=True)
    assert time.perf_counter() - t0 < 60


def test_trainer_refuses_a_world_size_without_a_process_group(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="start several processes with torchrun"):
        Trainer(tiny_config(steps=1), quiet_options(tmp_path, rank=1, world_size=2))


# ---------------------------------------------------------------------------------
# The command line: fewstep train --gpus N (torchrun in-process)
# ---------------------------------------------------------------------------------


def fewstep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "fewstep.runtime.cli", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_gpus_on_cpu_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["train", "--preset", "tiny", "--image-size", "16", "--batch-size", "2",
              "--lr", "2e-3", "--warmup-steps", "1", "--device", "cpu", "--workers", "0",
              "--log-every", "1", "--no-progress", "--out", str(out)]
    r = fewstep(*common, "--steps", "3", "--gpus", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 4 (2 per process x 1 accumulated x 2 processes)" in r.stderr
    assert r.stdout.strip().splitlines() == [str(out / CHECKPOINT)]  # rank 0 prints once
    ck = ckpt_io.load(out / CHECKPOINT)
    assert ck.step == 3 and ck.extra is not None and ck.extra["world_size"] == 2
    assert sorted(losses(out)) == [1, 2, 3]  # one row per step: rank 0 writes alone
    # Every rank fails the same way (exists, no --resume): exit 2, quickly.
    r = fewstep(*common, "--steps", "3", "--gpus", "2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "exists; pass --resume" in r.stderr and "failed first" in r.stderr
    # Continue the 2-process run on one process: --batch-size 4 keeps the global batch.
    assert common[5:7] == ["--batch-size", "2"]
    four = [*common[:6], "4", *common[7:]]
    assert train_cli.main([*four[1:], "--steps", "5", "--resume"]) == 0
    assert "resuming a run of 2 process(es) on 1" in capsys.readouterr().err
    ck = ckpt_io.load(out / CHECKPOINT)
    assert ck.step == 5 and ck.extra == {"world_size": 1, "global_batch": 4, "samples": 20}


def test_cli_gpus_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--gpus", "2", "--device", "cuda:1"]) == 2
    assert "each process uses cuda:LOCAL_RANK" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train_cli.main(["--gpus", "2"]) == 2
        assert "0 CUDA GPU(s) are visible" in capsys.readouterr().err


def test_strip_gpus_and_env() -> None:
    assert distributed.strip_gpus(["--gpus", "2", "--out", "x", "--gpus=3"]) == ["--out", "x"]
    assert distributed.from_env({}) is None
    assert distributed.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (
        distributed.Launch(1, 2, 1))
    with pytest.raises(ValueError, match="RANK=2 does not fit WORLD_SIZE=2"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert distributed.timeout_s({"FEWSTEP_DIST_TIMEOUT_S": "5"}) == 5.0
    with pytest.raises(ValueError, match="must be a number of seconds"):
        distributed.timeout_s({"FEWSTEP_DIST_TIMEOUT_S": "soon"})


def test_nvlink_multicast_stays_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.MULTICAST_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with distributed.process_group(distributed.Launch(0, 1, 0), torch.device("cpu"), 30):
        assert {k: os.environ[k] for k in distributed.MULTICAST_OFF} == {
            "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with distributed.process_group(distributed.Launch(0, 1, 0), torch.device("cpu"), 30):
        assert os.environ["NCCL_NVLS_ENABLE"] == "1"

