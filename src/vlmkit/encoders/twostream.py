"""Pieces the two-stream fusion encoders (ViLBERT, LXMERT) share, below the family files.

- `RegionEmbedding`: region features (B, N, F) and their boxes (B, N, P) -> visual tokens (B, N, D),
  LXMERT's `(LN(fc(feat)) + LN(fc(box))) / 2` (`combine="mean"`) or ViLBERT's
  `LN(fc(feat) + fc(box))` (`combine="sum"`).
- `Pooler`: tanh(dense(first token)), BERT's pooled output.
- `RegionHead`: dense -> activation -> LayerNorm, then one linear decoder per masked-region target
  (the region's feature for regression, its class for classification); HF's `LxmertVisualObjHead`.
- `AnswerHead`: LXMERT's question-answering MLP (Linear(D, 2D) -> GELU -> LayerNorm -> Linear(2D, A)).
- `mask_tokens` / `mask_regions`: the masked language / region modelling corruption, drawn from an
  explicit generator so a step's masks are a function of the batch (reproducible, resumable).
- `feature_regression_loss`: LXMERT's masked-feature loss, SmoothL1 over the masked regions.
- `RegionTextDataset`: pre-training samples (image + boxes + a caption, or a question with its
  answers' soft scores) in the `encoders.regions` batch contract.

The streams themselves are `layers.transformer.Transformer` stacks and `CoAttentionBlock`s; each
family composes them in its own order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.formats import load_image
from vlmkit.data.loader import ImageTextDataset, batch_seed, task_rng
from vlmkit.data.records import answers_of
from vlmkit.encoders.regions import collate_regions, sample_regions
from vlmkit.errors import UserError
from vlmkit.layers.mlp import make_activation

IGNORE_INDEX = -100  # cross-entropy's "no target here"


class RegionEmbedding(nn.Module):
    """Region features and box geometry -> visual tokens. (B, N, F), (B, N, P) -> (B, N, D)"""

    def __init__(self, feat_dim: int, pos_dim: int, width: int, norm_eps: float = 1e-12, combine: str = "mean") -> None:
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"unknown region combine '{combine}'; use 'mean' (LXMERT) or 'sum' (ViLBERT)")
        self.combine = combine
        self.feat_fc = nn.Linear(feat_dim, width)
        self.box_fc = nn.Linear(pos_dim, width)
        if combine == "mean":  # each part normalised on its own, then averaged
            self.feat_norm = nn.LayerNorm(width, eps=norm_eps)
            self.box_norm = nn.LayerNorm(width, eps=norm_eps)
        else:
            self.norm = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.combine == "mean":
            return (self.feat_norm(self.feat_fc(feats)) + self.box_norm(self.box_fc(boxes))) / 2  # (B, N, D)
        return self.norm(self.feat_fc(feats) + self.box_fc(boxes))  # (B, N, D)


class Pooler(nn.Module):
    """BERT's pooled output: tanh(dense(hidden[:, 0])). (B, T, D) -> (B, D)"""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class RegionHead(nn.Module):
    """Masked region modelling: a shared transform, then `decoders[name]` (Linear to `sizes[name]`)."""

    def __init__(self, width: int, sizes: dict[str, int], activation: str = "gelu", norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = make_activation(activation)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.decoders = nn.ModuleDict({name: nn.Linear(width, size) for name, size in sizes.items()})

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.norm(self.activation(self.dense(hidden)))  # (B, N, D)
        return {name: decoder(shared) for name, decoder in self.decoders.items()}  # name -> (B, N, size)


class AnswerHead(nn.Module):
    """LXMERT's answer classifier over the pooled output. (B, D) -> (B, A)"""

    def __init__(self, width: int, num_answers: int, norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width, eps=norm_eps)
        self.fc2 = nn.Linear(2 * width, num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(pooled))))


