"""Can the language model learn the built-in VQA questions from *perfect* perception? An oracle probe.

llava-tiny answers spatial-relation questions at chance. This probe takes the vision tower out of the
question: each image is replaced by oracle scene tokens built from its record's `objects` (names and
boxes), projected by a trainable 2-layer MLP into the LM's input, where LLaVA's projected image tokens
go: `[bos] scene tokens question answer [eos]`, trained with the LM loss on the answer and end token
only (everything else -100), as LLaVA's stage 2 trains the LM and the projector.

  --tokens objects  one token per object (up to 4; padded with zeros): one-hot colour and shape, and the
                    position of its box centre;
  --tokens grid     G x G tokens in raster order (`--grid G`, default 8: 8 px cells of a 64 px image), a
                    cell = one-hot colour and shape of the object covering the cell's centre (zeros for
                    the background), and the cell's position.
  --positions       how a position is given: two scalars in [0, 1] (`scalar`), one-hot column and row
                    bins of 1/G of the image (`bins`), or not at all (`none`: with `grid`, as in a vision
                    tower whose patches carry no position, the LM's own positions along the sequence,
                    rotary or learned, are all it has).
  --background      what a grid cell no object covers holds: its position features (`positions`, the
                    default, as a vision tower's background patches carry its position embedding) or
                    nothing at all (`zero`).
  --layout          `scene-first` (the default, LLaVA's `<image>` before the question) or
                    `question-first` (`[bos] question scene tokens answer [eos]`: the scene tokens can
                    attend to the question).

Question types: the records' own (`relation`: "is the A left of the B?" yes / no; `color`, `shape`,
`count`, `yesno`), and `side`, a first-order position question derived from the boxes ("is the A on
the left or the right?" -> left / right, "is the A at the top or the bottom?", for every object of a
several-object scene at least 8 px off the centre line; `--side-single` trains on them for one-object
scenes too, where no other object competes: the test keeps several-object scenes; `--curriculum N`: the
first N steps train on the one-object scenes' questions alone, side questions included, then on the whole
training set). Accuracy on the test records is closed-set:
the answer whose first token scores highest among the type's answers (yes / no; a side question's
two; every colour, shape or count the test answers hold); the majority answer per type is printed next to it.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_lm_spatial.py DATA RUN_OR_SCRATCH \
        [--types relation,side] [--tokens objects|grid] [--positions bins|scalar|none] [--grid 8]
        [--background positions|zero] [--layout scene-first|question-first] [--side-single] [--curriculum N] [--steps 2000] [--lr 1e-3]

`RUN_OR_SCRATCH`: an `lm` run (`vlmkit train --recipe lm-tiny`), or `scratch:W,D,H` for a fresh
Llama-style LM of width W, depth D and H heads on that run's tokenizer (`--tokenizer-from RUN`).
`DATA` is a `vlmkit data synth` folder (train.jsonl, test.jsonl). Prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vlmkit
from vlmkit.encoders.lm import DecoderLM

MARGIN = 8  # the side questions' distance from the centre line, px


def scene_tokens(objects: list[dict], colors: list[str], shapes: list[str], tokens: str, positions: str, size: int,
                 grid_size: int = 8, background: str = "positions") -> torch.Tensor:
    """Oracle features of one scene: (4, F) object tokens or (G*G, F) grid tokens (G = `grid_size` cells
    a side; `background="zero"`: the cells no object covers are all zeros, position included)."""
    cells, cell = grid_size, size / grid_size
    kinds = len(colors) + len(shapes)
    extra = {"none": 0, "scalar": 2, "bins": 2 * cells}[positions]

    def position(cx: float, cy: float) -> torch.Tensor:  # (extra,): a centre in [0, 1]^2 as scalars or bins
        features = torch.zeros(extra)
        if positions == "scalar":
            features[0], features[1] = cx, cy
        elif positions == "bins":
            features[min(cells - 1, int(cx * cells))] = 1
            features[cells + min(cells - 1, int(cy * cells))] = 1
        return features

    if tokens == "grid":
        grid = torch.zeros(cells * cells, kinds + extra)
        for row in range(cells):
            for col in range(cells):
                grid[row * cells + col, kinds:] = position((col + 0.5) / cells, (row + 0.5) / cells)
        for obj in objects:
            color, shape = obj["name"].split()
            x0, y0, x1, y1 = obj["box"]
            for row in range(cells):
                for col in range(cells):
                    cx, cy = col * cell + cell / 2, row * cell + cell / 2
                    if x0 <= cx <= x1 and y0 <= cy <= y1:
                        grid[row * cells + col, :kinds] = 0
                        grid[row * cells + col, colors.index(color)] = 1
                        grid[row * cells + col, len(colors) + shapes.index(shape)] = 1
        if background == "zero":
            grid[grid[:, :kinds].sum(dim=1) == 0] = 0
        return grid
    rows = torch.zeros(4, kinds + extra)
    for index, obj in enumerate(objects[:4]):
        color, shape = obj["name"].split()
        x0, y0, x1, y1 = obj["box"]
        rows[index, colors.index(color)] = 1
        rows[index, len(colors) + shapes.index(shape)] = 1
        rows[index, kinds:] = position((x0 + x1) / 2 / size, (y0 + y1) / 2 / size)
    return rows


def side_questions(objects: list[dict], size: int, single: bool = False) -> list[tuple[str, str]]:
    """First-order position questions about each object of a several-object scene (`single`: of a
    one-object scene too), off the centre lines."""
    if len(objects) < (1 if single else 2):
        return []
    questions = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if abs(cx - size / 2) >= MARGIN:
            questions.append((f"is the {obj['name']} on the left or the right?", "left" if cx < size / 2 else "right"))
        if abs(cy - size / 2) >= MARGIN:
            questions.append((f"is the {obj['name']} at the top or the bottom?", "top" if cy < size / 2 else "bottom"))
    return questions


def load_split(path, meta: dict, args, limit: int | None = None, single_side: bool = False,
               one_object: bool = False) -> list[tuple[torch.Tensor, str, str, str]]:
    """(scene tokens, question, answer, type) of every wanted question of the split (`single_side`:
    side questions about one-object scenes too; `one_object`: the one-object scenes' questions only)."""
    size = meta["image_size"]
    items = []
    with open(path) as lines:
        for line in lines:
            record = json.loads(line)
            if one_object and len(record["objects"]) != 1:
                continue
            questions = [(qa["question"], qa["answer"], qa["type"]) for qa in record.get("qa") or [] if qa["type"] in args.types]
            if "side" in args.types:
                questions += [(question, answer, "side") for question, answer in side_questions(record["objects"], size, single_side or one_object)]
            if not questions:
                continue  # no scene tokens built for a record nothing is asked about
            scene = scene_tokens(record["objects"], meta["colors"], meta["shapes"], args.tokens, args.positions, size, args.grid,
                                 args.background)
            items += [(scene, question, answer, kind) for question, answer, kind in questions]
            if limit and len(items) >= limit:
                break
    return items


def candidate_key(question: str, kind: str) -> str:
    """Which closed answer set a question chooses from: its type's, the side questions' per axis."""
    return f"side:{'x' if 'left or the right' in question else 'y'}" if kind == "side" else kind


def answer_counts(items) -> dict[tuple[str, str], collections.Counter]:
    """How often each answer occurs, per (type, answer set): an answer set is what a question chooses
    from (relation: yes / no; side: the axis' two; colour, shape, count: every answer of its type)."""
    counts = collections.defaultdict(collections.Counter)
    for _, question, answer, kind in items:
        counts[kind, candidate_key(question, kind)][answer] += 1
    return counts


class Probe:
    """The LM, the scene projector and the sequence layout."""

    def __init__(self, lm: DecoderLM, tokenizer, lm_config, features: int, question_first: bool = False) -> None:
        self.lm, self.tokenizer, self.config, self.question_first = lm, tokenizer, lm_config, question_first
        width = lm_config.width
        self.projector = torch.nn.Sequential(torch.nn.Linear(features, width), torch.nn.GELU(), torch.nn.Linear(width, width))

    def parameters(self):
        return list(self.lm.parameters()) + list(self.projector.parameters())

    def inputs(self, items, with_answers: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Input embeddings (B, S + L, D) = [bos] scene question [answer eos] (`question_first`: [bos]
        question scene [answer eos]), right-padded; the targets (B, S + L), -100 but at the answer and
        end tokens' predicting positions; and each row's last prompt position (where the first answer
        token is predicted)."""
        config = self.config
        rows = []
        for _, question, answer, _ in items:
            question_ids = [config.bos_token_id] + self.tokenizer.encode(question, add_special_tokens=False)
            answer_ids = self.tokenizer.encode(answer, add_special_tokens=False) + [config.eos_token_id] if with_answers else []
            rows.append((question_ids, answer_ids))
        scenes = torch.stack([item[0] for item in items])  # (B, S, F)
        num_scene = scenes.shape[1]
        length = max(len(q) + len(a) for q, a in rows)
        ids = torch.full((len(rows), length), config.pad_token_id)
        targets = torch.full((len(rows), num_scene + length), -100)
        for row, (question_ids, answer_ids) in enumerate(rows):
            ids[row, : len(question_ids) + len(answer_ids)] = torch.tensor(question_ids + answer_ids)
            for offset, token in enumerate(answer_ids):  # answer token k sits at S + len(q) + k, predicted one before
                targets[row, num_scene + len(question_ids) + offset - 1] = token
        text = self.lm.embed_tokens(ids)  # (B, L, D)
        scene = self.projector(scenes)  # (B, S, D)
        if self.question_first:  # each row: its question, the scene, then its answer and padding
            embeds = torch.stack([torch.cat([text[row, :len(question_ids)], scene[row], text[row, len(question_ids):]])
                                  for row, (question_ids, _) in enumerate(rows)])
        else:
            embeds = torch.cat([text[:, :1], scene, text[:, 1:]], dim=1)
        return embeds, targets, [num_scene + len(question_ids) - 1 for question_ids, _ in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("lm", help="an lm run, or scratch:W,D,H")
    parser.add_argument("--tokenizer-from", default=None, help="the lm run whose tokenizer and ids a scratch LM uses")
    parser.add_argument("--types", default="relation,side")
    parser.add_argument("--tokens", choices=("objects", "grid"), default="objects")
    parser.add_argument("--positions", choices=("none", "scalar", "bins"), default="bins")
    parser.add_argument("--grid", type=int, default=8, help="grid cells per side (and position bins)")
    parser.add_argument("--background", choices=("positions", "zero"), default="positions",
                        help="what a grid cell no object covers holds")
    parser.add_argument("--layout", choices=("scene-first", "question-first"), default="scene-first")
    parser.add_argument("--side-single", action="store_true",
                        help="train on side questions about one-object scenes too (the test asks them of several-object scenes only)")
    parser.add_argument("--curriculum", type=int, default=0, metavar="N",
                        help="the first N steps train on the one-object scenes' questions only (side questions included), then on all")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-questions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.types = args.types.split(",")
    torch.manual_seed(args.seed)
    scratch = args.lm.startswith("scratch:")
    if scratch and not args.tokenizer_from:
        parser.error("a scratch LM takes its tokenizer and token ids from an lm run: add --tokenizer-from RUN")
    if args.background != "positions" and args.tokens != "grid":
        parser.error("--background says what an uncovered grid cell holds: it needs --tokens grid")
    if args.curriculum < 0:
        parser.error(f"--curriculum is a number of steps (0 or more), got {args.curriculum}")
    base = vlmkit.load(args.tokenizer_from if scratch else args.lm)
    lm, config = base.lm, base.config.lm
    if scratch:
        width, depth, heads = (int(value) for value in args.lm.split(":", 1)[1].split(","))
        config = dataclasses.replace(config, width=width, depth=depth, heads=heads, kv_heads=heads, mlp_hidden=width * 8 // 3)
        lm = DecoderLM.from_config(config)
    meta = json.loads(open(f"{args.data}/meta.json").read())
    train = load_split(f"{args.data}/train.jsonl", meta, args, single_side=args.side_single)
    test = load_split(f"{args.data}/test.jsonl", meta, args, limit=args.test_questions)
    warmup = load_split(f"{args.data}/train.jsonl", meta, args, one_object=True) if args.curriculum else []
    if args.curriculum and len(warmup) < args.batch:
        parser.error(f"--curriculum: the training split has {len(warmup)} questions about one-object scenes of these --types, "
                     f"fewer than a batch of {args.batch}")
    probe = Probe(lm, base.tokenizer, config, train[0][0].shape[1], question_first=args.layout == "question-first")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.0)
    rng, losses, started = random.Random(args.seed), [], time.time()
    lm.train()
    for step in tqdm(range(args.steps), desc="probe", file=sys.stderr):
        pool = warmup if step < args.curriculum else train
        embeds, targets, _ = probe.inputs(rng.sample(pool, args.batch), with_answers=True)
        if step == 0:  # the layout's own check: every target is the token the next position holds
            rows, positions = (targets != -100).nonzero(as_tuple=True)
            assert torch.equal(embeds[rows, positions + 1], lm.embed_tokens(targets[rows, positions])), "targets misaligned"
        loss = F.cross_entropy(lm(inputs_embeds=embeds).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    lm.eval()
    counts = answer_counts(test)
    candidates = {key: sorted(counter) for (_, key), counter in counts.items()}
    first_token = {answer: probe.tokenizer.encode(answer, add_special_tokens=False)[0] for names in candidates.values() for answer in names}
    for names in candidates.values():
        if len({first_token[name] for name in names}) < len(names):
            sys.exit(f"error: the answers {sorted(names)} share a first token; this probe scores first tokens only")
    right = collections.defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(test), 64):
            chunk = test[start:start + 64]
            embeds, _, last = probe.inputs(chunk, with_answers=False)
            logits = lm(inputs_embeds=embeds)  # (B, T, V)
            for row, (_, question, answer, kind) in enumerate(chunk):
                names = candidates[candidate_key(question, kind)]
                scores = logits[row, last[row], [first_token[name] for name in names]]
                right[kind].append(names[int(scores.argmax())] == answer)
    # The majority answer per type: within each answer set (a side question's axis), its most frequent answer.
    majority = {kind: sum(max(c.values()) for (of, _), c in counts.items() if of == kind) / len(hits) for kind, hits in right.items()}
    window = max(1, args.steps // 10)
    print(json.dumps({
        "lm": args.lm, "tokens": args.tokens, "positions": args.positions, "grid": args.grid,
        "background": args.background, "layout": args.layout, "side_single": args.side_single, "curriculum": args.curriculum,
        "types": args.types, "steps": args.steps, "lr": args.lr, "seed": args.seed,
        "accuracy": {kind: round(sum(hits) / len(hits), 3) for kind, hits in sorted(right.items())},
        "majority": {kind: round(value, 3) for kind, value in sorted(majority.items())},
        "questions": {kind: len(hits) for kind, hits in sorted(right.items())},
        "train_loss": [round(sum(losses[i:i + window]) / len(losses[i:i + window]), 4) for i in range(0, len(losses), window)],
        "seconds": round(time.time() - started),
    }))


if __name__ == "__main__":
    main()
