"""The runtime imports no torch (a Jetson has only numpy, pillow and onnxruntime), and
`import fewstep.runtime` stays light.

Each check runs in a fresh interpreter, so what this test process imported (torch
for the reference sampler, onnx for the oracle graphs) cannot hide an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fewstep.runtime

RUNTIME = Path(fewstep.runtime.__file__).parent
HEAVY = ("torch", "onnx", "tensorflow", "jax")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_runtime_modules_import_no_framework() -> None:
    out = run(
        "import fewstep.runtime, fewstep.runtime.pipeline, fewstep.runtime.backends.ort, "
        "fewstep.runtime.backends.oracle, fewstep.runtime.cli_sample, "
        "fewstep.runtime.cli_info; import sys; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert out == "[]"


def test_generating_imports_no_framework(tmp_path: Path) -> None:
    """A whole oracle generation and `fewstep info` in a clean process: still no torch."""
    out = run(
        "import sys, json\n"
        "from fewstep.runtime.backends.oracle import make_oracle, write_oracle_file\n"
        "from fewstep.runtime.meta import ModelMeta, Schedule\n"
        "from fewstep.runtime.pipeline import Pipeline\n"
        "from fewstep.runtime import cli_info\n"
        "m = ModelMeta.build(prediction_type='v_prediction', schedule=Schedule(), channels=3,"
        " height=8, width=8)\n"
        f"p = write_oracle_file({str(tmp_path / 'm.oracle.json')!r}, m, 1)\n"
        "Pipeline.load(p).generate(2, 4)\n"
        "cli_info.main([str(p), '--json'])\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert out.splitlines()[-1] == "[]"


def test_import_fewstep_runtime_alone_is_light() -> None:
    # What the import itself adds (a site hook may have imported something already).
    out = run("import sys; names = ('numpy', 'onnxruntime', 'PIL', 'torch', "
              "'importlib.metadata'); before = {m for m in names if m in sys.modules}; "
              "import fewstep.runtime; "
              "print([m for m in names if m in sys.modules and m not in before])")
    assert out == "[]"


def test_version_is_looked_up_when_asked_for() -> None:
    """importlib.metadata (~30 ms of a start) is imported by ``__version__``, not on import."""
    out = run("import sys; pre = 'importlib.metadata' in sys.modules; "
              "import fewstep.runtime as r; a = 'importlib.metadata' in sys.modules; "
              "from fewstep.runtime import __version__ as v; "
              "print(pre or not a, 'importlib.metadata' in sys.modules, v == r.__version__, "
              "bool(v))")
    assert out == "True True True True"


def test_pipeline_is_reachable_lazily() -> None:
    out = run("import fewstep.runtime as r, sys; print('numpy' in sys.modules); "
              "P = r.Pipeline; print(P.__name__, 'numpy' in sys.modules, "
              "'onnxruntime' in sys.modules)")
    assert out.splitlines() == ["False", "Pipeline True False"]


@pytest.mark.parametrize("path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: p.name)
def test_no_framework_import_in_runtime_source(path: Path) -> None:
    """Static check too: a lazy ``import torch`` inside a function would escape the above."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in HEAVY, f"{path.name}:{node.lineno} imports {name}"
