"""Task verbs: `vlmkit eval ...`, `vlmkit classify`, `vlmkit embed`.

Evaluations print one JSON object on stdout; progress and notes go to stderr.
"""
from __future__ import annotations

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, provides
from vlmkit.errors import UserError

import argparse
from pathlib import Path

# Evaluation sub-verbs other areas add: name -> (help, add_arguments, handler).
EVALUATIONS: dict[str, tuple] = {}
# Modules whose import adds `vlmkit eval` sub-verbs with `evaluation`; imported by register(),
# so only when the `eval` parser is built (see commands.py).
EVALUATION_MODULES = ("vlmkit.tasks.generative_cli", "vlmkit.tasks.imagine_cli")


def evaluation(name: str, help: str):
    """Register an `vlmkit eval NAME` sub-verb: decorate `handler(args)`, with `.arguments(parser)` set."""

    def decorate(handler):
        EVALUATIONS[name] = (help, getattr(handler, "arguments", lambda parser: None), handler)
        return handler

    return decorate


def _records(path: str):
    from vlmkit.data.formats import read_records

    return read_records(path)


def _eval_records(path: str, what: str):
    """An evaluation's records, those whose image cannot be used left out and counted on stderr."""
    from vlmkit.data.formats import usable_records

    return usable_records(_records(path), what)


def _model(path: str):
    import vlmkit

    return vlmkit.load(path)


def _zeroshot_arguments(parser):
    parser.add_argument("--label-key", default="label", help="record field holding the class name (default: label)")
    parser.add_argument("--templates", help="file with one prompt template per line, each with '{}'")


def _zeroshot(args) -> dict:
    from vlmkit.tasks.zeroshot import evaluate_zeroshot, read_templates

    templates = read_templates(args.templates)
    return evaluate_zeroshot(_model(args.model), _eval_records(args.data, "zero-shot"), label_key=args.label_key, templates=templates)


def _retrieval_arguments(parser):
    parser.add_argument("--rerank-k", type=int, default=None, metavar="K",
                        help="re-rank each query's top K candidates with the model's image-text matching head (BLIP)")


def _retrieval(args) -> dict:
    from vlmkit.tasks.retrieval import evaluate_retrieval

    return evaluate_retrieval(_model(args.model), _eval_records(args.data, "retrieval"), rerank_k=args.rerank_k)


def _linear_probe_arguments(parser):
    parser.add_argument("--train", required=True, help="records with labels to fit the probe on")
    parser.add_argument("--test", required=True, help="records with labels to score the probe on")
    parser.add_argument("--label-key", default="label")


def _linear_probe(args) -> dict:
    from vlmkit.tasks.linear_probe import evaluate_linear_probe

    model = _model(args.model)
    return evaluate_linear_probe(model, _eval_records(args.train, "linear probe (--train)"),
                                 _eval_records(args.test, "linear probe (--test)"), label_key=args.label_key)


def _detection_arguments(parser):
    parser.add_argument("--holdout", nargs="*", default=None, metavar="'COLOR SHAPE'",
                        help="the novel classes (never labelled in training); default: the holdout in the data "
                             "folder's meta.json (vlmkit data synth --holdout)")


def _detection(args) -> dict:
    from vlmkit.tasks.detection import evaluate_detection, holdout_of

    novel = args.holdout if args.holdout is not None else holdout_of(args.data)
    records = _eval_records(args.data, "detection")
    return evaluate_detection(_model(args.model), records, novel=novel)


def _reconstruction(args) -> dict:
    from vlmkit.tasks.reconstruction import evaluate_reconstruction

    return evaluate_reconstruction(_model(args.model), _eval_records(args.data, "reconstruction"))


def _hard_negatives_arguments(parser):
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help="hard negative kinds to score: spatial (a spatial word flipped), swap (two content "
                             "words exchanged); default both")
    parser.add_argument("--seed", type=int, default=0, help="seed of the negatives (default 0)")


def _hard_negatives(args) -> dict:
    from vlmkit.tasks.hard_negatives import evaluate_hard_negatives

    return evaluate_hard_negatives(_model(args.model), _eval_records(args.data, "hard negatives"), kinds=args.kinds,
                                   seed=args.seed)


