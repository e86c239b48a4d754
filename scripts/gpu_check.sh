#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, each stage time-boxed and logged into OUT_DIR:
#   1. tests/test_gpu.py (AMP steps, extra modules on the GPU, checkpoint round trip with the grad scaler);
#   2. bench-speed with nnU-Net's own (stock) 3d_fullres plans on a GPU-sized synthetic dataset
#      (160x160x96 voxels -> patch 96x160x160, batch 2, 6 stages), every trainer against nnUNetTrainer;
#   3. the cuda case of tests/test_end_to_end.py (stock nnUNetv2_train / nnUNetv2_predict -device cuda,
#      with nnU-Net's default torch.compile).
# Stages 1-2 run with nnUNet_compile=f: compiling every trainer's network would take longer than the
# measurement, and the step-time ratios compare uncompiled networks on both sides.
# Usage: bash scripts/gpu_check.sh OUT_DIR   (nnunetv2 and this package importable - on the lent machine
# `source scripts/gpu_kit_env.sh` first; exits 1 if a stage failed). Earlier timings on an H200:
# docs/history/BENCHMARKS.md, section "GPU".
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
SIZE=${MIXSUP_GPU_SIZE:-160 160 96}
STEPS=${MIXSUP_GPU_STEPS:-8}
TRAINERS=${MIXSUP_GPU_TRAINERS:-MixSupTrainer MixSupTrainer_MLDS MixSupTrainer_MeanTeacher \
MixSupTrainer_DualBranch MixSupTrainer_DMD MixSupTrainer_StrongView}
W=$(mktemp -d)
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pp nnUNet_results=$W/res PYTHONUNBUFFERED=1
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
failed=()
stage() {  # stage NAME SECONDS CMD...: run with a time limit, output to OUT/NAME.log and the console
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then failed+=("$name"); fi
}
{
  date -u; hostname; nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, nnunetv2, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'nnunetv2', m.version('nnunetv2'))"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# shellcheck disable=SC2086
stage data 90 bash -c "nnunet-mixsup synthetic-data -d 903 --size $SIZE --spacing 1 1 1.5 --counts 8 4 4 4 &&
  nnunet-mixsup plan_and_preprocess -d 903 -c 3d_fullres -np $(( $(nproc) > 12 ? 12 : $(nproc) ))"
nnUNet_compile=f stage test_gpu 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
# shellcheck disable=SC2086
nnUNet_compile=f stage bench_speed 240 nnunet-mixsup bench-speed -d 903 -c 3d_fullres \
  -p nnUNetPlans --steps "$STEPS" --loader-batches 4 -tr $TRAINERS -o "$OUT/bench_speed_gpu.md"
stage test_e2e_cuda 150 python -m pytest -q -p no:cacheprovider tests/test_end_to_end.py -k cuda -rs

rm -rf "$W"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
