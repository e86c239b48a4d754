#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset (CPU is fine; a GPU is used if present).
# Creates ./.venv and installs the package if needed; all data goes to ./demo_work.
# Usage: bash scripts/demo.sh [nnunet-mixsup demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import nnunet_mixsup, nnunetv2, nilearn, matplotlib" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[demo]"
fi
nnunet-mixsup demo "$@"
