#!/usr/bin/env bash
# The main job end to end on the built-in demo dataset (CPU is fine; a GPU is used if present).
# Creates ./.venv and installs the package if needed; all data goes to ./demo_work.
# Usage: bash scripts/demo.sh [nnunet-mixsup demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
MIXSUP_NEEDS="nnunet_mixsup, nnunetv2, nilearn, matplotlib" MIXSUP_EXTRAS="demo"
. scripts/_venv.sh
nnunet-mixsup demo "$@"
