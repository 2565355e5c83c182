"""Does a LLaVA run locate objects? Its spatial-relation answers, short and reasoned, on built-in data.

For every relation question ("is the A left of the B?") of the first `--records` records of a
`vlmkit data synth` JSONL, the run is asked twice about the same image:
  short     the question itself, with LLaVA-1.5's single-word instruction (what `vlmkit eval vqa` asks);
  reasoned  "Where is the A relative to the B? Explain your reasoning." (the generator's relation
            dialogues), whose "... so it is <relation> the B" is compared with the relation the two
            boxes give (the larger of the horizontal and vertical centre offsets: left of, right of,
            above, below; four answers, chance 0.25 when the model does not locate the objects).
Prints one JSON object: the two accuracies and their counts.

    PYTHONPATH=src .venv/bin/python benchmarks/probe_llava_relations.py RUN DATA/test.jsonl [--records 150]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

import vlmkit
from vlmkit.data.synthetic import box_relation

QUESTION = re.compile(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?")
REASONED = re.compile(r"so it is (?:to the )?(left of|right of|above|below)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("data")
    parser.add_argument("--records", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    model = vlmkit.load(args.run).eval()
    folder = Path(args.data).parent
    items = []  # (image path, A, asked relation, B, answer, the boxes' relation of A to B)
    with open(args.data) as lines:
        for _, line in zip(range(args.records), lines):
            record = json.loads(line)
            boxes = {obj["name"]: obj["box"] for obj in record["objects"]}
            for qa in record["qa"]:
                match = QUESTION.fullmatch(qa["question"]) if qa["type"] == "relation" else None
                if match:
                    a, asked, b = match.groups()
                    items.append((str(folder / record["image"]), a, asked, b, qa["answer"], box_relation(boxes[a], boxes[b])))
    short_right = reasoned_right = 0
    with torch.no_grad():
        for start in range(0, len(items), args.batch):
            chunk = items[start:start + args.batch]
            pixels = model.preprocess([item[0] for item in chunk])
            short = model.answer(pixels, [f"is the {a} {asked} the {b}?" for _, a, asked, b, _, _ in chunk])
            reasoned = model.generate(pixels, prompt=[f"Where is the {a} relative to the {b}? Explain your reasoning."
                                                      for _, a, _, b, _, _ in chunk], max_new_tokens=60)
            for (_, _, _, _, answer, truth), said, text in zip(chunk, short, reasoned):
                short_right += said.strip().lower().rstrip(".") == answer
                found = REASONED.search(text)
                reasoned_right += found is not None and found.group(1) == truth
    n = len(items)
    print(json.dumps({"questions": n, "short_answer_accuracy": round(short_right / max(n, 1), 3),
                      "reasoned_relation_accuracy": round(reasoned_right / max(n, 1), 3), "reasoned_chance": 0.25}))


if __name__ == "__main__":
    main()
