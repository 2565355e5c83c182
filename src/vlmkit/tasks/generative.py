"""Captioning, VQA and visual-reasoning evaluation, with the baselines they are compared to.

Tasks ask a model for capabilities, never for its class:
- `evaluate_caption` needs `Generates` and scores with the pycocoevalcap metrics
  (`vlmkit.metrics.caption.score_captions`);
- `evaluate_vqa` needs `Answers` (a generative family answers with the question as its prompt; a
  classifier picks from its answer vocabulary) and scores VQA accuracy: the soft accuracy
  where a question has several human answers, normalised exact match where it has one;
- `evaluate_reasoning` needs `Verifies` and scores true/false accuracy.
Baselines: `nearest_neighbour_captions` (the consensus caption of the k training images
closest in pixel space, Devlin et al. 2015) and `majority_answers` (the most frequent training
answer of each question type).
"""
from __future__ import annotations

from vlmkit.capabilities import Answers, AnswersInContext, CaptionsInContext, Generates, ReadsRegions, Verifies, provides

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from vlmkit.errors import UserError


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pixels(model, images: Sequence) -> torch.Tensor:
    return model.preprocess(list(images)).to(model.device)


def _regions(model, records: Sequence[dict]) -> dict:
    """`regions=` for a model whose visual inputs are object boxes (`ReadsRegions`), else nothing."""
    return {"regions": model.region_inputs(list(records))} if provides(model, ReadsRegions) else {}


def caption_references(records: Sequence[dict]) -> dict[str, list[str]]:
    """{image id: its captions}; the id is the record's `id` if present, else its position."""
    refs = {str(record.get("id", index)): list(record.get("texts") or []) for index, record in enumerate(records)}
    refs = {key: value for key, value in refs.items() if value}
    if not refs:
        raise UserError("no evaluation record has captions ('text' or 'texts'); caption evaluation needs references")
    return refs


@torch.no_grad()
def generate_captions(model, records: Sequence[dict], batch_size: int = 64, shots: int = 0,
                      support: Sequence[dict] | None = None, seed: int = 0, examples: str = "random",
                      retriever=None, **decoding) -> dict[str, str]:
    """{image id: generated caption} for every record with captions; `shots=K` (models that
    `CaptionsInContext`) puts K (image, caption) examples from `support` before each image, drawn at
    random or (`examples="similar"`) the K most similar (see `ExampleRetriever`)."""
    model.require(Generates, task="caption")
    draw = _caption_drawer(model, support, shots, seed, examples, retriever) if shots else None
    ids = list(caption_references(records))
    by_id = {str(record.get("id", index)): record for index, record in enumerate(records)}
    predictions = {}
    for chunk in _batches(ids, batch_size):
        pixels = _pixels(model, [by_id[i]["image"] for i in chunk])
        if draw is None:
            texts = model.generate(pixels, **decoding)
        else:
            texts = model.caption_in_context(pixels, draw([by_id[i]["image"] for i in chunk]), **decoding)
        predictions.update(zip(chunk, texts))
    return predictions


def evaluate_caption(model, records: Sequence[dict], batch_size: int = 64, metrics=("bleu", "rouge", "cider"),
                     shots: int = 0, support: Sequence[dict] | None = None, seed: int = 0, examples: str = "random",
                     retriever=None, **decoding) -> dict:
    """Caption metrics of the model's generated captions: "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "n"
    (and "shots" with in-context examples, drawn as `generate_captions` says)."""
    from vlmkit.metrics.caption import score_captions

    predictions = generate_captions(model, records, batch_size=batch_size, shots=shots, support=support, seed=seed,
                                    examples=examples, retriever=retriever, **decoding)
    # An empty generation still counts: score it as a placeholder word instead of rejecting the set.
    predictions = {key: text if text.strip() else "<empty>" for key, text in predictions.items()}
    result = score_captions(predictions, caption_references(records), metrics=metrics)
    return {**result, "shots": shots, "examples": examples} if shots else result


def _caption_drawer(model, support: Sequence[dict] | None, shots: int, seed: int, examples: str = "random",
                    retriever=None):
    """A function from the query images (paths) to their examples: for each, `shots` (pixels (3, H, W),
    caption) pairs from the support set, drawn at random (seeded) or the most similar images' captions."""
    import random

    model.require(CaptionsInContext, task=f"{shots}-shot captioning")
    _check_selection(examples, retriever)
    pool = [(record["image"], text) for record in support or [] if "image" in record for text in record.get("texts") or []]
    if shots < 0 or len(pool) < shots:
        raise UserError(f"{shots}-shot captioning needs at least {shots} support captions ('texts' in the --support "
                        f"records); found {len(pool)}")
    rng, pixels = random.Random(seed), _cached_pixels(model)
    similar = ExampleRetriever([image for image, _ in pool], retriever) if examples == "similar" else None

    def draw(queries: Sequence[str]) -> list[list[tuple[torch.Tensor, str]]]:
        rows = similar.nearest(queries, shots) if similar else [rng.sample(range(len(pool)), shots) for _ in queries]
        return [[(pixels(pool[index][0]), pool[index][1]) for index in row] for row in rows]

    return draw


