#!/usr/bin/env bash
# The online-corrector benchmark (results: reports/README.md, section 10), resumable: a stream whose JSON exists is skipped.
#   bash benchmarks/online/run.sh [settings JSON]       (default: the settings chosen on the tuning stream)
# weak_auxol runs AuxOL's own constants for reference. Needs the two base models (joint OpenKBP runs of 300 and 1500 steps at the paths below) and, for the shift rows, results/openkbp/scanner_b
# (python benchmarks/openkbp/make_scanner_shift.py). Two streams run side by side, one thread each.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CONFIG=${1:-'{"residual": true, "steps_per_update": 4, "lr": 0.005}'}
WEAK=results/online/base_weak_300/logs/version_0/checkpoints/joint.ckpt
STRONG=results/online/base_strong_1500/logs/version_0/checkpoints/joint.ckpt
OUT=results/online/streams
SHIFT=(--dataset results/openkbp/scanner_b --split-file configs/openkbp/split_scanner_b.json)

stream() {  # name ckpt [args...]
    local name=$1 ckpt=$2
    shift 2
    [ -f "$OUT/$name.json" ] && return 0
    OMP_NUM_THREADS=1 "$PY" benchmarks/online/stream.py --name "$name" --ckpt "$ckpt" --out "$OUT" \
        --config "$CONFIG" "$@" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
( stream weak "$WEAK"; stream weak_every2 "$WEAK" --feedback every2; stream weak_below0.8 "$WEAK" --feedback below0.8
  CONFIG='{"residual": false, "steps_per_update": 1, "lr": 0.0005}' stream weak_auxol "$WEAK" ) &
( stream strong "$STRONG"; stream strong_shift "$STRONG" "${SHIFT[@]}"; stream weak_shift "$WEAK" "${SHIFT[@]}"
  stream strong_below0.8 "$STRONG" --feedback below0.8 ) &
wait
"$PY" benchmarks/online/report.py --streams "$OUT" \
    --settings weak weak_auxol weak_every2 weak_below0.8 weak_shift strong_shift strong strong_below0.8 \
    --out reports/data/online
