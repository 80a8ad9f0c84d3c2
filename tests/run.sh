#!/usr/bin/env bash
# Set up a virtual environment and run every check fewstep has on a CPU machine:
# ruff, mypy (runtime/ and export/ strict), then pytest. Extra arguments go to pytest.
#
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k ddim         # a subset
#
# FEWSTEP_VENV (default .venv) and PYTHON (default python3) choose where and with what;
# FEWSTEP_TORCH_INDEX the index PyTorch comes from (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FEWSTEP_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# PyTorch, pinned. Which build this is depends on the index: on a stock Linux x86-64 setup
# PyPI's torch==2.13.0 is the CUDA build (several GB of nvidia-* wheels); this project's
# machines serve a local CPU wheel. The tests need only the CPU build: set
# FEWSTEP_TORCH_INDEX=https://download.pytorch.org/whl/cpu to take it from PyTorch's own
# CPU wheel index.
if [ -n "${FEWSTEP_TORCH_INDEX:-}" ]; then
  "$py" -m pip install -q "torch==2.13.0" --index-url "$FEWSTEP_TORCH_INDEX"
else
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".[train,export,bench,triton,serve,dev]"
# The Triton server that tests/test_serve.py runs: a binary inside this wheel (Linux
# x86-64 only; elsewhere those tests skip with the reason). --no-deps: see pyproject's
# serve extra.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  "$py" -m pip install -q --no-deps "nvidia-pytriton==0.7.0" \
    || echo "nvidia-pytriton did not install (it needs glibc >= 2.35): test_serve.py skips"
fi

echo "== ruff"
"$venv/bin/ruff" check .

echo "== mypy (strict: fewstep.runtime, fewstep.export)"
# fewstep.* maps onto the top-level folders; give mypy the same layout through links.
tc=build/typecheck
rm -rf "$tc" && mkdir -p "$tc/fewstep"
for d in runtime export train benchmarks; do ln -s "../../../$d" "$tc/fewstep/$d"; done
(cd "$tc" && "../../$venv/bin/mypy" --strict --config-file ../../pyproject.toml \
   --namespace-packages --explicit-package-bases -p fewstep.runtime -p fewstep.export)

echo "== pytest"
status=0
"$py" -m pytest -q --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

# The oldest onnxruntime pyproject.toml allows (onnxruntime>=ORT_FLOOR): a second, small
# environment without torch runs the runtime tests that need none. 1.18 is the first
# that opens fewstep's files (ONNX IR version 10); it was built against numpy 1.x.
# FEWSTEP_SKIP_FLOOR=1 skips this step (e.g. for a quick `bash tests/run.sh -k ddim`).
ORT_FLOOR=1.18.0
if [ -z "${FEWSTEP_SKIP_FLOOR:-}" ] && [ "$#" -eq 0 ]; then
  echo "== pytest: runtime tests on onnxruntime==$ORT_FLOOR (the declared minimum), no torch"
  floor="${venv}-ort-floor"
  if [ ! -x "$floor/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$floor"
  fi
  "$floor/bin/python" -m pip install -q --upgrade pip
  "$floor/bin/python" -m pip install -q "onnxruntime==$ORT_FLOOR" "numpy<2" pillow onnx \
    pytest hypothesis
  "$floor/bin/python" -m pip install -q --no-deps -e .
  "$floor/bin/python" -c "import onnxruntime, sys; assert onnxruntime.__version__ == '$ORT_FLOOR'; assert 'torch' not in sys.modules"
  "$floor/bin/python" -m pytest -q -p no:cacheprovider tests/test_meta.py \
    tests/test_backend_ort.py tests/test_cli_runtime.py tests/test_runtime_lean.py \
    tests/test_containment.py
fi
