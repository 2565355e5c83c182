"""`vlmkit train --recipe NAME --data TRAIN.jsonl --out RUN [--resume] [key=value ...]`;
`vlmkit train --recipe NAME --dry-run [--gpus N] [--data TRAIN.jsonl]` counts and sizes the run instead."""
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
    parser.add_argument("--out", help="run folder to create (or to continue with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    parser.add_argument("--init", metavar="RUN", help="start from the weights of a trained run of the same family (the "
                        "recipe key init=RUN): fine-tune a pre-trained fusion encoder with task=vqa|reasoning|retrieval")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device and print its parameter count and a per-GPU memory "
                        "estimate (JSON on stdout), then exit without training or writing anything; --data is optional")
    parser.add_argument("--gpus", type=int, default=1, help="with --dry-run: GPUs the estimate divides over (FSDP shards over them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from vlmkit.cli import print_json
    from vlmkit.errors import UserError
    from vlmkit.train.recipe import build_recipe, load_recipe, parse_overrides
    from vlmkit.train.trainer import RECIPE_FILE, Trainer

    overrides = parse_overrides(args.overrides)
    if args.init is not None:
        if overrides.get("init", args.init) != args.init:
            raise UserError(f"--init {args.init} and init={overrides['init']} name two runs; give one of them")
        overrides["init"] = args.init
    if args.dry_run:
        return _dry_run(args, overrides)
    if not args.out:
        raise UserError("train needs --out RUN (the run folder to create or, with --resume, to continue)")
    run = Path(args.out)
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a run folder; give a folder path")
    from vlmkit.io import check_parent_folders

    check_parent_folders(run, "--out")  # a path through a file, or an unwritable folder
    if args.resume:
        saved_path = run / RECIPE_FILE
        if not saved_path.exists():
            raise UserError(f"--resume: {run} is not a vlmkit run folder (no {RECIPE_FILE}); check --out")
        saved = _saved_recipe(saved_path)
        data = args.data or saved.get("data")
        if not isinstance(data, str):
            raise UserError(f"--resume: {saved_path} does not say which data the run trained on; give it with --data")
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


def _saved_recipe(path: Path) -> dict:
    """The recipe a run saved (recipe.json), or one clear line when it is damaged."""
    from vlmkit.errors import UserError

    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--resume: {path} cannot be read ({error}); the run folder is damaged, "
                        f"restore the file or train a new run with another --out") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {path} holds {type(saved).__name__}, not a recipe mapping; the run folder is damaged, "
                        f"restore the file or train a new run with another --out")
    return saved


def _dry_run(args: argparse.Namespace, overrides: dict) -> int:
    """Count the recipe's model and estimate its per-GPU training memory; writes nothing."""
    import sys

    from vlmkit.cli import print_json
    from vlmkit.errors import UserError
    from vlmkit.train.estimate import estimate, summary_lines
    from vlmkit.train.recipe import load_recipe

    if args.resume:
        raise UserError("--dry-run sizes a new run from --recipe; leave out --resume")
    if not args.recipe:
        raise UserError("--dry-run needs --recipe")
    result = estimate(load_recipe(args.recipe, overrides), gpus=args.gpus, data=args.data)
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    print_json(result)
    return 0
