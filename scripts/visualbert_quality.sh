#!/usr/bin/env bash
# The README's VisualBERT quality table: pre-training + fine-tuning vs the same architecture fine-tuned from
# scratch with the same fine-tuning steps, on the built-in data, plus the majority baselines. One thread.
# Usage: scripts/visualbert_quality.sh OUT [PRETRAIN_STEPS] [FINETUNE_STEPS]   (about 40 min on one core)
set -euo pipefail
OUT=${1:?give an output folder}; PRE=${2:-400}; FT=${3:-300}
export OMP_NUM_THREADS=1
V="python -m vlmkit"
COMMON="batch_size=16 log_every=50 threads=1 save_every=100000"
[ -f "$OUT/data/train.jsonl" ] || $V data synth --out "$OUT/data" --n 2000 --no-progress
$V baseline vqa-majority --train "$OUT/data/train.jsonl" --data "$OUT/data/test.jsonl" > "$OUT/vqa-majority.json"
$V baseline reasoning-majority --train "$OUT/data/train.jsonl" --data "$OUT/data/test.jsonl" > "$OUT/reasoning-majority.json"
$V train --recipe visualbert-tiny --data "$OUT/data/train.jsonl" --out "$OUT/pretrain" steps=$PRE $COMMON > "$OUT/pretrain.json"
for task in vqa reasoning; do
  $V train --recipe visualbert-tiny --data "$OUT/data/train.jsonl" --out "$OUT/$task-pretrained" --init "$OUT/pretrain" \
     task=$task steps=$FT $COMMON > "$OUT/$task-pretrained.train.json"
  $V train --recipe visualbert-tiny --data "$OUT/data/train.jsonl" --out "$OUT/$task-scratch" \
     task=$task steps=$FT $COMMON > "$OUT/$task-scratch.train.json"
  for run in pretrained scratch; do
    $V eval $task --model "$OUT/$task-$run" --data "$OUT/data/test.jsonl" > "$OUT/$task-$run.json"
  done
done
tail -n +1 "$OUT"/*.json
