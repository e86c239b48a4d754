#!/usr/bin/env bash
# Run ruff and the test suite: the fast unit tier (no nnU-Net dataset, about 2 min), then the
# integration tier (tests marked slow: nnU-Net datasets, training, the end-to-end chain).
# Creates ./.venv and installs the package with its test extras if needed.
# Usage: bash scripts/test.sh [pytest args]   (with arguments: one pytest run with exactly those)
set -euo pipefail
cd "$(dirname "$0")/.."
MIXSUP_NEEDS="nnunet_mixsup, nnunetv2, pytest, ruff, hypothesis, nilearn, h5py" MIXSUP_EXTRAS="test,demo"
. scripts/_venv.sh
ruff check nnunet_mixsup trainers dataset_conversion tests
if [ "$#" -gt 0 ]; then
  python -m pytest -q "$@" tests
else
  python -m pytest -q -m "not slow" tests
  python -m pytest -q -m slow tests
fi
