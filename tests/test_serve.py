"""fewstep's Triton repository under a real Triton server (the one nvidia-pytriton bundles).

The shipped default model's repository is exported (KIND_CPU) and served by
``tritonserver`` 2.51 with its Python backend on free loopback ports; every image that
comes back over HTTP or gRPC must equal ``Pipeline.generate``'s on the graph the model
serves, bit for bit. Skipped, with the reason, only where the bundled server cannot run
(another platform, glibc < 2.35). Every server started here is stopped by the PID the
test started, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fewstep.export import serve

PROBLEM = serve.platform_problem()
pytestmark = [
    pytest.mark.skipif(PROBLEM is not None, reason=f"bundled tritonserver: {PROBLEM}"),
    pytest.mark.filterwarnings("ignore:model was distilled for 4 steps"),  # 2, 3 on purpose
]

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

MODEL = "landscapes_ddim"
SPARE = "spare_ddim"  # a second copy: a fault in one model must not reach the other
TIMEOUT = 60.0  # seconds any one request may take


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fewstep.export import triton
    from fewstep.runtime.pipeline import default_model_path

    out = tmp_path_factory.mktemp("serve") / "models"
    triton.write_repository(default_model_path(), out, triton.TritonOptions(instance_kind="cpu"),
                            log=lambda _msg: None)
    shutil.copytree(out / MODEL, out / SPARE)
    config = out / SPARE / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{MODEL}"', f'name: "{SPARE}"'))
    return out


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[serve.Server]:
    with serve.serving(repo, [MODEL, SPARE], ready_timeout=180) as s:
        yield s
    assert s.process is None


@pytest.fixture(scope="module")
def pipe(repo: Path) -> Any:
    from fewstep.runtime import Pipeline

    p = Pipeline.load(repo / MODEL / "1" / "landscapes.step.onnx", backend="ort-cpu")
    return p


def _inputs(module: Any, **columns: np.ndarray) -> list[Any]:
    types = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
             np.dtype(np.float64): "FP64"}
    out = []
    for name, value in columns.items():
        tensor = module.InferInput(name, list(value.shape), types[value.dtype])
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


def col(values: Any, dtype: Any = np.int64) -> np.ndarray:
    return np.array(values, dtype).reshape(-1, 1)


def infer_grpc(server: serve.Server, model: str, **columns: np.ndarray) -> np.ndarray:
    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        result = client.infer(model, _inputs(grpc, **columns), client_timeout=TIMEOUT)
        return np.asarray(result.as_numpy("image"))
    finally:
        client.close()


def infer_http(server: serve.Server, model: str, **columns: np.ndarray) -> np.ndarray:
    client = http.InferenceServerClient(server.http_url, network_timeout=TIMEOUT)
    try:
        result = client.infer(model, _inputs(http, **columns),
                              outputs=[http.InferRequestedOutput("image", binary_data=True)])
        return np.asarray(result.as_numpy("image"))
    finally:
        client.close()


def test_http_and_grpc_give_the_pipeline_images(server: serve.Server, pipe: Any) -> None:
    got = infer_http(server, MODEL, seed=col([7] * 3), label=col([0, 3, 5]),
                     steps=col([4] * 3), guidance=col([2.0] * 3, np.float32))
    want = pipe.generate(3, steps=4, seed=7, labels=[0, 3, 5], guidance=2.0)
    assert pipe.last_path == "step"
    assert got.dtype == np.uint8 and got.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(got, want)
    # gRPC, the stochastic loop (eta > 0) at another step count, labels left to the model.
    got = infer_grpc(server, MODEL, seed=col([11, 11]), steps=col([2, 2]),
                     eta=col([0.5, 0.5], np.float32))
    np.testing.assert_array_equal(got, pipe.generate(2, steps=2, eta=0.5, seed=11))
    assert server.stub_pids().keys() == {MODEL, SPARE}


BAD_REQUESTS = [
    ("seed as FP32", dict(seed=col([7], np.float32)), "data-type is 'FP32', but model"),
    ("seed shape [1, 2]", dict(seed=np.array([[7, 8]], np.int64)), "unexpected shape for input"),
    ("no seed", dict(label=col([1])), "'seed'"),
    ("steps 0", dict(seed=col([7]), steps=col([0])), "steps 0 is outside 1..1000"),
    ("steps 5000", dict(seed=col([7]), steps=col([5000])), "steps 5000 is outside 1..1000"),
    ("NaN guidance", dict(seed=col([7]), guidance=col([np.nan], np.float32)),
     "guidance nan is outside [0, 50]"),
    ("label 6", dict(seed=col([7]), label=col([6])), "label 6 is outside the model's classes"),
    ("negative seed", dict(seed=col([-3])), "seed -3 is negative"),
    ("eta 2", dict(seed=col([7]), eta=col([2.0], np.float32)),
     "eta has 1 of 1 value(s) outside [0, 1] (first: 2.0)"),
]


def test_malformed_requests_get_one_clear_error_each(server: serve.Server, pipe: Any) -> None:
    stubs = server.stub_pids()
    for what, columns, message in BAD_REQUESTS:
        with pytest.raises(InferenceServerException) as caught:
            infer_grpc(server, MODEL, **columns)
        assert message in str(caught.value), (what, str(caught.value))
        assert len(str(caught.value).splitlines()) == 1, what
    # A bad request batched with good ones spoils nothing: sent together, asynchronously.
    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        done: dict[int, Any] = {}
        event = threading.Event()

        def callback(i: int) -> Any:
            def record(result: Any, error: Any) -> None:
                done[i] = error if error is not None else result.as_numpy("image")
                if len(done) == 3:
                    event.set()
            return record

        for i, columns in enumerate([dict(seed=col([21]), label=col([2])),
                                     dict(seed=col([21]), label=col([9])),
                                     dict(seed=col([22]), label=col([4]))]):
            client.async_infer(MODEL, _inputs(grpc, **columns), callback(i),
                               client_timeout=TIMEOUT)
        assert event.wait(TIMEOUT)
    finally:
        client.close()
    np.testing.assert_array_equal(done[0], pipe.generate(1, steps=4, seed=21, labels=[2]))
    assert "label 9 is outside" in str(done[1])
    np.testing.assert_array_equal(done[2], pipe.generate(1, steps=4, seed=22, labels=[4]))
    assert server.stub_pids() == stubs  # no instance crashed or restarted
    assert server.get(f"/v2/models/{MODEL}/ready")[0] == 200


def test_models_without_a_bundled_backend_are_refused_with_the_reason(
        server: serve.Server, repo: Path, tmp_path: Path) -> None:
    models = {m.name: m for m in serve.read_repository(repo)}
    assert models["landscapes_sampler4"].backend == "onnxruntime"
    assert "onnxruntime backend, which the bundled server lacks" in str(
        models["landscapes_sampler4"].refusal)
    assert models[MODEL].refusal is None
    assert serve.choose_models(list(models.values()), None, repo) == [MODEL, SPARE]
    with pytest.raises(ValueError, match=r"landscapes_sampler4 \(onnxruntime model\) needs "
                                         r"Triton's onnxruntime backend.*NVIDIA's tritonserver"):
        serve.choose_models(list(models.values()), ["landscapes_sampler4"], repo)
    # The server itself agrees: it has no onnxruntime backend to load the sampler with.
    status, body = server.post("/v2/repository/models/landscapes_sampler4/load")
    assert status == 400 and b"unable to find backend library for backend 'onnxruntime'" in body
    # A tensorrt_plan model (a marker is enough: it is refused before anything is read).
    trt = tmp_path / "m_sampler4_trt"
    trt.mkdir()
    (trt / serve.MARKER).write_text(json.dumps({"backend": "tensorrt"}))
    (model,) = serve.read_repository(tmp_path)
    assert model.refusal is not None and "tensorrt backend and a GPU" in model.refusal


def test_stub_killed_mid_request(server: serve.Server, pipe: Any) -> None:
    """The killed stub's client gets an error, the other model's request in flight at the
    same time its exact images; after a reload the model serves exact images again."""
    (victim,) = server.stub_pids()[MODEL]
    outcome: dict[str, Any] = {}

    def ask(key: str, model: str, **columns: np.ndarray) -> None:
        try:
            outcome[key] = infer_grpc(server, model, **columns)
        except InferenceServerException as e:
            outcome[key] = e

    slow = threading.Thread(target=ask, args=("slow", MODEL),
                            kwargs=dict(seed=col([5, 5]), steps=col([200, 200])))
    other = threading.Thread(target=ask, args=("other", SPARE),
                             kwargs=dict(seed=col([6, 6]), label=col([1, 4]), steps=col([3, 3])))
    slow.start()
    other.start()
    time.sleep(1.0)  # both requests are running
    os.kill(victim, signal.SIGKILL)
    slow.join(TIMEOUT)
    other.join(TIMEOUT)
    assert isinstance(outcome["slow"], InferenceServerException)
    np.testing.assert_array_equal(outcome["other"],
                                  pipe.generate(2, steps=3, seed=6, labels=[1, 4]))
    with pytest.raises(InferenceServerException, match="is not healthy"):
        infer_grpc(server, MODEL, seed=col([1]))
    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        client.unload_model(MODEL)
        client.load_model(MODEL, client_timeout=TIMEOUT)  # returns once it is loaded
    finally:
        client.close()
    (fresh,) = server.stub_pids()[MODEL]
    assert fresh != victim
    np.testing.assert_array_equal(infer_grpc(server, MODEL, seed=col([1, 1]), steps=col([2, 2])),
                                  pipe.generate(2, steps=2, seed=1))


def test_sequence_model_with_conditioning_serves_the_pipelines_samples(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A (16, 2) sequence model conditioned on global_cond FP32 [36] and task INT64 [1]:
    one request over gRPC answers x0 FP32 equal to Pipeline.generate's samples."""
    from test_triton import OBS, sequence_artifact

    from fewstep.export import triton
    from fewstep.runtime import Pipeline

    folder = tmp_path_factory.mktemp("serve_policy")
    model = sequence_artifact(folder)
    repo = folder / "models"
    triton.write_repository(model, repo, triton.TritonOptions(instance_kind="cpu"),
                            log=lambda _msg: None)
    obs = np.random.default_rng(3).standard_normal((2, OBS)).astype(np.float32)
    with serve.serving(repo, ["policy_ddim"], ready_timeout=180) as server:
        client = grpc.InferenceServerClient(server.grpc_url)
        try:
            result = client.infer("policy_ddim", _inputs(
                grpc, seed=col([4, 4]), global_cond=obs, task=col([1, 2]), steps=col([3, 3]),
                guidance=col([2.0, 2.0], np.float32)), client_timeout=TIMEOUT)
            got = np.asarray(result.as_numpy("x0"))
        finally:
            client.close()
    pipe = Pipeline.load(repo / "policy_ddim" / "1" / "policy.step.onnx", backend="ort-cpu")
    want = pipe.generate(2, 3, seed=4, cond={"global_cond": obs, "task": np.array([1, 2])},
                         guidance=2.0)
    assert pipe.last_path == "step"
    assert got.dtype == np.float32 and got.shape == (2, 16, 2)
    np.testing.assert_array_equal(got, want)


