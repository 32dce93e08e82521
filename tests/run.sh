#!/usr/bin/env bash
# Installs the project into a git-ignored virtual environment at the repo root and runs the tests.
# torch is pinned: unpinned, pip pulls gigabytes of CUDA packages; 2.13.0 resolves to a CPU wheel here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${MEGATRON_LITE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
# The test extra brings triton on Linux x86-64 (setup.py), for the CPU-interpreted kernel tests.
"$VPY" -m pip install -q -e ".[test]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VPY" -m pytest tests -q -p no:cacheprovider "$@"
