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
"$py" -m pip install -q -e ".[train,export,bench,triton,dev]"

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
"$py" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
