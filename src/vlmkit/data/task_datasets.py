"""Training datasets for the generative and question-answering families.

They extend `ImageTextDataset` (image loading, caching, augmentation and skip reporting stay
there) with what each family trains on: a (prefix, suffix) pair for PrefixLM models, and a
question with VQA soft answer scores or a statement with a true/false label for the
classification heads. Every random choice comes from the sample's own seeded generator, so a
resumed run sees the same samples.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Sequence

import torch

from vlmkit.data.loader import ImageTextDataset


def record_texts(records: Sequence[dict], questions: bool = True, statements: bool = False) -> list[str]:
    """Captions, plus questions and answers (and statements) of the records: a tokenizer corpus."""
    texts = []
    for record in records:
        texts.extend(record.get("texts") or [])
        if questions:
            for item in record.get("qa") or []:
                texts.append(item["question"])
                texts.extend(answers_of(item))
        if statements:
            texts.extend(item["text"] for item in record.get("statements") or [])
    return texts


def answers_of(item: dict) -> list[str]:
    """The human answers of one `qa` entry: its `answers` list (VQA v2) or its single `answer`."""
    answers = item.get("answers")
    if answers:
        return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    return [str(item["answer"])]


def soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQA v2 soft targets: min(1, count / 3) per normalised answer (1.0 when there is one answer)."""
    from vlmkit.metrics.vqa import normalize_answer

    counts = Counter(normalize_answer(answer) for answer in answers)
    if len(answers) == 1:
        return {answer: 1.0 for answer in counts}
    return {answer: min(1.0, count / 3.0) for answer, count in counts.items()}


def _word_occurrences(text: str, phrase: str) -> list[int]:
    """Start offsets of `phrase` in `text` as whole words (case-insensitive)."""
    return [match.start() for match in re.finditer(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower())]


def _box_centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def _task_rng(seed: int, epoch: int, index: int) -> random.Random:
    # Separate from the caption/augmentation stream of ImageTextDataset.
    return random.Random(f"vlmkit-task:{seed}:{epoch}:{index}")


class PrefixDataset(ImageTextDataset):
    """(prefix, suffix) samples for a PrefixLM: caption with no prefix (or split at a random word),
    or question -> answer. `collate` adds `prefix_tokens` (B, P) to the usual batch."""

    def __init__(self, records, transform, tokenizer, config, seed: int = 0, caption: str = "random"):
        super().__init__(records, transform, tokenizer=tokenizer, caption=caption, seed=seed, cache_images=True)
        self.config = config

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is None:
            return None
        record, rng = self.records[index], _task_rng(self.seed, self.epoch, index)
        qa = record.get("qa") or []
        if qa and (not sample["text"] or rng.random() < self.config.qa_fraction):
            item = rng.choice(qa)
            sample["prefix"], sample["text"] = item["question"], rng.choice(answers_of(item))
        elif self.config.prefix_split and rng.random() < self.config.prefix_split:
            words = sample["text"].split()
            cut = rng.randint(1, max(len(words) - 1, 1))
            sample["prefix"], sample["text"] = " ".join(words[:cut]), " ".join(words[cut:])
        else:
            sample["prefix"] = None
        return sample

    def collate(self, samples) -> dict:
        from vlmkit.models.simvlm import empty_prefix

        batch = super().collate(samples)
        prefixes = [sample["prefix"] for sample in samples if sample is not None]
        prefix_tokens = empty_prefix(len(prefixes), self.config)  # (B, P)
        given = [row for row, prefix in enumerate(prefixes) if prefix is not None]
        if given:
            prefix_tokens[given] = self.tokenizer([prefixes[row] for row in given], context_length=self.config.prefix_length)
        batch["prefix_tokens"] = prefix_tokens
        return batch


