#!/usr/bin/env bash
# nnU-Net v2's own recipe on a GPU for the iterations of cfseg's GPU recipe (configs/openkbp/gpu.yaml, 1500 steps):
#   bash benchmarks/nnunet/setup.sh        (once; on a GPU machine the pinned torch resolves to its CUDA build)
#   bash benchmarks/nnunet/run_gpu.sh SEED [375|750|final]
# It is run_equal_terms.sh with RECIPE=own (nnU-Net's planned 3d_fullres: its spacing, 128^3 patches, batch 2, its
# network) and DEVICE=cuda, augmentation in nnU-Net's worker processes; results in
# reports/data/nnunet/own_recipe_s<SEED>_<it375|it750|final>.json.
set -euo pipefail
export RECIPE=own DEVICE=cuda
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-8}
exec bash "$(dirname "$0")/run_equal_terms.sh" "$@"
