"""VQA accuracy with the official evaluation's answer normalization (GT-Vision-Lab/VQA).

Accuracy of a prediction = mean over the human answers of min(1, #matches among the *other*
answers / 3), i.e. 0, 1/3, 2/3 or 1 with ten answers (0, .3, .6, .9, 1 after averaging).

Two variants, because the field uses both:

- "official" (default): the official master normalizes the prediction and the human answers
  only when the human answers disagree; if all answers are identical, the raw stripped
  prediction must equal them exactly ("Yes" does not match ten "yes").
- "lavis": LAVIS/BLIP evaluation always normalizes the prediction (punctuation, digits,
  articles, contractions) and normalizes the human answers when they disagree, so "Yes" or
  "two" score where the official code gives 0.

Inputs: predictions {question_id: answer string}; references {question_id: {"answers": [1..10
strings], "answer_type": str (optional), "question_type": str (optional)}}. A question with a
single answer (where the formula would always give 0) is scored by normalized exact match.
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping

from vlmkit.errors import UserError

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The official pattern: "(?!<=\d)" is a (mistyped) negative look-ahead, kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
VARIANTS = ("official", "lavis")


def _process_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        # delete a mark next to a space (or anywhere if the text has digit,digit); else it splits words
        if (mark + " " in text or " " + mark in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # the official code passes re.UNICODE (32) as `count`: at most 32 periods are removed
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalization: whitespace, punctuation, case, numbers, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalized prediction equals the normalized answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def question_accuracy(prediction: str, answers: list[str], variant: str = "official") -> float:
    """VQA accuracy of one prediction against its human answers (see the module docstring)."""
    if variant not in VARIANTS:
        raise UserError(f"unknown VQA variant '{variant}'; choose 'official' or 'lavis'")
    if len(answers) == 1:
        return exact_match(prediction, answers[0])
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    disagree = len(set(answers)) > 1
    if disagree:
        answers = [_process_digit_article(_process_punctuation(a)) for a in answers]
    if disagree or variant == "lavis":
        prediction = _process_digit_article(_process_punctuation(prediction))
    total = 0.0
    for index in range(len(answers)):
        matches = sum(1 for other, answer in enumerate(answers) if other != index and answer == prediction)
        total += min(1.0, matches / 3.0)
    return total / len(answers)


def vqa_accuracy(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Mapping],
                 variant: str = "official") -> dict:
    """Overall, per-answer-type and per-question-type VQA accuracy (fractions in [0, 1]).

    Returns {"accuracy", "per_answer_type": {type: acc}, "per_question_type": {type: acc}, "n"}.
    Every reference question must have a prediction and vice versa.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown VQA variant '{variant}'; choose 'official' or 'lavis'")
    if not predictions:
        raise UserError("there are no VQA predictions to score; pass at least one {question_id: answer}")
    for question_id, answer in predictions.items():
        if question_id not in references:
            raise UserError(f"question {question_id!r} has a prediction but no reference answers; "
                            f"check that predictions and references use the same question ids")
        if not isinstance(answer, str):
            raise UserError(f"the prediction for question {question_id!r} is not a string")
    for question_id, entry in references.items():
        if question_id not in predictions:
            raise UserError(f"question {question_id!r} has reference answers but no prediction; "
                            f"answer every question or remove it from the references")
        answers = entry.get("answers") if isinstance(entry, Mapping) else None
        if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
            raise UserError(f"question {question_id!r} needs 'answers': a non-empty list of strings")
    per_answer: dict[str, list[float]] = {}
    per_question: dict[str, list[float]] = {}
    scores = []
    for question_id, prediction in predictions.items():
        entry = references[question_id]
        score = question_accuracy(prediction, list(entry["answers"]), variant)
        scores.append(score)
        per_answer.setdefault(str(entry.get("answer_type", "unknown")), []).append(score)
        per_question.setdefault(str(entry.get("question_type", "unknown")), []).append(score)
    return {
        "accuracy": sum(scores) / len(scores),
        "per_answer_type": {k: sum(v) / len(v) for k, v in sorted(per_answer.items())},
        "per_question_type": {k: sum(v) / len(v) for k, v in sorted(per_question.items())},
        "n": len(scores),
        "variant": variant,
    }
