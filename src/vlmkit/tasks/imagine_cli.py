"""Text-to-image verbs: `vlmkit imagine` and `vlmkit eval text-to-image`.

Importing this module registers the `eval text-to-image` sub-verb with `vlmkit.tasks.cli.evaluation`
(tasks.cli lists it in EVALUATION_MODULES). Both verbs work for any model that `Imagines`; family
options (`--guidance`, `--steps`, `--sampler`, `--weights` for diffusion, `--temperature`, `--top-k` for
autoregressive families) are passed through only when given, and a family refuses those it does
not take. torch is imported inside the handlers, so registering the parsers stays cheap.
"""
from __future__ import annotations

import argparse

from vlmkit.errors import UserError
from vlmkit.tasks.cli import evaluation


def _family_arguments(parser: argparse.ArgumentParser, guidance_list: bool = False) -> None:
    group = parser.add_argument_group("sampling (family options are passed on only when given)")
    if guidance_list:
        group.add_argument("--guidance", type=float, nargs="+", default=None, metavar="S",
                           help="classifier-free guidance scales to judge, e.g. 1 3 (diffusion families; one entry "
                                "for families without guidance)")
    else:
        group.add_argument("--guidance", type=float, default=None, metavar="S",
                           help="classifier-free guidance scale s: 1 = the conditional model alone, above 1 = guided (diffusion families)")
    group.add_argument("--steps", type=int, default=None, help="sampling steps (diffusion families)")
    group.add_argument("--sampler", default=None, help="ddpm or ddim (diffusion families)")
    group.add_argument("--weights", choices=("ema", "online"), default=None,
                       help="sample with the moving average of the weights (ema, the default where the model keeps "
                            "one) or the trained weights (online; diffusion families)")
    group.add_argument("--temperature", type=float, default=None, help="sampling temperature (autoregressive families)")
    group.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens (autoregressive families)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same images (default 0)")
    group.add_argument("--rerank", default=None, metavar="JUDGE_RUN",
                       help="draw --candidates images per prompt and keep those this model (one that embeds images and "
                            "texts, e.g. a CLIP run) finds most similar to the prompt")
    group.add_argument("--candidates", type=int, default=None, metavar="M", help="candidates per prompt with --rerank (default 4 x n)")
    group.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")


def _options(args: argparse.Namespace, with_guidance: bool = True) -> dict:
    options = {"steps": args.steps, "sampler": args.sampler, "weights": args.weights, "temperature": args.temperature,
               "top_k": args.top_k}
    if with_guidance:
        options["guidance"] = args.guidance
    return {key: value for key, value in options.items() if value is not None}


def _load(path: str, option: str):
    import vlmkit

    try:
        return vlmkit.load(path)
    except UserError as error:
        raise UserError(f"{option} {path}: {error}") from None


def register(subparsers) -> None:
    """Add the `imagine` verb."""
    parser = subparsers.add_parser("imagine", help="generate images from a text prompt (writes a grid PNG and each image)")
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help='what to draw, e.g. "a red triangle"')
    parser.add_argument("--model", required=True, help="run folder of a model that generates images")
    parser.add_argument("--out", required=True,
                        help="grid PNG; each image goes next to it as OUT-NNN.png (missing folders are created)")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    _family_arguments(parser)
    parser.set_defaults(func=_imagine)


def _imagine(args: argparse.Namespace) -> int:
    from vlmkit.cli import print_json
    from vlmkit.io import check_output_file
    from vlmkit.tasks.imagine import check_options, check_prompts, imagine, write_samples

    # Every input check before a model is loaded or an image drawn.
    prompts = check_prompts(args.prompts)
    if args.n < 1:
        raise UserError(f"--n {args.n} asks for no image; give 1 or more images per prompt")
    options = check_options(_options(args))
    if args.candidates is not None and args.rerank is None:
        raise UserError("--candidates chooses among samples with a judge; give --rerank JUDGE_RUN too, or drop it")
    check_output_file(args.out, "--out")
    model = _load(args.model, "--model")
    judge = _load(args.rerank, "--rerank") if args.rerank else None
    images, scores = imagine(model, prompts, n=args.n, seed=args.seed, judge=judge, candidates=args.candidates,
                             batch_size=args.batch_size, **options)
    rows = [prompt for prompt in prompts for _ in range(args.n)]
    captions = rows if scores is None else [f"{p} ({s:.2f})" for p, s in zip(rows, scores.tolist())]
    paths = write_samples(images, captions, args.out, columns=args.n if args.n > 1 else min(8, len(rows)))
    result = {"out": str(args.out), "images": [{"prompt": p, "path": path} for p, path in zip(rows, paths)],
              "options": {**options, "seed": args.seed}}
    if scores is not None:
        for item, score in zip(result["images"], scores.tolist()):
            item["similarity"] = round(score, 4)
    print_json(result)
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", required=True, help="run folder of a model that embeds images and texts (e.g. clip-tiny)")
    parser.add_argument("--n-prompts", type=int, default=100, help="prompts (records with a label) to sample, in file order (default 100)")
    parser.add_argument("--label-key", default="label", help="record field holding the object's name (default: label)")
    parser.add_argument("--templates", help="file with one zero-shot template per line, each with '{}'")
    _family_arguments(parser, guidance_list=True)


def _eval_text_to_image(args: argparse.Namespace) -> dict:
    from vlmkit.data.formats import read_records
    from vlmkit.tasks.imagine import check_options, evaluate_text_to_image
    from vlmkit.tasks.zeroshot import read_templates

    options = check_options(_options(args, with_guidance=False))
    for scale in args.guidance or ():
        check_options({"guidance": scale})
    if args.n_prompts < 1:
        raise UserError(f"--n-prompts {args.n_prompts} judges nothing; give 1 or more")
    if args.candidates is not None and args.rerank is None:
        raise UserError("--candidates chooses among samples with a judge; give --rerank JUDGE_RUN too, or drop it")
    templates = read_templates(args.templates)
    records = read_records(args.data)  # texts and labels only: the images are not read
    model = _load(args.model, "--model")
    judge = _load(args.judge, "--judge")
    rerank = _load(args.rerank, "--rerank") if args.rerank else None
    result = evaluate_text_to_image(model, judge, records, guidance_scales=args.guidance, n_prompts=args.n_prompts,
                                    label_key=args.label_key, seed=args.seed, templates=templates,
                                    batch_size=args.batch_size, rerank=rerank, candidates=args.candidates, **options)
    return {"model": str(args.model), "judge": str(args.judge), **result}


_eval_text_to_image.arguments = _eval_arguments
evaluation("text-to-image", "judge generated images with a CLIP: CLIP score and zero-shot accuracy per guidance scale")(
    _eval_text_to_image)
