"""What every fusion encoder shares: its tasks, fine-tuning heads, training options and task dataset.

A fusion encoder (VisualBERT / UNITER single stream, ViLBERT, LXMERT, MMCA) is pre-trained on image-text
pairs and fine-tuned on one task, all through `vlmkit train`:

    vlmkit train --recipe visualbert-tiny --data train.jsonl --out pre            # task=pretrain (default)
    vlmkit train --recipe visualbert-tiny --data train.jsonl --out vqa --init pre task=vqa

Tasks (`FUSION_TASKS`, the training option `task`):
- `pretrain`: caption pairs; masked language modelling on matched pairs + image-text matching (half
  of the captions swapped for another image's, `negative_fraction`); families add their own
  objectives (masked region modelling, word-region alignment) on the same batch;
- `vqa`: soft-score classification over the answer vocabulary (`FusionHeads.answer`; VQA v2's
  targets min(1, n/3), `data.records.soft_scores`; BCE times the vocabulary size as the VQA v2
  baselines);
- `reasoning`: true/false of a statement about the image (`FusionHeads.reasoning`, BCE);
- `retrieval`: the ITM head fine-tuned on matched / swapped captions (`FusionHeads.itm`, CE, class
  1 = match); it scores retrieval candidates (`MatchesImageText`).

`FusionHeads(width, num_answers)` holds the three heads on the family's pooled (B, width) feature:
`answer` (LXMERT/UNITER layout `logit_fc` = Linear(W, 2W), GELU, LayerNorm, Linear(2W, A), or one
Linear for HF VisualBERT: `answer_head="linear"`), `reasoning` (the same MLP with one output) and
`itm` (Linear(W, 2)). `fusion_task_loss(heads, pooled, batch, task)` is the loss of the fine-tuning
tasks (and ITM in pre-training); `masked_lm_loss` is MLM with the vocabulary head run on the labelled
positions only. `keep_fresh_heads` is the `adapt_init_state` of a family: a head
whose shape changed (a new answer vocabulary) starts afresh.

`FusionTaskDataset` draws the samples of a task and adds the visual inputs of `encoders.regions`;
its batches carry `pixels`, `tokens`, `boxes` / `region_mask` / `region_labels`, and the targets of
their task only: `itm_labels` (B,) (1 = match; pretrain and retrieval), `mlm_labels` (B, L) (-100 = not predicted; `tokens` then holds the
masked ids), `answer_scores` (B, A), `statement_labels` (B,), plus `batch_seed` (an int) for draws
inside the step (which regions to mask).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import bounded
from vlmkit.data.loader import ImageTextDataset, batch_seed, task_rng
from vlmkit.data.records import answers_of, soft_scores
from vlmkit.encoders.regions import VisualInputConfig, collate_regions, sample_regions
from vlmkit.errors import UserError

FUSION_TASKS = ("pretrain", "vqa", "reasoning", "retrieval")
IGNORE = -100  # an MLM label that is not predicted (PyTorch's cross-entropy default)
BAD_BOXES = "object box outside the image, of zero area or malformed"  # a training skip reason


@dataclass
class FusionTraining:
    """Training options every fusion encoder has (a family subclasses it to add its own losses)."""

    task: str = "pretrain"  # pretrain | vqa | reasoning | retrieval
    mlm_probability: float = bounded(0.15, low=0, high=1, low_open=True)  # BERT's share of masked words
    negative_fraction: float = bounded(0.5, low=0, high=1)  # ITM: captions swapped for another image's
    balance_question_types: bool = False  # vqa: draw a question type uniformly, then a question of it
    mlm_weight: float = bounded(1.0, low=0)
    itm_weight: float = bounded(1.0, low=0)

    def __post_init__(self) -> None:
        if self.task not in FUSION_TASKS:
            raise UserError(f"unknown fusion task '{self.task}'; use one of {', '.join(FUSION_TASKS)} (task=...)")


# ---- heads ---------------------------------------------------------------------------------

class AnswerHead(nn.Module):
    """(B, W) -> (B, out): `logit_fc` = Linear(W, 2W), GELU, LayerNorm, Linear(2W, out) (LXMERT's and
    UNITER's answer head; parameter names as LXMERT's `answer_head.logit_fc.{0,2,3}`), or one Linear."""

    def __init__(self, width: int, out: int, kind: str = "mlp", eps: float = 1e-12) -> None:
        super().__init__()
        if kind == "mlp":
            self.logit_fc = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.LayerNorm(2 * width, eps=eps),
                                          nn.Linear(2 * width, out))
        elif kind == "linear":
            self.logit_fc = nn.Sequential(nn.Linear(width, out))
        else:
            raise UserError(f"answer_head must be 'mlp' or 'linear', not {kind!r}")

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.logit_fc(pooled)


class FusionHeads(nn.Module):
    """The fine-tuning heads shared by every fusion family, on its pooled (B, W) feature (`answer` is None
    when `num_answers` is 0)."""

    def __init__(self, width: int, num_answers: int, answer_head: str = "mlp", eps: float = 1e-12) -> None:
        super().__init__()
        # (B, A) VQA logits; None without an answer vocabulary (a checkpoint with no VQA head)
        self.answer = AnswerHead(width, num_answers, answer_head, eps) if num_answers else None
        self.reasoning = AnswerHead(width, 1, "mlp", eps)  # (B, 1) true/false logit
        self.itm = nn.Linear(width, 2)  # (B, 2) [no match, match]


def soft_score_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """VQA v2's soft-score BCE: mean over (question, answer) pairs of BCE(logit, score), times the
    number of answers (= the sum over answers, averaged over questions)."""
    return F.binary_cross_entropy_with_logits(logits, scores) * scores.shape[1]


def fusion_task_loss(heads: FusionHeads, pooled: torch.Tensor, batch: dict, task: str
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The loss of `task` on the pooled feature (B, W): (loss, logs, logits). Pre-training and retrieval
    train the ITM head (`itm_labels`, 1 = match); vqa the answer head on `answer_scores`; reasoning the
    true/false head on `statement_labels`."""
    if task == "vqa":
        if heads.answer is None:
            raise UserError("this model has no answer head (no answer vocabulary); fine-tune it on records with 'qa'")
        logits, scores = heads.answer(pooled), batch["answer_scores"]  # (B, A), (B, A)
        loss = soft_score_loss(logits, scores)
        return loss, {"vqa_loss": loss, "vqa_acc": scores.gather(1, logits.argmax(-1, keepdim=True)).mean()}, logits
    if task == "reasoning":
        logits, labels = heads.reasoning(pooled)[:, 0], batch["statement_labels"]  # (B,), (B,)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        return loss, {"reasoning_loss": loss, "reasoning_acc": ((logits > 0).float() == labels).float().mean()}, logits
    logits, labels = heads.itm(pooled), batch["itm_labels"]  # (B, 2), (B,)
    loss = F.cross_entropy(logits, labels)
    return loss, {"itm_loss": loss, "itm_acc": (logits.argmax(-1) == labels).float().mean()}, logits


