"""Generative verbs: `vlmkit caption`, `vlmkit ask`, `vlmkit baseline`, and `vlmkit eval caption|vqa|reasoning|perplexity`.

Importing this module registers the eval sub-verbs with `vlmkit.tasks.cli.evaluation`
(tasks.cli imports it, as one of its EVALUATION_MODULES, before it builds the `eval` parser).
Every verb prints one JSON object on stdout.
"""
from __future__ import annotations

from vlmkit.capabilities import Answers, Generates, provides

import argparse

from vlmkit.tasks.cli import evaluation


def _decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--beams", type=int, default=None, help="beam search with this many beams (default: greedy)")
    group.add_argument("--max-new-tokens", type=int, default=None)
    group.add_argument("--min-new-tokens", type=int, default=None)
    group.add_argument("--length-penalty", type=float, default=None)
    group.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--repetition-penalty", type=float, default=None)
    group.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    group.add_argument("--batch-size", type=int, default=None)


def _decoding(args: argparse.Namespace) -> dict:
    settings = {
        "num_beams": args.beams, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
        "length_penalty": args.length_penalty, "do_sample": True if args.sample else None,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "seed": args.seed,
    }
    return {key: value for key, value in settings.items() if value is not None}


def _batch(args, default: int) -> dict:
    return {"batch_size": args.batch_size or default}


def _model(path: str):
    import vlmkit

    return vlmkit.load(path)


def _records(path: str, what: str | None = None):
    """Records of `path`; for an evaluation (`what`), those whose image cannot be used are left
    out and counted on stderr (vlmkit.data.formats.usable_records)."""
    from vlmkit.data.formats import read_records, usable_records

    records = read_records(path)
    return records if what is None else usable_records(records, what)


def _guided_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guided decoding (a text-only LM, optionally steered by an image-text model)")
    group.add_argument("--decoding", choices=["model", "contrastive", "magic"], default="model",
                       help="model: the model's own decoding; contrastive: contrastive search of a text-only LM (no image); "
                       "magic: contrastive search guided by --guide's image-text similarity (MAGIC)")
    group.add_argument("--guide", default=None, help="magic: a model folder that embeds images and texts (a CLIP run)")
    group.add_argument("--alpha", type=float, default=None, help="degeneration penalty weight (default 0.1, MAGIC's)")
    group.add_argument("--beta", type=float, default=None, help="magic: weight of the image-text term (default 2.0)")
    group.add_argument("--k", type=int, default=None, help="candidates per step (default 45, MAGIC's)")


def _captioner(args):
    """The model of `--model`, or, with `--decoding contrastive|magic`, that LM decoding guided by `--guide`."""
    from vlmkit.errors import UserError

    decoding = getattr(args, "decoding", "model")
    if decoding == "model":
        for option in ("guide", "alpha", "beta", "k"):
            if getattr(args, option, None) is not None:
                raise UserError(f"--{option} applies to --decoding contrastive or magic; add one or drop --{option}")
        return _model(args.model)
    from vlmkit.tasks import guided

    if decoding == "magic" and not args.guide:
        raise UserError("--decoding magic needs --guide CLIP_RUN, a model that embeds images and texts")
    if decoding == "contrastive" and args.guide:
        raise UserError("--decoding contrastive uses no image; drop --guide, or use --decoding magic")
    if args.beta is not None and decoding != "magic":
        raise UserError("--beta weighs the guide of --decoding magic; drop it")
    settings = {"k": args.k, "alpha": args.alpha, "beta": args.beta if decoding == "magic" else 0.0}
    lm = _model(args.model)
    guide = _model(args.guide) if args.guide else None
    return guided.GuidedCaptioner(lm, guide, **{key: value for key, value in settings.items() if value is not None})


def _eval_caption(args) -> dict:
    from vlmkit.tasks.generative import evaluate_caption

    model = _captioner(args)
    support = _support(args, "caption support set")
    return evaluate_caption(model, _records(args.data, "caption evaluation"), **_batch(args, 64), shots=args.shots,
                            support=support, seed=args.shots_seed, **_selection(args), **_decoding(args))


def _support(args, what: str):
    """The --support records when --shots asks for examples (a clear error without them)."""
    if args.shots and not args.support:
        from vlmkit.errors import UserError

        raise UserError(f"--shots {args.shots} needs --support TRAIN_RECORDS to draw the in-context examples from")
    return _records(args.support, what) if args.shots else None


def _eval_vqa(args) -> dict:
    from vlmkit.tasks.generative import evaluate_vqa

    model = _model(args.model)
    decoding = _decoding(args)
    if not provides(model, Generates) and decoding:
        from vlmkit.errors import UserError

        raise UserError(f"decoding options apply to generative models; the '{model.family}' model classifies answers, drop them")
    if args.shots and not args.support:
        from vlmkit.errors import UserError

        raise UserError(f"--shots {args.shots} needs --support TRAIN_RECORDS to draw the in-context examples from")
    support = _records(args.support, "vqa support set") if args.shots else None
    return evaluate_vqa(model, _records(args.data, "vqa evaluation"), **_batch(args, 16), shots=args.shots, support=support,
                        seed=args.shots_seed, **_selection(args), **decoding)


def _eval_reasoning(args) -> dict:
    from vlmkit.tasks.generative import evaluate_reasoning

    return evaluate_reasoning(_model(args.model), _records(args.data, "reasoning evaluation"), **_batch(args, 128))


