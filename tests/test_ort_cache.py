"""ONNX Runtime session options and the optimised-graph cache (runtime/backends/ort_cache.py).

On the CPU with the shipped model's fused sampler graph (copied, weights file and all,
into a temporary folder so its bytes can be changed): an entry is written once and hit
afterwards with the same images as an uncached session; it is rebuilt when damaged or
refused by ONNX Runtime; a changed model, another onnxruntime version or another device
gets its own entry; entries stay inside the cache folder; a cache that cannot be used
never stops a load.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fewstep.runtime import backends
from fewstep.runtime.backends import ort_cache, ort_session
from fewstep.runtime.backends import ort_options as orto
from fewstep.runtime.backends.ort_cache import OptimizedCacheWarning
from fewstep.runtime.pipeline import default_model_path

SHIPPED = default_model_path()
SAMPLER = SHIPPED.with_name(SHIPPED.stem + ".sampler-4.onnx")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A copy of the shipped sampler graph and its weights file."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in SHIPPED.parent.iterdir():
        if f.name.startswith(SHIPPED.stem) and f.name.endswith((".bin", "sampler-4.onnx")):
            shutil.copy(f, folder / f.name)
    return folder / SAMPLER.name


def feeds(graph: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in graph.inputs.items():
        shape = (2, *spec.dims)
        if spec.dtype == np.float32:
            out[name] = (rng.standard_normal(shape) if name == "x" else np.full(shape, 1.5)
                         ).astype(np.float32)
        else:
            out[name] = np.arange(2, dtype=spec.dtype).reshape(shape)
    return out


def open_cached(path: Path, cache: Path, **options: Any) -> Any:
    return backends.load(str(path), "ort-cpu", threads=1, optimized_cache=str(cache), **options)


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"graph_optimization_level": "max"},
     "graph_optimization_level='max' is not one of disable, basic, extended, all"),
    ({"execution_mode": "async"}, "execution_mode='async' is not one of sequential, parallel"),
    ({"warmup_batch": 0}, "warmup_batch=0 must be a whole number >= 1"),
    ({"warmup_batch": True}, "warmup_batch=True must be a whole number"),
    ({"optimized_cache": 3}, "optimized_cache=3 must be True, False or a folder path"),
    ({"optimized_cache": ""}, "optimized_cache='' must be True, False or a folder path"),
    ({"cuda_options": {"cudnn_conv_algo_search": "FAST"}},
     "cuda_options['cudnn_conv_algo_search']='FAST' is not one of EXHAUSTIVE, HEURISTIC, "
     "DEFAULT"),
])
def test_bad_session_options_are_one_clear_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as e:
        orto.make_config("ort-cuda", "/m/model.onnx", options, on_jetson=False)
    assert message in str(e.value)


def test_session_option_defaults_and_where_they_apply(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    c = orto.make_config("ort-cpu", "/m/model.onnx", {})
    assert (c.graph_optimization_level, c.execution_mode, c.optimized_cache,
            c.warmup_batch) == ("all", "sequential", "", None)
    monkeypatch.setenv("FEWSTEP_CACHE_DIR", str(tmp_path / "mine"))
    on = orto.make_config("ort-cpu", "/m/model.onnx", {"optimized_cache": True})
    assert on.optimized_cache == str(tmp_path / "mine" / "ort-optimized")
    with pytest.raises(ValueError, match=r"option\(s\) optimized_cache not supported by "
                                         r"backend 'ort-tensorrt'"):
        orto.make_config("ort-tensorrt", "/m/model.onnx", {"optimized_cache": True})
    with pytest.raises(ValueError, match="warmup_batch=17 exceeds max_batch=16"):
        orto.make_config("ort-tensorrt", "/m/model.onnx", {"warmup_batch": 17})
    ok = orto.make_config("ort-cuda", "/m/model.onnx", {"cuda_options": {
        "cudnn_conv_algo_search": "HEURISTIC"}}, on_jetson=False)
    assert orto.cuda_provider_options(ok, True)["cudnn_conv_algo_search"] == "HEURISTIC"


@pytest.mark.parametrize(("level", "mode"), [("disable", "parallel"), ("basic", "sequential"),
                                             ("extended", "parallel"), ("all", "sequential")])
def test_session_options_reach_onnxruntime(level: str, mode: str) -> None:
    config = orto.make_config("ort-cpu", "/m/model.onnx", {
        "graph_optimization_level": level, "execution_mode": mode, "threads": 3})
    so = ort_session.session_options(ort, config)
    assert so.graph_optimization_level == getattr(ort.GraphOptimizationLevel,
                                                  ort_session.LEVELS[level])
    assert so.execution_mode == getattr(ort.ExecutionMode, ort_session.MODES[mode])
    assert so.intra_op_num_threads == 3


@pytest.mark.parametrize("io_binding", [False, True])
def test_warmup_batch_runs_at_load_and_changes_nothing(model: Path, io_binding: bool) -> None:
    plain = backends.load(str(model), "ort-cpu", threads=1, io_binding=io_binding)
    warm = backends.load(str(model), "ort-cpu", threads=1, io_binding=io_binding,
                         warmup_batch=2)
    assert warm.describe()["warmup_batch"] == 2
    if io_binding:  # the buffers of batch 2 were made while loading
        assert list(warm._buffers) == [2] and not plain._buffers
    f = feeds(plain)
    np.testing.assert_array_equal(warm.run(f), plain.run(f))


# ---------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------


def test_written_once_then_reused_with_the_same_images(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = backends.load(str(model), "ort-cpu", threads=1)
    f = feeds(plain)
    want = plain.run(f)
    first = open_cached(model, cache)
    assert first.describe()["optimized_cache"] == "written"
    [entry] = entries(cache)
    assert {p.name for p in entry.iterdir()} == {"model.onnx", "model.weights", "entry.json"}
    record = json.loads((entry / "entry.json").read_text())
    assert record["key"]["onnxruntime"] == ort.__version__
    assert record["key"]["backend"] == "ort-cpu"
    second = open_cached(model, cache)
    assert second.describe()["optimized_cache"] == "hit"
    np.testing.assert_array_equal(first.run(f), want)
    np.testing.assert_array_equal(second.run(f), want)
    assert entries(cache) == [entry]
    # No temporaries or staging folders are left behind.
    assert [p.name for p in cache.iterdir()] == [entry.name]


@pytest.mark.parametrize("damaged", ["model.onnx", "model.weights"])
def test_a_damaged_entry_is_rebuilt_never_used(model: Path, tmp_path: Path,
                                               damaged: str) -> None:
    cache = tmp_path / "cache"
    want = backends.load(str(model), "ort-cpu", threads=1)
    f = feeds(want)
    open_cached(model, cache)
    [entry] = entries(cache)
    data = bytearray((entry / damaged).read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # flip bytes mid-file
        data[i] ^= 0xFF
    (entry / damaged).write_bytes(bytes(data))
    again = open_cached(model, cache)
    assert again.describe()["optimized_cache"] == f"rebuilt ({damaged} does not match its digest)"
    np.testing.assert_array_equal(again.run(f), want.run(f))
    assert open_cached(model, cache).describe()["optimized_cache"] == "hit"


def test_an_entry_onnxruntime_refuses_is_rebuilt(model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    open_cached(model, cache)
    [entry] = entries(cache)
    (entry / "model.onnx").write_bytes(b"not a protobuf at all")
    record = json.loads((entry / "entry.json").read_text())
    record["sha256"]["model.onnx"] = ort_cache._sha256(entry / "model.onnx")
    (entry / "entry.json").write_text(json.dumps(record))
    again = open_cached(model, cache)
    assert again.describe()["optimized_cache"].startswith("rebuilt (onnxruntime refused it")
    assert open_cached(model, cache).describe()["optimized_cache"] == "hit"


@pytest.mark.parametrize("entry_file", ["entry.json", "model.weights"])
def test_a_partial_entry_is_rebuilt(model: Path, tmp_path: Path, entry_file: str) -> None:
    cache = tmp_path / "cache"
    open_cached(model, cache)
    [entry] = entries(cache)
    (entry / entry_file).unlink()
    state = open_cached(model, cache).describe()["optimized_cache"]
    assert state.startswith("rebuilt (")
    assert open_cached(model, cache).describe()["optimized_cache"] == "hit"


def test_stale_entries_are_never_used(model: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Other model bytes, another onnxruntime version, another device: a new entry each."""
    cache = tmp_path / "cache"
    open_cached(model, cache)
    assert len(entries(cache)) == 1
    # Other weights: the old entry would give the old images.
    weights = next(model.parent.glob("*.bin"))
    data = np.frombuffer(weights.read_bytes(), dtype=np.float32).copy()
    data[: data.size // 2] *= 0.5
    weights.write_bytes(data.tobytes())
    changed = open_cached(model, cache)
    assert changed.describe()["optimized_cache"] == "written"
    plain = backends.load(str(model), "ort-cpu", threads=1)
    f = feeds(plain)
    np.testing.assert_array_equal(changed.run(f), plain.run(f))
    assert len(entries(cache)) == 2
    monkeypatch.setattr(ort, "__version__", "0.0.1")
    assert open_cached(model, cache).describe()["optimized_cache"] == "written"
    monkeypatch.setattr(ort_cache, "device_identity", lambda config: "cpu another-one")
    assert open_cached(model, cache).describe()["optimized_cache"] == "written"
    assert len(entries(cache)) == 4
    assert open_cached(model, cache).describe()["optimized_cache"] == "hit"


def test_entries_stay_inside_the_cache_folder(model: Path, tmp_path: Path) -> None:
    odd = model.with_name("..odd name;$(x)..onnx")
    shutil.copy(model, odd)
    cache = tmp_path / "cache"
    open_cached(odd, cache)
    [entry] = entries(cache)
    assert entry.parent == cache and entry.resolve().parent == cache.resolve()
    assert all(ch.isalnum() or ch in "_-" for ch in entry.name)
    # An entry that is a link to a folder elsewhere is not used, and what it points to is
    # left alone.
    outside = tmp_path / "outside"
    shutil.move(str(entry), outside)
    os.symlink(outside, entry)
    state = open_cached(odd, cache).describe()["optimized_cache"]
    assert state == "rebuilt (outside the cache folder)"
    assert entry.is_dir() and not entry.is_symlink()
    assert {p.name for p in outside.iterdir()} == {"model.onnx", "model.weights", "entry.json"}


def test_a_cache_that_cannot_be_used_never_stops_a_load(model: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.warns(OptimizedCacheWarning, match="cannot write the optimized_cache entry"):
        g = open_cached(model, blocker / "cache")
    assert g.describe()["optimized_cache"].startswith("off (cannot write")
    f = feeds(g)
    np.testing.assert_array_equal(g.run(f), backends.load(str(model), "ort-cpu").run(f))
    monkeypatch.setattr(ort_cache, "device_identity", lambda config: None)
    with pytest.warns(OptimizedCacheWarning, match="the CPU cannot be identified"):
        g = open_cached(model, tmp_path / "cache")
    assert g.describe()["optimized_cache"] == "off (the CPU cannot be identified)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = open_cached(model, tmp_path / "cache", graph_optimization_level="disable")
    assert g.describe()["optimized_cache"].startswith("off (nothing to cache")
    assert not (tmp_path / "cache").exists()


def test_device_identity_names_the_cpu_and_the_gpu_or_none() -> None:
    cpu = ort_cache.device_identity(orto.make_config("ort-cpu", "/m/model.onnx", {}))
    assert cpu is not None and cpu.startswith("cpu ")
    gpu = ort_cache.device_identity(orto.make_config("ort-cuda", "/m/model.onnx", {},
                                                     on_jetson=False))
    assert gpu is None or (gpu.startswith("gpu ") and " sm_" in gpu)
