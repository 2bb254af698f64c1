#!/usr/bin/env bash
# One accelerator run (bench/accelerator.py): parity on the chip, train-step MFU, ranking users/s, profile
# generation tokens/s; rows go to bench/RESULTS.md. Finishes within 8 minutes on one H100/H200-class GPU.
#
#   bench/accelerator.sh [--results FILE] [--budget-s S]
#   bench/accelerator.sh --cpu-smoke --results /tmp/x.md     # tiny shapes on CPU (tests/test_bench.py)
#
# Runs on the machine's own Python image (JAX with CUDA, flax, optax, orbax, transformers, peft, torch).
# palr_jax's configs need ml-collections, which such an image lacks: carry its wheel in bench/wheels
# (`pip download --no-deps -d bench/wheels ml-collections==1.1.0`, on a machine with the index), and this
# script adds it to PYTHONPATH without touching the image.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ " $* " == *" --cpu-smoke "* ]]; then
  export JAX_PLATFORMS=cpu
fi
if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  wheel=$(ls bench/wheels/ml_collections-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z "$wheel" ]]; then
    echo "bench/accelerator.sh: $PYTHON has no ml_collections and bench/wheels/ holds no ml_collections wheel;" \
         "run 'pip download --no-deps -d bench/wheels ml-collections==1.1.0' and carry bench/wheels" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/palr-accelerator-site"
  rm -rf "$site" && mkdir -p "$site"
  "$PYTHON" -m zipfile -e "$wheel" "$site"   # a wheel is a zip of importable files: no pip, no network
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$PYTHON" bench/accelerator.py "$@"