def _eval_perplexity(args) -> dict:
    from vlmkit.tasks.perplexity import evaluate_perplexity, read_texts

    model = _model(args.model)
    return evaluate_perplexity(model, read_texts(args.data, model), **_batch(args, 64))


def _selection_arguments(group) -> None:
    group.add_argument("--examples", choices=["random", "similar"], default="random",
                       help="random draws, or the most similar support examples (RICES: image similarity, plus question "
                       "similarity for VQA)")
    group.add_argument("--retriever", default=None, help="--examples similar: a run that embeds images (a CLIP run) to "
                       "compare them by (default: downsampled pixels)")


def _selection(args) -> dict:
    """`examples=` and `retriever=` of the --shots evaluations (checked where they are used: tasks.generative)."""
    return {"examples": args.examples, "retriever": _model(args.retriever) if args.retriever else None}


def _caption_arguments(parser: argparse.ArgumentParser) -> None:
    _decoding_arguments(parser)
    _guided_arguments(parser)
    group = parser.add_argument_group("in-context examples")
    group.add_argument("--shots", type=int, default=0, help="examples (image, caption) before each image")
    group.add_argument("--support", default=None, help="records the examples are drawn from (the training data)")
    group.add_argument("--shots-seed", type=int, default=0, help="seed of the example draws")
    _selection_arguments(group)


_eval_caption.arguments = _caption_arguments


def _vqa_arguments(parser: argparse.ArgumentParser) -> None:
    _decoding_arguments(parser)
    group = parser.add_argument_group("in-context examples")
    group.add_argument("--shots", type=int, default=0, help="examples (image, question, answer) before each question")
    group.add_argument("--support", default=None, help="records the examples are drawn from (the training data)")
    group.add_argument("--shots-seed", type=int, default=0, help="seed of the example draws")
    _selection_arguments(group)


_eval_vqa.arguments = _vqa_arguments
_eval_reasoning.arguments = lambda parser: parser.add_argument("--batch-size", type=int, default=None)
evaluation("caption", "caption metrics (BLEU-1..4, ROUGE-L, CIDEr) of generated captions")(_eval_caption)
evaluation("vqa", "VQA accuracy, overall and per question type")(_eval_vqa)
_eval_perplexity.arguments = lambda parser: parser.add_argument("--batch-size", type=int, default=None)
evaluation("perplexity", "perplexity of a language model on texts (a .txt file or records)")(_eval_perplexity)
evaluation("reasoning", "true/false accuracy on statements about each image")(_eval_reasoning)


def register(subparsers) -> None:
    from vlmkit.tasks.cli import _printing

    caption = subparsers.add_parser("caption", help="caption images with a generative model")
    caption.add_argument("images", nargs="+")
    caption.add_argument("--model", required=True, help="run folder")
    caption.add_argument("--prompt", default=None, help="text the caption continues (default: none)")
    _caption_arguments(caption)
    caption.set_defaults(func=_printing(_caption))

    ask = subparsers.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="run folder")
    _decoding_arguments(ask)
    ask.set_defaults(func=_printing(_ask))

    baseline = subparsers.add_parser("baseline", help="model-free baselines: caption-nn, vqa-majority, reasoning-majority")
    baseline.add_argument("kind", choices=["caption-nn", "vqa-majority", "reasoning-majority"])
    baseline.add_argument("--train", required=True, help="training records the baseline borrows from")
    baseline.add_argument("--data", required=True, help="evaluation records")
    baseline.add_argument("--k", type=int, default=5, help="caption-nn: neighbours for the consensus caption")
    baseline.set_defaults(func=_printing(_baseline))


def _load_images(paths):
    from vlmkit.data.formats import load_image

    return [load_image(path) for path in paths]  # a bad path fails here, naming it


def _caption(args) -> dict:
    images = _load_images(args.images)
    model = _captioner(args)
    model.require(Generates, task="caption")
    decoding = _decoding(args)
    size = (args.batch_size or 32)
    draw = None
    if args.shots:  # in-context examples before each image, as `eval caption --shots` puts them
        from vlmkit.tasks.generative import _caption_drawer

        if args.prompt is not None:
            from vlmkit.errors import UserError

            raise UserError("--prompt and --shots do not combine: the examples are the prompt; drop one")
        draw = _caption_drawer(model, _support(args, "caption support set"), args.shots, args.shots_seed,
                               **_selection(args))
    captions = []
    for start in range(0, len(images), size):
        pixels = model.preprocess(images[start : start + size]).to(model.device)
        if draw is None:
            captions += model.generate(pixels, prompt=args.prompt, **decoding)
        else:
            captions += model.caption_in_context(pixels, draw(args.images[start : start + size]), **decoding)
    return {"captions": [{"image": path, "caption": text} for path, text in zip(args.images, captions)]}


def _ask(args) -> dict:
    images = _load_images([args.image])
    model = _model(args.model)
    model.require(Answers, task="ask")
    answer = model.answer(model.preprocess(images).to(model.device), [args.question], **_decoding(args))[0]
    return {"image": args.image, "question": args.question, "answer": answer}


def _baseline(args) -> dict:
    from vlmkit.tasks.generative import evaluate_caption_baseline, evaluate_reasoning_baseline, evaluate_vqa_baseline

    train, data = _records(args.train, "baseline (--train)"), _records(args.data, "baseline (--data)")
    if args.kind == "caption-nn":
        return evaluate_caption_baseline(train, data, k=args.k)
    if args.kind == "reasoning-majority":
        return evaluate_reasoning_baseline(train, data)
    return evaluate_vqa_baseline(train, data)