def mask_tokens(tokens: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption: each `maskable` token (B, L) is chosen with `probability`; a chosen
    token becomes [MASK] 80% of the time, a random token 10%, stays 10%. Returns the corrupted
    tokens and the labels (the original id where chosen, IGNORE_INDEX elsewhere); at least one
    token per batch is chosen, so the loss is never an empty mean."""
    draws = torch.rand(tokens.shape, generator=generator).to(tokens.device)  # (B, L) in [0, 1)
    chosen = (draws < probability) & maskable
    if not chosen.any() and maskable.any():  # tiny batches: never a step without a target
        first = maskable.flatten().nonzero()[0]
        chosen = chosen.flatten().index_fill(0, first, True).view_as(chosen)
    kind = torch.rand(tokens.shape, generator=generator).to(tokens.device)  # (B, L): which corruption
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator).to(tokens.device)
    corrupted = torch.where(chosen & (kind < 0.8), torch.full_like(tokens, mask_id), tokens)
    corrupted = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return corrupted, labels


def mask_regions(real: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """(B, N) bool: which real regions are masked (LXMERT zeroes their features), at least one per batch."""
    chosen = (torch.rand(real.shape, generator=generator).to(real.device) < probability) & real
    if not chosen.any() and real.any():
        first = real.flatten().nonzero()[0]
        chosen = chosen.flatten().index_fill(0, first, True).view_as(chosen)
    return chosen


def mismatched_images(batch_size: int, probability: float, generator: torch.Generator, device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-text matching negatives: (matched (B,) bool, source (B,) long), row b then sees the image of
    row source[b]; a `probability` share of the rows get another row's image (one shift by 1..B-1 for the
    batch, so a row never gets its own). A batch of one has no negatives."""
    source = torch.arange(batch_size, device=device)
    if batch_size < 2:
        return torch.ones(batch_size, dtype=torch.bool, device=device), source
    matched = (torch.rand(batch_size, generator=generator) >= probability).to(device)
    shift = int(torch.randint(1, batch_size, (1,), generator=generator))
    return matched, torch.where(matched, source, (source + shift) % batch_size)


def maskable_tokens(tokens: torch.Tensor, pad_id: int, eos_id: int | None) -> torch.Tensor:
    """(B, L) bool: the tokens MLM may corrupt: not padding, not the first ([CLS]) and not [SEP]."""
    maskable = (tokens != pad_id) & (torch.arange(tokens.shape[1], device=tokens.device) > 0)
    return maskable & (tokens != eos_id) if eos_id is not None else maskable


def soft_region_loss(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Masked region classification against a label distribution: cross-entropy of (B, N, K) logits with
    soft (B, N, K) targets over the regions `rows` (B, N) that have one; equal to KL(targets || predicted)
    (ViLBERT, UNITER's MRC-kl) up to the targets' entropy, which has no gradient."""
    rows = rows & (targets.sum(-1) > 0)
    if not rows.any():
        return logits.sum() * 0.0  # keeps the head in the graph
    return -(targets[rows] * F.log_softmax(logits[rows], dim=-1)).sum(-1).mean()


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """LXMERT's masked-feature loss: SmoothL1 between predicted and original features (B, N, F),
    averaged over the features of the masked regions `masked` (B, N)."""
    if not masked.any():
        return predicted.sum() * 0.0  # keeps every head in the graph
    return F.smooth_l1_loss(predicted[masked], target[masked])


# ---- pre-training data: captions (and questions) with their image's regions -----------------------

def answer_vocabulary(records, limit: int) -> list[str]:
    """The `limit` most frequent normalised answers of the records' `qa` (ties by name)."""
    from collections import Counter

    from vlmkit.metrics.vqa import normalize_answer

    counts = Counter(normalize_answer(a) for record in records for item in record.get("qa") or [] for a in answers_of(item))
    return [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def _soft_scores(answers) -> dict[str, float]:
    """VQA v2 soft targets: min(1, count / 3) per normalised answer (1.0 when there is one answer)."""
    from collections import Counter

    from vlmkit.metrics.vqa import normalize_answer

    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: 1.0 if len(answers) == 1 else min(1.0, count / 3.0) for answer, count in counts.items()}


class RegionTextDataset(ImageTextDataset):
    """The pre-training dataset of a two-stream family: each sample is an image with its object boxes
    (`encoders.regions` batch contract, mapped through the sample's crop) and one caption, or, with
    probability `question_fraction` when the record has `qa` and `answers` is given, one of its
    questions with VQA soft scores over `answers` (LXMERT's QA pre-training task). `collate` adds
    `boxes`, `region_mask`, `region_labels`, `answer_scores` (B, A), `has_answer` (B,) and `seed`
    (a function of the run seed, the epoch and the batch's samples: the step's masks)."""

    def __init__(self, records, transform, tokenizer, seed: int, image_size: int, classes: Sequence[str], max_regions: int,
                 answers: Sequence[str] = (), question_fraction: float = 0.0) -> None:
        kept = [record for record in records if record.get("texts") and "image" in record]
        if not kept:
            raise UserError("no training record has an image and captions ('text' or 'texts'), which two-stream "
                            "pre-training reads; give an image-caption dataset")
        super().__init__(kept, transform, tokenizer=tokenizer, caption="random", seed=seed, cache_images=True)
        self.image_size, self.classes, self.max_regions = image_size, list(classes), max_regions
        self.answers, self.question_fraction = list(answers), question_fraction
        self.answer_index = {answer: i for i, answer in enumerate(self.answers)}

    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        if sample is None:
            return None
        record = self.records[index]
        image = self._image_cache.get(index) or load_image(record["image"])
        sample.update(sample_regions(record, image, self.transform, self.transform_rng(index), self.image_size,
                                     self.classes, self.max_regions))
        scores, has_answer = torch.zeros(len(self.answers)), False
        qa = record.get("qa") or []
        rng = task_rng(self.seed, self.epoch, index)
        if self.answers and qa and rng.random() < self.question_fraction:
            item = rng.choice(qa)
            for answer, score in _soft_scores(answers_of(item)).items():
                if answer in self.answer_index:  # answers outside the vocabulary count as all-zero targets
                    scores[self.answer_index[answer]] = score
            sample["text"], has_answer = item["question"], True
        sample.update(answer_scores=scores, has_answer=has_answer)
        return sample

    def collate(self, samples):
        batch = super().collate(samples)
        good = [sample for sample in samples if sample is not None]
        batch.update(collate_regions(good))
        batch["answer_scores"] = torch.stack([s["answer_scores"] for s in good]) if good else torch.zeros(0, len(self.answers))
        batch["has_answer"] = torch.tensor([s["has_answer"] for s in good], dtype=torch.bool)
        batch["seed"] = batch_seed(self.seed, self.epoch, batch["indices"])
        return batch
