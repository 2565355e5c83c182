"""`vlmkit score captions|vqa`: score prediction files against references, print one JSON object."""
from __future__ import annotations

import json
import os

from vlmkit.errors import UserError
from vlmkit.textfiles import decode_line, decode_text, json_type, parse_json


def register(subparsers) -> None:
    """Add the `score` verb with its `captions` and `vqa` sub-verbs."""
    score = subparsers.add_parser("score", help="score predictions with caption metrics or VQA accuracy")
    verbs = score.add_subparsers(dest="score_command", metavar="WHAT", required=True)

    captions = verbs.add_parser("captions", help="BLEU-1..4, ROUGE-L, CIDEr-D, METEOR as pycocoevalcap gives them")
    captions.add_argument("--pred", required=True, help="COCO results JSON [{image_id, caption}] or JSONL records")
    captions.add_argument("--refs", required=True,
                          help="COCO annotations JSON {annotations: [{image_id, caption}]} or JSONL records")
    captions.add_argument("--metrics", default="bleu,rouge,cider", help="comma list of bleu,rouge,cider,meteor")
    captions.add_argument("--per-image", metavar="FILE",
                          help="also write per-image scores to this JSON file (missing folders are created)")
    captions.set_defaults(func=_score_captions)

    vqa = verbs.add_parser("vqa", help="VQA accuracy (official normalization)")
    vqa.add_argument("--pred", required=True, help="results JSON [{question_id, answer}] or JSONL records")
    vqa.add_argument("--refs", required=True,
                     help="annotations JSON {annotations: [{question_id, answers, answer_type, question_type}]}")
    vqa.add_argument("--variant", choices=("official", "lavis"), default="official",
                     help="official (default): normalize only when the human answers disagree; "
                          "lavis: always normalize the prediction")
    vqa.set_defaults(func=_score_vqa)


def _read_records(path: str) -> list | dict:
    if not os.path.exists(path):
        raise UserError(f"file '{path}' does not exist; check the path")
    if not os.path.isfile(path):
        raise UserError(f"'{path}' is not a regular file (a folder, a device or a pipe); give a JSON or JSONL file")
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(data.split(b"\n"), 1):
            text = decode_line(line, path, number)
            if text.strip():
                records.append(parse_json(text, f"line {number} of '{path}'", "fix that line"))
        return records
    return parse_json(decode_text(data, path), f"'{path}'", "give a JSON file, or name a JSONL file *.jsonl")


def _entries(data, path: str, key: str) -> list:
    """The list of entry objects of a COCO-style file (a list, or a dict with `key`)."""
    if isinstance(data, dict) and key in data:
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"'{path}' must hold a list of entries or an object with '{key}'")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(f"entry {index} of '{path}' is not an object; every entry needs an id and a caption")
    return data


def _entry_id(entry: dict, index: int, path: str, names: tuple[str, ...]):
    for name in names:
        if name in entry and entry[name] is not None:
            value = entry[name]
            # Ids are dictionary keys and are matched between files: a list or an object cannot
            # be one, and true/false would silently equal 1/0.
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise UserError(f"entry {index} of '{path}' has a '{name}' that is {json_type(value)}; an id must be "
                                f"a string or a number")
            return value
    raise UserError(f"entry {index} of '{path}' has no {' or '.join(names)}; give every entry an id")


def _captions_of(entry: dict, index: int, path: str, image_id) -> list[str]:
    if "caption" in entry:
        captions = [entry["caption"]]
    elif "text" in entry:
        captions = [entry["text"]]
    elif "texts" in entry:
        captions = entry["texts"]
    else:
        raise UserError(f"entry {index} (image {image_id!r}) of '{path}' has no caption, text or texts")
    if not isinstance(captions, list):
        raise UserError(f"entry {index} (image {image_id!r}) of '{path}' has 'texts' that is {json_type(captions)}, "
                        f"not a list of captions; write \"texts\": [\"...\"]")
    if not captions:
        raise UserError(f"entry {index} (image {image_id!r}) of '{path}' has an empty 'texts' list")
    for caption in captions:
        if not isinstance(caption, str):
            raise UserError(f"entry {index} (image {image_id!r}) of '{path}' has a caption that is {json_type(caption)}, "
                            f"not a string; write captions as JSON strings")
        if not caption.strip():
            raise UserError(f"entry {index} (image {image_id!r}) of '{path}' has an empty caption; fill it in or "
                            f"remove the entry")
        _check_length(caption, f"entry {index} (image {image_id!r}) of '{path}' has a caption")
    return captions