def masked_lm_loss(logits_of, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERT's masked-language-modelling cross-entropy over the positions with a label (`labels` (B, L), IGNORE
    elsewhere), hidden states (B, L, D); `logits_of` maps (M, D) hidden states to (M, V) vocabulary logits.

    The head runs on the M labelled positions only (about 15% of them), not on all B x L: the same mean as
    cross-entropy with `ignore_index` over every position, without the vocabulary matmul and softmax of the
    positions it would ignore (HF's VisualBERT and LXMERT heads compute all of them)."""
    chosen = labels != IGNORE  # (B, L)
    return F.cross_entropy(logits_of(hidden[chosen]), labels[chosen])  # logits (M, V)


def keep_fresh_heads(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     prefixes: Sequence[str] = ("heads.answer.",)) -> dict[str, torch.Tensor]:
    """A family's `adapt_init_state`: where a head under `prefixes` changed shape (fine-tuning data with
    another answer vocabulary), keep the model's fresh initialisation for it (noted on stderr); every
    other key must still match exactly (the strict load checks it)."""
    state = dict(state)
    changed = [key for key in expected if key.startswith(tuple(prefixes)) and key in state
               and state[key].shape != expected[key].shape]
    for key in changed:
        state[key] = expected[key]
    if changed:
        print(f"vlmkit: note: the answer vocabulary differs from the initial run's; the answer head starts afresh "
              f"({len(changed)} tensors)", file=sys.stderr)
    return state


# ---- data ----------------------------------------------------------------------------------

def task_records(records: Sequence[dict], task: str, family: str) -> list[dict]:
    """The records a task trains on (captions, questions or statements, with an image), or a UserError."""
    need = {"pretrain": "texts", "retrieval": "texts", "vqa": "qa", "reasoning": "statements"}[task]
    chosen = [record for record in records if record.get(need) and record.get("image")]
    if not chosen:
        field = {"texts": "captions ('text' or 'texts')", "qa": "questions ('qa')", "statements": "statements"}[need]
        raise UserError(f"no training record has an image and {field}, which the '{family}' family's task '{task}' "
                        f"trains on; give such records or another task=")
    if task in ("pretrain", "retrieval") and len(chosen) < 2:
        raise UserError(f"task '{task}' draws non-matching captions from other images and needs at least 2 records "
                        f"with captions; found {len(chosen)}")
    return chosen


def mask_tokens(tokens: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each `maskable` (B, L) token is chosen with `probability` (at least one per row
    with any); of the chosen 80% become `mask_id`, 10% a random id, 10% stay. -> (masked tokens, labels
    with IGNORE where not chosen)."""
    draw = torch.rand(tokens.shape, generator=generator)
    chosen = (draw < probability) & maskable
    # a row with maskable tokens but none drawn gets its lowest-draw one (every pair teaches something)
    lowest = draw.masked_fill(~maskable, 2.0).argmin(dim=1)
    empty = ~chosen.any(dim=1) & maskable.any(dim=1)
    chosen[empty, lowest[empty]] = True
    labels = tokens.masked_fill(~chosen, IGNORE)
    action = torch.rand(tokens.shape, generator=generator)
    masked = tokens.clone()
    masked[chosen & (action < 0.8)] = mask_id
    randoms = chosen & (action >= 0.8) & (action < 0.9)
    masked[randoms] = torch.randint(0, vocab_size, tokens.shape, generator=generator)[randoms]
    return masked, labels


class FusionTaskDataset(ImageTextDataset):
    """The samples of one fusion task (see the module docstring) with the record's regions.

    `answers`: the answer vocabulary (vqa); `classes`: the region classes `region_labels` index;
    `visual`: the family's visual input config (grid-only families read no boxes); `image_size`: the
    transformed image's side; `vocab_size`: for BERT's random replacements. Images are cached in memory.
    """

    def __init__(self, records: Sequence[dict], transform, tokenizer, options: FusionTraining, family: str,
                 answers: Sequence[str], classes: Sequence[str], visual: VisualInputConfig, image_size: int,
                 vocab_size: int, seed: int = 0) -> None:
        records = task_records(records, options.task, family)
        super().__init__(records, transform, tokenizer=tokenizer, caption="random", seed=seed, cache_images=True)
        if options.task == "pretrain" and getattr(tokenizer, "mask_id", None) is None:
            raise UserError(f"the '{family}' family pre-trains with masked language modelling and needs a tokenizer with a "
                            f"[MASK] token; use tokenizer: wordpiece in the recipe")
        self.options, self.family = options, family
        self.answer_index = {answer: i for i, answer in enumerate(answers)}
        self.classes, self.visual, self.image_size, self.vocab_size = list(classes), visual, image_size, vocab_size

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is None:
            return None
        options, record = self.options, self.records[index]
        rng = task_rng(self.seed, self.epoch, index)
        task = options.task
        sample["matched"] = 1
        if task in ("pretrain", "retrieval"):
            if rng.random() < options.negative_fraction:  # a caption of another image (not one of this image's)
                own = set(record["texts"])
                for _ in range(8):
                    other = self.records[rng.randrange(len(self.records))]
                    if other is not record and not own.intersection(other["texts"]):
                        sample.update(text=rng.choice(other["texts"]), matched=0)
                        break
        elif task == "vqa":
            qa = record["qa"]
            if options.balance_question_types:
                kind = rng.choice(sorted({str(q.get("type")) for q in qa}))
                qa = [q for q in qa if str(q.get("type")) == kind]
            item = rng.choice(qa)
            scores = torch.zeros(len(self.answer_index))
            for answer, score in soft_scores(answers_of(item)).items():
                if answer in self.answer_index:  # answers outside the vocabulary count as all-zero targets
                    scores[self.answer_index[answer]] = score
            sample.update(text=item["question"], scores=scores)
        else:
            item = rng.choice(record["statements"])
            sample.update(text=item["text"], label=float(bool(item["label"])))
        if self.visual.source == "grid":
            sample.update(boxes=torch.zeros(0, 4), region_labels=torch.zeros(0, dtype=torch.long))
        else:
            try:
                sample.update(sample_regions(record, self._image_cache[index], self.transform, self.transform_rng(index),
                                             self.image_size, self.classes, self.visual.max_regions))
            except UserError:  # boxes outside the image or of zero area: skipped and counted, as a bad image is
                self._pending_skips.append({"index": index, "image": record["image"], "reason": BAD_BOXES})
                return None
        return sample

    def collate(self, samples: Sequence[dict | None]) -> dict:
        bad_boxes = sum(item["reason"] == BAD_BOXES for item in self._pending_skips)
        batch = super().collate(samples)
        if bad_boxes:
            unreadable = batch["num_skipped"] - bad_boxes
            batch["skip_reasons"] = {BAD_BOXES: bad_boxes, **({"unreadable image": unreadable} if unreadable else {})}
        good = [sample for sample in samples if sample is not None]
        batch.update(collate_regions(good))
        batch["batch_seed"] = batch_seed(self.seed, self.epoch, batch["indices"])
        task = self.options.task
        if task in ("pretrain", "retrieval"):  # a batch carries the targets of its task only
            batch["itm_labels"] = torch.tensor([s["matched"] for s in good], dtype=torch.long)
        if task == "vqa":
            batch["answer_scores"] = torch.stack([s["scores"] for s in good]) if good else torch.zeros(0, len(self.answer_index))
        elif task == "reasoning":
            batch["statement_labels"] = torch.tensor([s["label"] for s in good], dtype=torch.float)
        elif task == "pretrain" and good:
            tokens = batch["tokens"]
            tokenizer = self.tokenizer
            specials = torch.tensor([i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None])
            maskable = tokenizer.attention_mask(tokens) & ~torch.isin(tokens, specials)
            maskable &= batch["itm_labels"][:, None].bool()  # words are predicted on matched pairs only (UNITER)
            generator = torch.Generator().manual_seed(batch["batch_seed"])
            batch["tokens"], batch["mlm_labels"] = mask_tokens(tokens, maskable, tokenizer.mask_id, self.vocab_size,
                                                               self.options.mlm_probability, generator)
        return batch
