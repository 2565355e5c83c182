#!/bin/bash
# The README's VisualGPT data-efficiency and MAGIC tables (section "VisualGPT and MAGIC").
# usage: benchmarks/captioning_on_the_lm.sh OUT_FOLDER     (one thread per run; runs in parallel are fine)
# Steps are kept small (100 x 12 samples) because the measured runs shared 2 CPU cores with ~20 processes;
# raise STEPS / BATCH for a better-trained comparison.
set -euo pipefail
OUT=${1:?usage: $0 OUT_FOLDER}
STEPS=${STEPS:-100}; BATCH=${BATCH:-12}; TEST_IMAGES=${TEST_IMAGES:-100}
export OMP_NUM_THREADS=1
mkdir -p "$OUT" && cd "$OUT"
[ -f synth/train.jsonl ] || vlmkit data synth --out synth
# Captions only (no images, no questions) for the LM; seeded 1 / 5 / 10 % subsets of the training images.
python3 - "$TEST_IMAGES" <<'PY'
import json, random, sys
records = [line for line in open("synth/train.jsonl")]
with open("synth/train_captions.jsonl", "w") as out:
    out.writelines(json.dumps({"texts": json.loads(line)["texts"]}) + "\n" for line in records)
order = list(range(len(records))); random.Random(0).shuffle(order)
for percent in (1, 5, 10):
    with open(f"synth/train_p{percent:02d}.jsonl", "w") as out:
        out.writelines(records[i] for i in sorted(order[: len(records) * percent // 100]))
with open("synth/test_head.jsonl", "w") as out:
    out.writelines(open("synth/test.jsonl").readlines()[: int(sys.argv[1])])
PY
vlmkit train --recipe lm-tiny --data synth/train_captions.jsonl --out lm threads=1 training.documents=text
vlmkit train --recipe clip-tiny --data synth/train.jsonl --out clip threads=1 steps=${CLIP_STEPS:-300}   # the measured table used this run's step-100 save
common="steps=$STEPS batch_size=$BATCH warmup_steps=10 save_every=$STEPS threads=1"
for p in 01 05 10; do
  vlmkit train --recipe visualgpt-tiny --data synth/train_p$p.jsonl --out vg-srau-p$p $common init_text=lm
  vlmkit train --recipe visualgpt-tiny --data synth/train_p$p.jsonl --out vg-scratch-p$p $common init_text=null tokenizer=lm model.gate=plain
  for kind in srau scratch; do
    vlmkit eval caption --model vg-$kind-p$p --data synth/test_head.jsonl > vg-$kind-p$p.json
  done
done
# The other two pairings at 5%: pretrained + plain, scratch + SRAU.
vlmkit train --recipe visualgpt-tiny --data synth/train_p05.jsonl --out vg-lm-plain-p05 $common init_text=lm model.gate=plain
vlmkit train --recipe visualgpt-tiny --data synth/train_p05.jsonl --out vg-scratch-srau-p05 $common init_text=null tokenizer=lm
for run in vg-lm-plain-p05 vg-scratch-srau-p05; do vlmkit eval caption --model $run --data synth/test_head.jsonl > $run.json; done
vlmkit eval caption --model lm --data synth/test_head.jsonl --decoding contrastive > contrastive.json
vlmkit eval caption --model lm --guide clip --data synth/test_head.jsonl --decoding magic > magic.json
grep -H CIDEr ./*.json