def _check_length(text: str, what: str) -> None:
    """Refuse a text over the input limit (`max_text_chars`): tokenizing 11 MB for CIDEr takes half a
    minute, and a score must be of the text as given, so it is not cut as model inputs are."""
    from vlmkit.data.limits import current_limits

    limit = current_limits().max_text_chars
    if len(text) > limit:
        raise UserError(f"{what} of {len(text):,} characters, over the text limit ({limit:,}); shorten it, or raise "
                        f"the limit with VLMKIT_MAX_TEXT_CHARS")


def load_caption_predictions(path: str) -> dict:
    """{image_id: caption} from a COCO results file or JSONL records (one caption per image)."""
    predictions: dict = {}
    for index, entry in enumerate(_entries(_read_records(path), path, "annotations")):
        image_id = _entry_id(entry, index, path, ("image_id", "image"))
        captions = _captions_of(entry, index, path, image_id)
        if image_id in predictions or len(captions) != 1:
            raise UserError(f"image {image_id!r} has more than one prediction in '{path}' (entry {index}); "
                            f"keep one caption per image")
        predictions[image_id] = captions[0]
    return predictions


def load_caption_references(path: str) -> dict:
    """{image_id: [captions]} from a COCO annotations file or JSONL records."""
    references: dict = {}
    for index, entry in enumerate(_entries(_read_records(path), path, "annotations")):
        image_id = _entry_id(entry, index, path, ("image_id", "image"))
        references.setdefault(image_id, []).extend(_captions_of(entry, index, path, image_id))
    return references


def load_vqa_predictions(path: str) -> dict:
    """{question_id: answer} from a VQA results file [{question_id, answer}] or JSONL records."""
    predictions: dict = {}
    for index, entry in enumerate(_entries(_read_records(path), path, "annotations")):
        question_id = _entry_id(entry, index, path, ("question_id",))
        if not isinstance(entry.get("answer"), str):
            raise UserError(f"entry {index} (question {question_id!r}) of '{path}' has no string 'answer'")
        _check_length(entry["answer"], f"entry {index} (question {question_id!r}) of '{path}' has an answer")
        if question_id in predictions:
            raise UserError(f"question {question_id!r} is answered twice in '{path}' (entry {index}); keep one")
        predictions[question_id] = entry["answer"]
    return predictions


def load_vqa_references(path: str) -> dict:
    """{question_id: {answers, answer_type, question_type}} from VQA annotations or JSONL records."""
    references: dict = {}
    for index, entry in enumerate(_entries(_read_records(path), path, "annotations")):
        question_id = _entry_id(entry, index, path, ("question_id",))
        raw = entry.get("answers", [entry["answer"]] if "answer" in entry else None)
        if not isinstance(raw, list) or not raw:
            raise UserError(f"entry {index} (question {question_id!r}) of '{path}' has no 'answers' list")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not all(isinstance(a, str) for a in answers):
            raise UserError(f"entry {index} (question {question_id!r}) of '{path}' has a non-string answer")
        references[question_id] = {"answers": answers,
                                   "answer_type": entry.get("answer_type", "unknown"),
                                   "question_type": entry.get("question_type", "unknown")}
    return references


def _score_captions(args) -> int:
    from vlmkit.cli import print_json
    from vlmkit.io import check_output_file, write_output_file
    from vlmkit.metrics.caption import score_captions

    if args.per_image:
        check_output_file(args.per_image, "--per-image")  # before scoring, not after
    predictions = load_caption_predictions(args.pred)
    references = load_caption_references(args.refs)
    result = score_captions(predictions, references, metrics=args.metrics.split(","), per_image=bool(args.per_image))
    if args.per_image:
        per_image = result.pop("per_image")
        rows = [{"image_id": k, **v} for k, v in per_image.items()]
        write_output_file(args.per_image, (json.dumps(rows) + "\n").encode(), "--per-image")
    print_json(result)
    return 0


def _score_vqa(args) -> int:
    from vlmkit.cli import print_json
    from vlmkit.metrics.vqa import vqa_accuracy

    result = vqa_accuracy(load_vqa_predictions(args.pred), load_vqa_references(args.refs), args.variant)
    print_json(result)
    return 0
