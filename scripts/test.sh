#!/usr/bin/env bash
# Run the test suite. Creates ./.venv and installs the package with its test extras if needed.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import nnunet_mixsup, nnunetv2, pytest, ruff, hypothesis, nilearn" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[test,demo]"
fi
ruff check nnunet_mixsup trainers dataset_conversion tests
python -m pytest -q "$@" tests