_zeroshot.arguments = _zeroshot_arguments
_hard_negatives.arguments = _hard_negatives_arguments
_retrieval.arguments = _retrieval_arguments
_linear_probe.arguments = _linear_probe_arguments
_detection.arguments = _detection_arguments
evaluation("zeroshot", "zero-shot classification with prompt ensembling")(_zeroshot)
evaluation("retrieval", "image-text retrieval recall@1/5/10 both ways")(_retrieval)
evaluation("hard-negatives", "how often an image scores its caption above the caption's hard negative "
           "(ARO-style; 0.5 = bag of words)")(_hard_negatives)
evaluation("linear-probe", "logistic regression on frozen image features")(_linear_probe)
evaluation("detection", "box AP (pycocotools' numbers) on base and novel classes")(_detection)
evaluation("reconstruction", "an autoencoder's reconstruction error (MSE, PSNR) on the images")(_reconstruction)


def register(subparsers) -> None:
    """Add the `eval` verb (with every sub-verb of EVALUATION_MODULES), `classify`, `detect`, `match` and `embed`."""
    import importlib

    for module_name in EVALUATION_MODULES:
        importlib.import_module(module_name)
    evaluate = subparsers.add_parser("eval", help="evaluate a model; prints one JSON object")
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (help_text, add_arguments, handler) in EVALUATIONS.items():
        parser = tasks.add_parser(name, help=help_text)
        parser.add_argument("--model", required=True, help="run folder or checkpoint")
        if name != "linear-probe":
            parser.add_argument("--data", required=True, help="evaluation records (JSONL, CSV, shards)")
        add_arguments(parser)
        parser.set_defaults(func=_printing(handler))

    classify = subparsers.add_parser("classify", help="zero-shot classify images among given labels")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--model", required=True)
    classify.add_argument("--labels", nargs="+", required=True, help='class names, e.g. "red circle" "blue square"')
    classify.add_argument("--templates", help="file with one prompt template per line")
    classify.add_argument("--top", type=int, default=3, help="how many labels to list per image (at least 1)")
    classify.set_defaults(func=_printing(_classify))

    detect = subparsers.add_parser("detect", help="detect objects by name with an open-vocabulary detector (prints boxes JSON)")
    detect.add_argument("images", nargs="+")
    detect.add_argument("--model", required=True)
    detect.add_argument("--labels", nargs="+", required=True, help='names to look for, e.g. "red triangle" "blue circle"')
    detect.add_argument("--threshold", type=float, default=0.3, help="lowest score listed (default 0.3)")
    detect.add_argument("--out", help="PNG with the boxes drawn (one image; missing folders are created)")
    detect.set_defaults(func=_printing(_detect))

    match = subparsers.add_parser("match", help="image-text matching probability of texts for an image (an ITM head)")
    match.add_argument("image")
    match.add_argument("texts", nargs="+", metavar="TEXT", help='one or more texts, e.g. "a red circle"')
    match.add_argument("--model", required=True, help="run folder of a model that matches images and texts (BLIP, fusion encoders)")
    match.set_defaults(func=_printing(_match))

    embed = subparsers.add_parser("embed", help="write normalised image and text embeddings to safetensors")
    embed.add_argument("--model", required=True)
    embed.add_argument("--data", required=True)
    embed.add_argument("--out", required=True,
                       help="output .safetensors file (missing folders are created; an existing file is replaced)")
    embed.set_defaults(func=_printing(_embed))


def _printing(handler):
    def run(args: argparse.Namespace) -> int:
        from vlmkit.cli import print_json

        print_json(handler(args))
        return 0

    return run


def _classify(args) -> dict:
    from vlmkit.tasks.zeroshot import read_templates, zeroshot_logits
    from vlmkit.data.formats import load_image

    if args.top < 1:
        raise UserError(f"--top {args.top} lists no label; give --top 1 or more")
    images = [load_image(path) for path in args.images]  # a bad path fails here, with its name
    model = _model(args.model)
    probabilities = zeroshot_logits(model, images, args.labels, read_templates(args.templates)).softmax(dim=-1)
    top = min(args.top, len(args.labels))
    results = []
    for path, row in zip(args.images, probabilities):
        values, indices = row.topk(top)
        results.append({
            "image": path,
            "label": args.labels[indices[0]],
            "top": [{"label": args.labels[i], "probability": round(v.item(), 4)} for v, i in zip(values, indices)],
        })
    return {"predictions": results}