def _cached_pixels(model):
    """A function from an image path to its preprocessed pixels (3, H, W), each image read once."""
    pixels_of: dict[str, torch.Tensor] = {}

    def pixels(image: str) -> torch.Tensor:
        if image not in pixels_of:
            pixels_of[image] = _pixels(model, [image])[0]
        return pixels_of[image]

    return pixels


EXAMPLE_SELECTIONS = ("random", "similar")


def _check_selection(examples: str, retriever) -> None:
    if examples not in EXAMPLE_SELECTIONS:
        raise UserError(f"examples must be one of {', '.join(EXAMPLE_SELECTIONS)}, not {examples!r}")
    if retriever is not None and examples != "similar":
        raise UserError("a retriever model ranks examples by similarity; use it with examples='similar' (--examples similar)")
    if retriever is not None:
        from vlmkit.capabilities import EmbedsImages

        retriever.require(EmbedsImages, task="example retrieval")


class ExampleRetriever:
    """Retrieval-based in-context example selection (RICES, Flamingo; from PICa, Yang et al. 2022): the
    support examples ranked by the cosine similarity of their image to the query image, plus, for VQA,
    the cosine similarity of their question's bag of words to the query question (PICa sums image and
    question similarity). Images are compared by a `retriever` model's embeddings (anything that
    `EmbedsImages`, e.g. a CLIP run), or without one by downsampled pixels (the nearest-neighbour
    baseline's features). The chosen examples are ordered most similar last, next to the query, as
    OpenFlamingo's RICES orders them. Ties go to the earlier support example."""

    def __init__(self, images: Sequence[str], retriever=None, questions: Sequence[str] | None = None) -> None:
        self.retriever = retriever
        distinct, self.image_rows = _distinct(images)  # (N,) example -> its image
        self.image_features = self._features(distinct)  # (I, D) unit rows
        self.words, self.question_features = {}, None
        if questions is not None:
            for question in questions:
                for word in _words(question):
                    self.words.setdefault(word, len(self.words))
            self.question_features = self._bag(questions)  # (N, V) unit rows

    def _features(self, images: Sequence[str]) -> np.ndarray:
        if self.retriever is None:
            return _pixel_features([{"image": image} for image in images])
        rows = []
        for chunk in _batches(list(images), 64):
            with torch.no_grad():
                embedded = self.retriever.encode_image(_pixels(self.retriever, chunk)).float()
            rows.append(torch.nn.functional.normalize(embedded, dim=-1).cpu().numpy())
        return np.concatenate(rows)

    def _bag(self, questions: Sequence[str]) -> np.ndarray:
        bag = np.zeros((len(questions), max(len(self.words), 1)), dtype=np.float32)
        for row, question in enumerate(questions):
            for word in _words(question):
                if word in self.words:
                    bag[row, self.words[word]] += 1
        return bag / (np.linalg.norm(bag, axis=1, keepdims=True) + 1e-6)

    def nearest(self, images: Sequence[str], k: int, questions: Sequence[str] | None = None) -> list[list[int]]:
        """For each query image (and question), the indices of its k most similar examples, most similar last."""
        distinct, rows = _distinct(images)  # a VQA chunk repeats each image once per question: embed it once
        similarity = (self._features(distinct) @ self.image_features.T)[rows][:, self.image_rows]  # (Q, N)
        if questions is not None and self.question_features is not None:
            similarity = similarity + self._bag(questions) @ self.question_features.T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # (Q, k), most similar first
        return [list(reversed(row.tolist())) for row in order]


