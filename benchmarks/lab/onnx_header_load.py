"""What reading an ONNX file's metadata costs, three ways, each in a fresh process.

    python benchmarks/lab/onnx_header_load.py [--size-mb 200]

The ways: fewstep's own header reader (``runtime/onnx_header.py``), ``onnx.load(...,
load_external_data=False)`` and an onnxruntime CPU session's ``get_modelmeta()``. The
files: the shipped model's graphs, and a synthetic model of ``--size-mb`` MB of
initializers, saved once with its weights inline and once as external data. For each:
the import time, the first and best read time, and the peak memory the read adds
(``VmHWM`` after minus before; Linux). Needs onnx (``pip install 'fewstep[export]'``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "runtime" / "models"
WAYS = ("header", "onnx", "ort")

# Run in a child: python -c CHILD WAY FILE -> one JSON line.
CHILD = r"""
import json, sys, time
way, path = sys.argv[1], sys.argv[2]
def rss():  # this process's peak resident memory, MiB (ru_maxrss would count the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
import numpy  # every way needs it; not counted as the way's import
t0 = time.perf_counter()
if way == "header":
    from pathlib import Path
    from fewstep.runtime import onnx_header
    def read():
        return onnx_header.read(Path(path)).metadata
elif way == "onnx":
    import onnx
    def read():
        m = onnx.load(path, load_external_data=False)
        return {p.key: p.value for p in m.metadata_props}
else:
    import onnxruntime as ort
    def read():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return s.get_modelmeta().custom_metadata_map
imported = time.perf_counter() - t0
base = rss()
t1 = time.perf_counter()
read()
first = time.perf_counter() - t1
peak = rss() - base
best = first
for _ in range(3):
    t = time.perf_counter()
    read()
    best = min(best, time.perf_counter() - t)
print(json.dumps({"import_ms": imported * 1e3, "first_ms": first * 1e3,
                  "best_ms": best * 1e3, "peak_mib": peak}))
"""


def synthetic(folder: Path, size_mb: int) -> list[Path]:
    """A chain of Adds over ``size_mb`` MB of float32 initializers (4 MB each), saved
    inline and with external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, elems = max(1, size_mb // 4), 1_000_000
    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(n):
        w = rng.standard_normal(elems).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Add", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elems])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [elems])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, {"fewstep.meta": "{}"})
    inline, external = folder / "inline.onnx", folder / "external.onnx"
    onnx.save_model(model, str(inline))
    onnx.save_model(model, str(external), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external.weights.bin",
                    size_threshold=0)
    return [external, inline]


def measure(way: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, way, str(path)], check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=200, help="synthetic model size")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(MODELS.glob("*.onnx")) + synthetic(Path(tmp), args.size_mb)
        print(f"{'file':32} {'way':7} {'import ms':>9} {'first ms':>9} {'best ms':>8} "
              f"{'peak MiB':>9}")
        for f in files:
            for way in WAYS:
                r = measure(way, f)
                print(f"{f.name:32} {way:7} {r['import_ms']:9.1f} {r['first_ms']:9.1f} "
                      f"{r['best_ms']:8.1f} {r['peak_mib']:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