def _detect(args) -> dict:
    from vlmkit.capabilities import Detects
    from vlmkit.data.formats import load_image
    from vlmkit.io import check_output_file
    import torch

    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} is not a score; give a number from 0 to 1")
    if args.out is not None:
        if len(args.images) != 1:
            raise UserError(f"--out draws one image, but {len(args.images)} were given; detect one image with --out")
        check_output_file(args.out, "--out")
    labels = [label.strip() for label in args.labels]
    if any(not label for label in labels):
        raise UserError("--labels holds an empty name; give names such as \"red triangle\"")
    images = [load_image(path) for path in args.images]  # a bad path fails here, with its name
    model = _model(args.model)
    model.require(Detects, task="detect")
    pixels = model.detection_inputs(images)
    with torch.no_grad():
        found = model.detect(pixels, labels)
    side_y, side_x = pixels.shape[-2:]
    results = []
    for path, image, result in zip(args.images, images, found):
        scale = torch.tensor([image.size[0] / side_x, image.size[1] / side_y] * 2)
        keep = result["scores"] >= args.threshold
        boxes = (result["boxes"][keep].float() * scale).tolist()
        results.append({"image": path, "detections": [
            {"label": labels[int(label)], "score": round(float(score), 4), "box": [round(v, 1) for v in box]}
            for box, score, label in zip(boxes, result["scores"][keep], result["labels"][keep])]})
    if args.out is not None:
        from vlmkit.plots import boxes_on_image

        detections = results[0]["detections"]
        boxes_on_image(images[0], [d["box"] for d in detections], args.out, labels=[d["label"] for d in detections],
                       scores=[d["score"] for d in detections], title=f"{len(detections)} detection(s)")
        results[0]["out"] = str(args.out)
    return {"predictions": results}


def _match(args) -> dict:
    """{"image", "matches": [{"text", "probability"}]}: the model's ITM probability of each text for the image."""
    from vlmkit.capabilities import MatchesImageText
    from vlmkit.data.formats import load_image
    import torch

    texts = [text for text in args.texts]
    if any(not text.strip() for text in texts):
        raise UserError("a TEXT is empty; give the texts to match, e.g. \"a red circle\"")
    image = load_image(args.image)  # a bad path fails here, with its name
    model = _model(args.model)
    model.require(MatchesImageText, task="match")
    pixels = model.preprocess([image] * len(texts))
    with torch.no_grad():
        probabilities = model.match(pixels.to(model.device), model.tokenize(texts).to(model.device)).float().cpu()
    if not bool(torch.isfinite(probabilities).all()):
        raise UserError(f"the model gives non-finite matching scores, so its weights are damaged (a diverged training?); "
                        f"load an earlier checkpoint of {args.model}")
    return {"image": args.image, "matches": [{"text": text, "probability": round(float(p), 4)}
                                             for text, p in zip(texts, probabilities)]}


def _embed(args) -> dict:
    from vlmkit.io import check_output_file, save_safetensors
    import torch

    check_output_file(args.out, "--out")  # refused before the model is loaded and the data embedded
    model = _model(args.model)
    records = _records(args.data)
    tensors = {}
    if records and provides(model, EmbedsImages):
        tensors["image_embeddings"] = model.embed_images([record["image"] for record in records])
    texts = [text for record in records for text in record.get("texts", [])]
    if texts and provides(model, EmbedsTexts):
        tensors["text_embeddings"] = model.embed_texts(texts)
        tensors["text_to_image"] = torch.tensor([i for i, record in enumerate(records) for _ in record.get("texts", [])])
    out = Path(args.out)
    try:
        save_safetensors(tensors, out, metadata={"source": str(args.data), "model": str(args.model)})
    except OSError as error:
        raise UserError(f"cannot write --out {out} ({error.strerror or error}); nothing was written, free some space "
                        f"or choose another path") from None
    return {"out": str(out), **{name: list(tensor.shape) for name, tensor in tensors.items()}}
