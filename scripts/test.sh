#!/usr/bin/env bash
# Run ruff and the test suite. Creates ./.venv and installs the package with its test extras if needed.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
MIXSUP_NEEDS="nnunet_mixsup, nnunetv2, pytest, ruff, hypothesis, nilearn, h5py" MIXSUP_EXTRAS="test,demo"
. scripts/_venv.sh
ruff check nnunet_mixsup trainers dataset_conversion tests
python -m pytest -q "$@" tests
