"""`vlmkit train --recipe NAME --data TRAIN.jsonl --out RUN [--resume] [key=value ...]`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from a recipe",
        description="Train a model from a recipe shipped in vlmkit/configs/ or a YAML file. Extra key=value arguments override recipe "
        "fields (steps=12 save_every=6) or, prefixed with model., the model configuration (model.vision.depth=2).",
    )
    parser.add_argument("--recipe", help="a shipped recipe's name (clip-tiny, siglip-tiny, ...; an unknown name lists them) or a .yaml path (not needed with --resume)")
    parser.add_argument("--data", help="training data: JSONL, CSV or WebDataset shards")
    parser.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from vlmkit.cli import print_json
    from vlmkit.errors import UserError
    from vlmkit.train.recipe import build_recipe, load_recipe, parse_overrides
    from vlmkit.train.trainer import RECIPE_FILE, Trainer

    overrides = parse_overrides(args.overrides)
    run = Path(args.out)
    if args.resume:
        saved_path = run / RECIPE_FILE
        if not saved_path.exists():
            raise UserError(f"--resume: {run} is not a vlmkit run folder (no {RECIPE_FILE}); check --out")
        saved = json.loads(saved_path.read_text())
        data = args.data or saved.pop("data")
        saved.pop("data", None)
        def saved_value(key):
            for prefix, section in (("model.", "model_overrides"), ("training.", "training")):
                if key.startswith(prefix):
                    return (saved.get(section) or {}).get(key[len(prefix):])
            return saved.get(key)

        fixed = sorted(key for key, value in overrides.items()
                       if (key.startswith(("model.", "training.")) or key in ("model", "tokenizer", "vocab_size", "init_text", "init_image"))
                       and value != saved_value(key))
        if fixed:
            raise UserError(f"--resume continues {run} as it was built; {', '.join(fixed)} cannot change now "
                            f"(train a new run with another --out to change them)")
        recipe = build_recipe(saved, overrides, where=f"{saved_path}")
    else:
        if not args.recipe or not args.data:
            raise UserError("train needs --recipe and --data (or --resume with an existing --out)")
        recipe = load_recipe(args.recipe, overrides)
        data = args.data
    summary = Trainer(recipe, data, run, resume=args.resume).train()
    print_json(summary)
    return 0