def test_dlpack_capsule_round_trip_releases_the_array() -> None:
    import gc
    import weakref

    from fewstep.export import triton_model

    class Holder:
        def __init__(self, capsule: Any) -> None:
            self.capsule = capsule

        def __dlpack__(self, **_: Any) -> Any:
            return self.capsule

        def __dlpack_device__(self) -> tuple[int, int]:
            return (1, 0)  # kDLCPU

    source = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    alive = weakref.ref(source)
    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        copy = np.array(np.from_dlpack(Holder(triton_model.dlpack_capsule(source))))
        np.testing.assert_array_equal(copy, np.arange(96, dtype=np.uint8).reshape(2, 4, 4, 3))
        del source
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert alive() is None  # the consumer's deleter released the array
    assert not unraisable


# ---------------------------------------------------------------------------------
# fewstep serve (the command) and the load script
# ---------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fewstep.runtime.cli", *args]


def test_serve_help_and_refusals(repo: Path, tmp_path: Path) -> None:
    out = subprocess.run(_cli("serve", "--help"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "Python- backend models" in text or "Python-backend models" in text
    assert "need NVIDIA's full ``tritonserver`` image" in text
    for args, message in (
            ((str(repo), "--models", "landscapes_sampler4"),
             "landscapes_sampler4 (onnxruntime model) needs Triton's onnxruntime backend"),
            ((str(tmp_path / "nope"),), "does not exist"),
            ((str(repo), "--models", "nope"), "'nope' is not a fewstep model"),
            ((str(repo), "--http-port", "9000", "--grpc-port", "9000"), "both 9000")):
        res = subprocess.run(_cli("serve", *args), capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """stdout lines up to the one holding ``marker`` (a reader thread; bounded)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    found.wait(timeout)
    return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_fewstep_serve_stops_cleanly(repo: Path, sig: signal.Signals) -> None:
    http_port, grpc_port = serve.free_port(), serve.free_port()
    process = subprocess.Popen(
        _cli("serve", str(repo), "--models", SPARE, "--http-port", str(http_port),
             "--grpc-port", str(grpc_port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    server_pid = None
    try:
        lines = _read_until(process, "server pid", 180)
        text = "".join(lines)
        assert f"HTTP  http://127.0.0.1:{http_port}" in text, text
        assert f"gRPC  127.0.0.1:{grpc_port}" in text
        server_pid = int(text.split("server pid ")[1].split(";")[0])
        stubs = serve.child_pids(server_pid)
        assert stubs
        client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready(SPARE)
        client.close()
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert "stopped (tritonserver exit code 0)" in stdout
        for pid in (server_pid, *stubs):
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if server_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server_pid, signal.SIGKILL)


def test_load_script_small(tmp_path: Path) -> None:
    from fewstep.benchmarks import serve_load

    out = tmp_path / "load.json"
    code = serve_load.main(["--clients", "2", "--requests", "2", "--time-limit", "120",
                            "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    (level,) = result["levels"]
    assert level["clients"] == 2 and level["answered_images"] == 4
    assert level["errors"] == level["lost"] == level["mismatched"] == 0
    assert sum(int(k) * v for k, v in level["batch_sizes"].items()) == 4
    assert level["latency_ms_p50"] > 0 and level["throughput_img_s"] > 0
    assert level["rss_mib"]["after"]["server"] > 0 and level["rss_mib"]["after"]["stubs"] > 0
    assert result["server"]["nvidia-pytriton"] == "0.7.0"
