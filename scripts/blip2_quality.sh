#!/bin/bash
# The README's BLIP-2 quality tables ("BLIP-2 (built-in data)" under Measured): the frozen CLIP tower, stage 1,
# the LM and stage 2 trained with the recipe defaults, then every evaluation and baseline, one thread each.
# usage: scripts/blip2_quality.sh OUT_FOLDER        (VLMKIT=path/to/vlmkit to use another command)
# CAPTION_IMAGES / VQA_IMAGES: the test images (the first N of test.jsonl) stage 2 and its baselines are scored
# on; 0 = all 1,600. A finished run leaves RUN/DONE and is not trained again.
# Measured 2026-12-03 (README tables): every part, stage 1 and stage 2.
set -euo pipefail
OUT=${1:?usage: $0 OUT_FOLDER}
CAPTION_IMAGES=${CAPTION_IMAGES:-400}; VQA_IMAGES=${VQA_IMAGES:-100}
export OMP_NUM_THREADS=1
V=${VLMKIT:-vlmkit}
mkdir -p "$OUT" && cd "$OUT"
[ -f synth/train.jsonl ] || $V data synth --out synth
first() { if [ "$2" = 0 ]; then cat "$1"; else head -n "$2" "$1"; fi; }
first synth/test.jsonl "$CAPTION_IMAGES" > synth/test_caption.jsonl
first synth/test.jsonl "$VQA_IMAGES" > synth/test_vqa.jsonl
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
train() { local out=$1; shift; [ -f "$out/DONE" ] || { $V train --out "$out" threads=1 "$@" && touch "$out/DONE"; }; }

step clip-vit-tiny
train clip-vit-tiny --recipe clip-vit-tiny --data synth/train.jsonl
$V eval zeroshot  --model clip-vit-tiny --data synth/test.jsonl > clip-zeroshot.json
$V eval retrieval --model clip-vit-tiny --data synth/test.jsonl > clip-retrieval.json

step blip2-tiny-stage1
train stage1 --recipe blip2-tiny-stage1 --data synth/train.jsonl init_image=clip-vit-tiny
$V eval zeroshot  --model stage1 --data synth/test.jsonl > stage1-zeroshot.json
$V eval retrieval --model stage1 --data synth/test.jsonl --rerank-k 16 > stage1-retrieval.json  # ITC-only figures under "itc"

step lm-tiny
train lm-tiny --recipe lm-tiny --data synth/train.jsonl

step blip2-tiny-stage2
train stage2 --recipe blip2-tiny-stage2 --data synth/train.jsonl init_text=lm-tiny init_image=stage1
$V baseline caption-nn --train synth/train.jsonl --data synth/test_caption.jsonl > caption-nn.json
$V eval caption --model stage2 --data synth/test_caption.jsonl > stage2-caption.json
$V eval caption --model stage2 --data synth/test_caption.jsonl --beams 3 > stage2-caption-beams3.json
$V baseline vqa-majority --train synth/train.jsonl --data synth/test_vqa.jsonl > vqa-majority.json
$V eval vqa --model stage2 --data synth/test_vqa.jsonl > stage2-vqa.json
step done
grep -H . ./*.json
