#!/usr/bin/env bash
# Set up a virtual environment and run every check fewstep has on a CPU machine:
# ruff, mypy (runtime/ and export/ strict), then pytest. Extra arguments go to pytest.
#
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k ddim         # a subset
#
# FEWSTEP_VENV (default .venv) and PYTHON (default python3) choose where and with what.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FEWSTEP_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# The CPU build of PyTorch, pinned: an unpinned torch pulls a multi-GB CUDA build.
"$py" -m pip install -q "torch==2.13.0"
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
"$py" -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
