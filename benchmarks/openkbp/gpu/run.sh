#!/bin/bash
# One GPU call (made with benchmarks/openkbp/gpu/prepare.sh beforehand): OpenKBP joint runs side by side on one GPU,
# plain float32 (TF32 off, .gpu/pyinit/sitecustomize.py); then checkpoints slimmed for the trip back, a folded-head
# check on the GPU when a prototype-head run named prototypegpu1500_s0 is among them, logs. Each argument is one run,
# "name|head|seed|ratios" (ratios: empty for the config's inverse_frequency, or a class_ratios list). The command is
# the CPU runs' (benchmarks/openkbp/README.md) plus --trainer.accelerator=gpu and the bank encoder.
# The calls made on 2026-11-26 (no arguments = the first):
#   bash benchmarks/openkbp/gpu/run.sh                                   # DoDNet, Universal s0/s1 + prototype s0
#   E='[1.0, 1.0929, 1.0132, 1.0338, 1.0408, 7.65, 2.125, 1.4712]'       # the esophagus x3 crop ratios
#   bash benchmarks/openkbp/gpu/run.sh "esoratio1500_s0|prototype|0|$E" "esoratio1500_s1|prototype|1|$E"
#   bash benchmarks/openkbp/gpu/run.sh "prototypegpu1500_s1|prototype|1|" "softmaxeso1500_s0|softmax|0|$E"
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=$OUT/report.txt
STEPS=${STEPS:-1500}; ACCEL=${ACCEL:-gpu}; LIMIT=${LIMIT:-470}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=$PWD/.gpu/pyinit:/tmp/site:$PWD PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1; nproc) >> "$R"
python3 -c "import torch,lightning,torchmetrics,monai,nibabel,jsonargparse;print('torch',torch.__version__,'lightning',lightning.__version__,'torchmetrics',torchmetrics.__version__,'monai',monai.__version__,'cudnn tf32',torch.backends.cudnn.allow_tf32,'cuda',torch.cuda.is_available())" >> "$R" 2>&1 || { cat "$R"; exit 4; }
[ $# -gt 0 ] || set -- 'dodnet1500_s0|{"class_path": "cfseg.heads.DoDNetHead"}|0|' \
  'dodnet1500_s1|{"class_path": "cfseg.heads.DoDNetHead"}|1|' 'universal1500_s0|{"class_path": "cfseg.heads.UniversalHead"}|0|' \
  'universal1500_s1|{"class_path": "cfseg.heads.UniversalHead"}|1|' 'prototypegpu1500_s0|prototype|0|'
mkdir -p runs
run() {
  local name head seed ratios d t0 extra=()
  IFS='|' read -r name head seed ratios <<< "$1"
  d=runs/$name; t0=$(date +%s); mkdir -p "$d"
  [ -n "$ratios" ] && extra=(--data.class_ratios="$ratios")
  OMP_NUM_THREADS=$(( 16 / $2 > 1 ? 16 / $2 : 1 )) timeout "$LIMIT" python3 -m cfseg.apps.cli fit \
    --config configs/openkbp/base.yaml --config configs/openkbp/joint.yaml --model.head="$head" \
    --trainer.max_steps="$STEPS" --seed_everything="$seed" --data.seed=0 --trainer.default_root_dir="$d" \
    --trainer.logger.init_args.save_dir="$d" --trainer.enable_progress_bar=false --trainer.accelerator="$ACCEL" \
    --model.encoder=bank:.gpu/bank_minilm_ct.json "${extra[@]}" \
    --data.datasets="[{\"path\": \".gpu/data/openkbp_oar\", \"split_file\": \"${SPLIT:-.gpu/split_device.json}\"}]" > "$d.log" 2>&1
  echo "$name rc=$? wall=$(( $(date +%s) - t0 ))s" >> "$R"
}
for spec in "$@"; do run "$spec" $# & done
wait
python3 benchmarks/openkbp/gpu/slim.py runs "$OUT" >> "$R" 2>&1
ctl=runs/prototypegpu1500_s0/logs/version_0/checkpoints/joint.ckpt
[ -f "$ctl" ] && timeout 120 python3 benchmarks/openkbp/gpu/fold_check.py "$ctl" >> "$R" 2>&1
tar czf "$OUT/logs.tgz" runs/*.log runs/*/logs/version_0/metrics.csv 2>/dev/null
echo "total $(( $(date +%s) - START ))s" >> "$R"
cat "$R"