class QuestionStatementDataset(ImageTextDataset):
    """Samples for the VQA classifier and the true/false reasoning head.

    Each sample is a question (with soft scores over `answers`, the answer vocabulary) or, with
    probability `statement_fraction` when the record has statements, a statement with its label.
    With probability `grounding_fraction` when the record has `objects`, it is instead a grounding
    sample: the text "the <object name>" and the object's box centre (x, y) in [0, 1] of the
    transformed image (the training crop applied). With `ground_mentions`, every object name that
    occurs in a sample's text (as whole words) is a phrase-grounding annotation, as in Flickr30k
    Entities / MDETR: its tokens get the object's box centre as target. `collate` adds
    `answer_scores` (B, A), `statement_labels` (B,), `is_statement` (B,), `is_grounding` (B,),
    `point_targets` (B, L, 2), `point_mask` (B, L) (tokens with a target), and `pair_offsets` (B, 2)
    with `has_offset` (B,): the first named object's centre minus the second's, for texts naming
    two. With `balance_types` a question is drawn by first drawing one of the record's question
    types (`type`) uniformly, so rarer types (spatial relations) are not starved.
    """

    def __init__(self, records, transform, tokenizer, answers: Sequence[str], statement_fraction: float,
                 seed: int = 0, grounding_fraction: float = 0.0, ground_mentions: bool = False,
                 balance_types: bool = False):
        super().__init__(records, transform, tokenizer=tokenizer, caption="first", seed=seed, cache_images=True)
        self.answer_index = {answer: i for i, answer in enumerate(answers)}
        self.statement_fraction = statement_fraction
        self.grounding_fraction = grounding_fraction
        self.ground_mentions = ground_mentions
        self.balance_types = balance_types

    def _point_map(self, index: int, pixels: torch.Tensor):
        """Input pixel point (x, y) of sample `index` -> its place in the transformed image, in [0, 1]
        (the sample's training crop drawn once, for all its boxes)."""
        image = self._image_cache.get(index)
        if image is None or not hasattr(self.transform, "point_map"):
            return lambda x, y: (x / pixels.shape[-1], y / pixels.shape[-2])  # a plain callable transform: assume no crop
        return self.transform.point_map(image.width, image.height, self.transform_rng(index))

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is None:
            return None
        record, rng = self.records[index], _task_rng(self.seed, self.epoch, index)
        qa, statements = record.get("qa") or [], record.get("statements") or []
        scores = torch.zeros(len(self.answer_index))
        objects = [item for item in record.get("objects") or [] if item.get("name") and item.get("box")]
        sample.update(is_grounding=False, spans=[])
        if objects and self.grounding_fraction and rng.random() < self.grounding_fraction:
            item = rng.choice(objects)
            centre = self._point_map(index, sample["pixels"])(*_box_centre(item["box"]))
            text = f"the {item['name']}"
            sample.update(text=text, is_statement=False, label=0.0, scores=scores, is_grounding=True,
                          spans=[(0, len(text), *centre)])  # every token of the phrase points at it
            return sample
        elif statements and (not qa or rng.random() < self.statement_fraction):
            item = rng.choice(statements)
            sample.update(text=item["text"], is_statement=True, label=float(bool(item["label"])), scores=scores)
        else:
            if self.balance_types:  # a question type first, then a question of that type
                kind = rng.choice(sorted({str(q.get("type")) for q in qa}))
                item = rng.choice([q for q in qa if str(q.get("type")) == kind])
            else:
                item = rng.choice(qa)
            for answer, score in soft_scores(answers_of(item)).items():
                if answer in self.answer_index:  # answers outside the vocabulary count as all-zero targets
                    scores[self.answer_index[answer]] = score
            sample.update(text=item["question"], is_statement=False, label=0.0, scores=scores)
        if self.ground_mentions and objects:
            mentions = [(start, item) for item in objects for start in _word_occurrences(sample["text"], item["name"])]
            if mentions:
                to_output = self._point_map(index, sample["pixels"])
                sample["spans"] = [(start, start + len(item["name"]), *to_output(*_box_centre(item["box"])))
                                   for start, item in mentions]
        return sample

    def collate(self, samples) -> dict:
        batch = super().collate(samples)
        good = [sample for sample in samples if sample is not None]
        batch["answer_scores"] = torch.stack([s["scores"] for s in good]) if good else torch.zeros(0, len(self.answer_index))
        batch["statement_labels"] = torch.tensor([s["label"] for s in good], dtype=torch.float)
        batch["is_statement"] = torch.tensor([s["is_statement"] for s in good], dtype=torch.bool)
        batch["is_grounding"] = torch.tensor([s["is_grounding"] for s in good], dtype=torch.bool)
        batch["point_targets"], batch["point_mask"] = self._point_targets(good, batch["tokens"].shape[1] if good else 0)
        # The first named object's box centre minus the second's, where a text names two objects
        # (each object counted at its first mention): what a spatial-relation question asks about.
        pairs = [list(dict.fromkeys((x, y) for _, _, x, y in sorted(s["spans"])))[:2] for s in good]
        batch["has_offset"] = torch.tensor([len(p) == 2 for p in pairs], dtype=torch.bool)
        batch["pair_offsets"] = torch.tensor([[p[0][0] - p[1][0], p[0][1] - p[1][1]] if len(p) == 2 else [0.0, 0.0]
                                              for p in pairs], dtype=torch.float).reshape(len(good), 2)
        return batch

    def _point_targets(self, samples: Sequence[dict], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token position targets from the samples' character spans, via the tokenizer's offsets."""
        targets, mask = torch.zeros(len(samples), length, 2), torch.zeros(len(samples), length, dtype=torch.bool)
        rows = [row for row, sample in enumerate(samples) if sample["spans"]]
        if not rows:
            return targets, mask
        encodings = self.tokenizer.backend.encode_batch([samples[row]["text"] for row in rows], add_special_tokens=True)
        for row, encoding in zip(rows, encodings):
            for column, ((first, last), special) in enumerate(zip(encoding.offsets[:length], encoding.special_tokens_mask)):
                for start, end, x, y in samples[row]["spans"]:
                    if not special and first < end and last > start:
                        targets[row, column] = torch.tensor((x, y))
                        mask[row, column] = True
        return targets, mask
