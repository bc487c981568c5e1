#!/usr/bin/env bash
# nnU-Net v2 at cfseg's terms on OpenKBP (issue 34): one seed, fold 0 = cfseg's train / val split.
#   bash benchmarks/nnunet/setup.sh                      (once: .venv-nnunet)
#   bash benchmarks/nnunet/run_equal_terms.sh SEED [UNTIL] (SEED 0..4; UNTIL 375, 750 or final (default):
#                                                         train up to that curve point, then predict and score
#                                                         the checkpoints that exist; resumable: rerun after a stop)
# Steps (each skipped when its output exists):
#   1. convert OpenKBP to nnU-Net's raw layout + splits_final.json (convert_openkbp.py)
#   2. fingerprint, nnU-Net's own plans, the equal-terms plans (make_equal_plans.py), preprocess them
#   3. train fold 0 with nnUNetTrainer_cfsegEqual_s<SEED> (1500 iterations, batch 4, patch 64^3, 4 x 4 x 3 mm),
#      always with --c, so a stopped run continues from its last epoch (checkpoint_latest.pth, every epoch)
#   4. predict the 40 test cases with the 25 %, 50 % and 100 % checkpoints (predict.py, no test-time mirroring)
#   5. score them with cfseg's scorer (score.py, cfseg's .venv) into reports/data/nnunet/
# Environment: NNUNET_ROOT (default results/nnunet, git-ignored), OMP_NUM_THREADS (default 1),
# nnUNet_n_proc_DA (default 0: augmentation in the training process, as cfseg's num_workers 0),
# RECIPE (equal (default): nnUNetPlans_cfsegEqual; own: nnU-Net's own nnUNetPlans 3d_fullres; results are named
# equal_terms_* or own_recipe_*), DEVICE (cpu (default) or cuda; run_gpu.sh sets RECIPE=own DEVICE=cuda).
set -euo pipefail
SEED=${1:?usage: run_equal_terms.sh SEED [375|750|final]}
UNTIL=${2:-final}
case $UNTIL in 375|750) export CFSEG_EQUAL_STOP_AT=$UNTIL;; final) ;; *) echo "UNTIL must be 375, 750 or final"; exit 2;; esac
cd "$(dirname "$0")/../.."
REPO=$(pwd)
HERE=$REPO/benchmarks/nnunet
ROOT=${NNUNET_ROOT:-$REPO/results/nnunet}
NN=$REPO/.venv-nnunet/bin
export nnUNet_raw=$ROOT/nnUNet_raw nnUNet_preprocessed=$ROOT/nnUNet_preprocessed nnUNet_results=$ROOT/nnUNet_results
export nnUNet_extTrainer=$HERE/trainers
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MKL_NUM_THREADS=$OMP_NUM_THREADS
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-0} nnUNet_def_n_proc=${nnUNet_def_n_proc:-1} nnUNet_compile=false
DS=Dataset501_OpenKBP
RECIPE=${RECIPE:-equal}
DEVICE=${DEVICE:-cpu}
case $RECIPE in
    equal) PLANS=nnUNetPlans_cfsegEqual; NAME=equal_terms; SUFFIX=;;
    own) PLANS=nnUNetPlans; NAME=own_recipe; SUFFIX=__$PLANS;;
    *) echo "RECIPE must be equal or own"; exit 2;;
esac
TR=nnUNetTrainer_cfsegEqual_s$SEED
PRE=$nnUNet_preprocessed/$DS
test -x "$NN/nnUNetv2_train" || { echo "no .venv-nnunet: run bash benchmarks/nnunet/setup.sh"; exit 1; }
echo "[$(date -u +%FT%TZ)] seed $SEED, recipe $RECIPE, device $DEVICE, threads $OMP_NUM_THREADS, root $ROOT"

if [ ! -f "$nnUNet_raw/$DS/dataset.json" ] || [ ! -f "$PRE/splits_final.json" ]; then
    "$NN/python" "$HERE/convert_openkbp.py" --root "$ROOT"
fi
if [ ! -f "$PRE/.${PLANS}_3d_fullres.complete" ]; then
    test -f "$PRE/dataset_fingerprint.json" || "$NN/nnUNetv2_extract_fingerprint" -d 501 -np 1 --verify_dataset_integrity
    # the planner sets torch threads to nnUNet_n_proc_DA, which must be positive there
    test -f "$PRE/nnUNetPlans.json" || nnUNet_n_proc_DA=1 "$NN/nnUNetv2_plan_experiment" -d 501
    [ "$RECIPE" = own ] || "$NN/python" "$HERE/make_equal_plans.py" --preprocessed "$nnUNet_preprocessed"
    "$NN/nnUNetv2_preprocess" -d 501 -plans_name "$PLANS" -c 3d_fullres -np 1
    touch "$PRE/.${PLANS}_3d_fullres.complete"
fi

MODEL=$nnUNet_results/$DS/${TR}__${PLANS}__3d_fullres
if [ ! -f "$MODEL/fold_0/checkpoint_final.pth" ] && { [ "$UNTIL" = final ] || [ ! -f "$MODEL/fold_0/checkpoint_it$UNTIL.pth" ]; }; then
    "$NN/nnUNetv2_train" 501 3d_fullres 0 -tr "$TR" -p "$PLANS" -device "$DEVICE" --c
fi

mkdir -p "$REPO/reports/data/nnunet"
for CHK in checkpoint_it375 checkpoint_it750 checkpoint_final; do
    [ -f "$MODEL/fold_0/$CHK.pth" ] || { echo "no $CHK.pth yet: not predicted"; continue; }
    PRED=$ROOT/predictions/$TR$SUFFIX/$CHK
    if [ ! -f "$PRED/predict_info.json" ]; then
        "$NN/python" "$HERE/predict.py" --model "$MODEL" --checkpoint "$CHK.pth" --device "$DEVICE" \
            --input "$nnUNet_raw/$DS/imagesTs" --output "$PRED"
    fi
    "$REPO/.venv/bin/python" "$HERE/score.py" --pred "$PRED" --name "nnunet_${RECIPE}_s${SEED}_${CHK#checkpoint_}" \
        --train-log "$MODEL/fold_0" --out "$REPO/reports/data/nnunet/${NAME}_s${SEED}_${CHK#checkpoint_}.json"
done
echo "[$(date -u +%FT%TZ)] done"