def _distinct(images: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct images in first-seen order, and for each input the row of its image among them."""
    distinct = list(dict.fromkeys(images))
    row_of = {image: row for row, image in enumerate(distinct)}
    return distinct, np.array([row_of[image] for image in images])


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def _pixel_features(records: Sequence[dict], side: int = 16) -> np.ndarray:
    """Downsampled, standardised RGB pixels: the features of the nearest-neighbour baseline. (N, 3*side*side)"""
    from vlmkit.data.formats import load_image

    rows = [np.asarray(load_image(record["image"]).resize((side, side)), dtype=np.float32).ravel() for record in records]
    features = np.stack(rows)
    features -= features.mean(axis=1, keepdims=True)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-6)


def _overlap(a: str, b: str) -> float:
    """Unigram + bigram F1 between two captions (the consensus criterion)."""
    def grams(text):
        words = text.lower().split()
        return Counter(words) + Counter(zip(words, words[1:]))

    ga, gb = grams(a), grams(b)
    common = sum((ga & gb).values())
    return 2 * common / max(sum(ga.values()) + sum(gb.values()), 1)


def nearest_neighbour_captions(train_records: Sequence[dict], records: Sequence[dict], k: int = 5) -> dict[str, str]:
    """{image id: caption} borrowed from the k nearest training images (cosine on pixels):
    among their captions, the one that agrees most with the others (consensus re-ranking)."""
    train = [record for record in train_records if record.get("texts")]
    if not train:
        raise UserError("the nearest-neighbour baseline needs training records with captions")
    ids = list(caption_references(records))
    by_id = {str(record.get("id", index)): record for index, record in enumerate(records)}
    train_features = _pixel_features(train)
    predictions = {}
    for chunk in _batches(ids, 256):
        similarity = _pixel_features([by_id[i] for i in chunk]) @ train_features.T  # (b, N_train)
        neighbours = np.argsort(-similarity, axis=1)[:, :k]
        for image_id, row in zip(chunk, neighbours):
            pool = [caption for index in row for caption in train[index]["texts"]]
            predictions[image_id] = max(pool, key=lambda c: sum(_overlap(c, other) for other in pool))
    return predictions


def evaluate_caption_baseline(train_records: Sequence[dict], records: Sequence[dict], k: int = 5,
                              metrics=("bleu", "rouge", "cider")) -> dict:
    """Caption metrics of the nearest-neighbour baseline (same scorer as `evaluate_caption`)."""
    from vlmkit.metrics.caption import score_captions

    return score_captions(nearest_neighbour_captions(train_records, records, k), caption_references(records), metrics=metrics)


# ---- VQA ------------------------------------------------------------------------------------------
def vqa_items(records: Sequence[dict]) -> list[tuple[str, dict, dict]]:
    """(question id, record, qa entry) for every question; ids are "record:question"."""
    items = [(f"{record.get('id', index)}:{q}", record, item)
             for index, record in enumerate(records) for q, item in enumerate(record.get("qa") or [])]
    if not items:
        raise UserError("no evaluation record has questions ('qa'); VQA evaluation needs them")
    return items


def score_vqa(predictions: dict[str, str], items) -> dict:
    """{"accuracy", "per_question_type", "n"} with the official VQA accuracy (see module docstring)."""
    from vlmkit.data.records import answers_of
    from vlmkit.metrics.vqa import vqa_accuracy

    references = {qid: {"answers": answers_of(item), "question_type": item.get("type", "unknown")} for qid, _, item in items}
    result = vqa_accuracy(predictions, references)
    return {"accuracy": result["accuracy"], "per_question_type": result["per_question_type"], "n": result["n"]}


@torch.no_grad()
def evaluate_vqa(model, records: Sequence[dict], batch_size: int = 16, shots: int = 0,
                 support: Sequence[dict] | None = None, seed: int = 0, examples: str = "random",
                 retriever=None, **decoding) -> dict:
    """VQA accuracy of the model's answers, overall and per question type.

    `batch_size` counts images; each image is preprocessed once and shared by its questions.
    `shots=K` (models that `AnswersInContext`) puts K examples before every question: image,
    question and most common answer of K questions from the `support` records (training data):
    drawn anew for each question from a generator seeded with `seed`, or (`examples="similar"`) the
    K most similar by image and question (`ExampleRetriever`; `retriever` embeds the images).
    """
    model.require(Answers, task="vqa")
    items = vqa_items(records)
    draw = _example_drawer(model, support, shots, seed, examples, retriever) if shots else None
    predictions = {}
    with_questions = [(index, record) for index, record in enumerate(records) if record.get("qa")]
    for chunk in _batches(with_questions, batch_size):
        pixels = _pixels(model, [record["image"] for _, record in chunk])  # (b, 3, H, W)
        owner = torch.tensor([row for row, (_, record) in enumerate(chunk) for _ in record["qa"]], device=pixels.device)
        questions = [item["question"] for _, record in chunk for item in record["qa"]]
        qids = [f"{record.get('id', index)}:{q}" for index, record in chunk for q in range(len(record["qa"]))]
        if draw is None:
            regions = {key: {name: value.index_select(0, owner.cpu()) for name, value in inputs.items()}
                       for key, inputs in _regions(model, [record for _, record in chunk]).items()}  # one read per image
            answers = model.answer(pixels.index_select(0, owner), questions, **regions, **decoding)
        else:
            images = [record["image"] for _, record in chunk for _ in record["qa"]]
            answers = model.answer_in_context(pixels.index_select(0, owner), questions, draw(images, questions), **decoding)
        predictions.update(zip(qids, answers))
    result = score_vqa(predictions, items)
    return {**result, "shots": shots, "examples": examples} if shots else result


def _example_drawer(model, support: Sequence[dict] | None, shots: int, seed: int, examples: str = "random",
                    retriever=None):
    """A function from the query images (paths) and questions to their examples: for each, `shots`
    (pixels (3, H, W), question, answer) triples from the support set, random or the most similar."""
    import random

    from vlmkit.data.records import answers_of

    model.require(AnswersInContext, task=f"{shots}-shot vqa")
    _check_selection(examples, retriever)
    pool = [(record, item) for record in support or [] for item in record.get("qa") or []]
    if shots < 0 or len(pool) < shots:
        raise UserError(f"{shots}-shot VQA needs at least {shots} support questions ('qa' in the --support records); found {len(pool)}")
    rng, pixels = random.Random(seed), _cached_pixels(model)
    similar = (ExampleRetriever([record["image"] for record, _ in pool], retriever, [item["question"] for _, item in pool])
               if examples == "similar" else None)

    def example(index: int) -> tuple[torch.Tensor, str, str]:
        record, item = pool[index]
        return pixels(record["image"]), item["question"], Counter(answers_of(item)).most_common(1)[0][0]

    def draw(images: Sequence[str], questions: Sequence[str]) -> list[list[tuple[torch.Tensor, str, str]]]:
        rows = (similar.nearest(images, shots, questions) if similar
                else [rng.sample(range(len(pool)), shots) for _ in questions])
        return [[example(index) for index in row] for row in rows]

    return draw


def majority_answers(train_records: Sequence[dict], records: Sequence[dict]) -> dict[str, str]:
    """{question id: the most frequent training answer of its question type} (ties: alphabetical)."""
    from vlmkit.data.records import answers_of
    from vlmkit.metrics.vqa import normalize_answer

    counts: dict[str, Counter] = {}
    for record in train_records:
        for item in record.get("qa") or []:
            counts.setdefault(item.get("type", "unknown"), Counter()).update(normalize_answer(a) for a in answers_of(item))
    overall = sum(counts.values(), Counter())
    if not overall:
        raise UserError("the majority-answer baseline needs training records with questions ('qa')")

    def best(counter: Counter) -> str:
        return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    majority = {qtype: best(counter) for qtype, counter in counts.items()}
    fallback = best(overall)
    return {qid: majority.get(item.get("type", "unknown"), fallback) for qid, _, item in vqa_items(records)}


def evaluate_vqa_baseline(train_records: Sequence[dict], records: Sequence[dict]) -> dict:
    """VQA accuracy of the per-question-type majority answer."""
    return score_vqa(majority_answers(train_records, records), vqa_items(records))


# ---- visual reasoning ------------------------------------------------------------------------------
def evaluate_reasoning_baseline(train_records: Sequence[dict], records: Sequence[dict]) -> dict:
    """{"accuracy", "n", "answer"}: every statement called with the most frequent training label (ties: true)."""
    labels = [bool(item["label"]) for record in train_records for item in record.get("statements") or []]
    if not labels:
        raise UserError("the majority-label baseline needs training records with statements ('statements')")
    majority = sum(labels) * 2 >= len(labels)
    items = [bool(item["label"]) for record in records for item in record.get("statements") or []]
    if not items:
        raise UserError("no evaluation record has statements ('statements'); reasoning evaluation needs them")
    return {"accuracy": sum(label == majority for label in items) / len(items), "n": len(items), "answer": majority}


@torch.no_grad()
def evaluate_reasoning(model, records: Sequence[dict], batch_size: int = 128) -> dict:
    """{"accuracy", "n"}: how often the model's true/false call matches each statement's label."""
    model.require(Verifies, task="reasoning")
    items = [(record, item) for record in records for item in record.get("statements") or []]
    if not items:
        raise UserError("no evaluation record has statements ('statements'); reasoning evaluation needs them")
    correct = 0
    for chunk in _batches(items, batch_size):
        pixels = _pixels(model, [record["image"] for record, _ in chunk])
        probabilities = model.verify(pixels, [item["text"] for _, item in chunk], **_regions(model, [record for record, _ in chunk]))
        labels = torch.tensor([bool(item["label"]) for _, item in chunk])
        correct += int(((probabilities > 0.5) == labels).sum())
    return {"accuracy": correct / len(items), "n": len(items)}
