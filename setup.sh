#!/usr/bin/env bash
# Sets up .venv with everything palr-jax needs. `./setup.sh --test` adds test/bench dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
reqs=(-r requirements.txt)
if [ "${1:-}" = "--test" ]; then reqs+=(-r requirements-test.txt); fi
.venv/bin/python -m pip install -q --upgrade pip
# One pip call, so torch==2.13.0 (local CPU wheel) satisfies peft/accelerate instead of a CUDA build.
.venv/bin/python -m pip install -q "${reqs[@]}"
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
.venv/bin/python -m pip install -q --no-deps -e .
