#!/usr/bin/env bash
# The README's two-stream quality rows (LXMERT, ViLBERT): pre-training + fine-tuning vs the same
# architecture fine-tuned from scratch with the same fine-tuning steps, on the built-in data, with the
# majority baselines. One thread. Usage:
#   scripts/twostream_quality.sh RECIPE OUT [PRETRAIN_STEPS] [FINETUNE_STEPS] [DATA_DIR]
# RECIPE is lxmert-tiny or vilbert-tiny; DATA_DIR (made when missing) can be shared between recipes.
set -euo pipefail
RECIPE=${1:?give a recipe (lxmert-tiny or vilbert-tiny)}; OUT=${2:?give an output folder}
PRE=${3:-300}; FT=${4:-200}; DATA=${5:-$OUT/data}
export OMP_NUM_THREADS=1
V="python -m vlmkit"
COMMON="batch_size=16 log_every=50 threads=1 save_every=100000"
mkdir -p "$OUT"
[ -f "$DATA/train.jsonl" ] || $V data synth --out "$DATA" --n 2000 --no-progress
$V baseline vqa-majority --train "$DATA/train.jsonl" --data "$DATA/test.jsonl" > "$OUT/vqa-majority.json"
$V baseline reasoning-majority --train "$DATA/train.jsonl" --data "$DATA/test.jsonl" > "$OUT/reasoning-majority.json"
[ -f "$OUT/pretrain/model.safetensors" ] ||  # a rerun keeps a finished pre-training
  $V train --recipe "$RECIPE" --data "$DATA/train.jsonl" --out "$OUT/pretrain" steps=$PRE $COMMON > "$OUT/pretrain.json"
for task in vqa reasoning; do
  $V train --recipe "$RECIPE" --data "$DATA/train.jsonl" --out "$OUT/$task-pretrained" --init "$OUT/pretrain" \
     task=$task steps=$FT $COMMON > "$OUT/$task-pretrained.train.json"
  $V train --recipe "$RECIPE" --data "$DATA/train.jsonl" --out "$OUT/$task-scratch" \
     task=$task steps=$FT $COMMON > "$OUT/$task-scratch.train.json"
  for run in pretrained scratch; do
    $V eval $task --model "$OUT/$task-$run" --data "$DATA/test.jsonl" > "$OUT/$task-$run.json"
  done
done
tail -n +1 "$OUT"/*.json
