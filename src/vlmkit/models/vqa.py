"""Discriminative VQA and visual reasoning: a fusion encoder with two classification heads.

image -> ViT -> tokens (B, 1+N, Dv)       question / statement -> bidirectional text tower (B, L, D)
fused = fusion blocks (self-attention over text, cross-attention to the image tokens) (B, L, D)
pooled = fused[:, 0] (the start token)
- VQA as classification over an answer vocabulary (VQA v2 style): BCE against soft scores
  min(1, #humans who gave the answer / 3), scaled by the number of answers as in the VQA v2
  baselines. The vocabulary is the `max_answers` most frequent normalised training answers, set
  by `adapt_config_to_data` when the trainer builds the model; there is no built-in list.
- Visual reasoning (NLVR-style): a true/false logit for a statement about the image.

Spatial relations (an option of this family, docs/generation.md "Spatial relations"): "is the red
circle left of the blue square?", asked in its true or mirrored form at random, is an XOR of the
asked word and where the two named objects are, which the pooled feature alone did not learn.
Two architecture switches and their training losses make each part directly supervised:
- `pointer` (SoftArgmaxPointer): each text token soft-argmaxes over the patch grid; with the
  training options `ground_mentions` / `grounding_fraction` the tokens of an object name (inside
  questions and statements, or in "the red circle" grounding samples) are pulled (L1) to that
  object's box centre in the augmented image, as in phrase grounding (Flickr30k Entities, MDETR).
  Needs records with `objects` (`[{name, box}]`).
- `offset_readout` (OffsetReadout, needs the pointer): the offset between the two objects a text
  names, read from the pointed positions (L1 to the true offset with `offset_weight`), fused
  bilinearly with the question's words and added to the pooled feature.

The generative formulation of the same questions is SimVLM with the question as prefix
(`vlmkit eval vqa` scores both the same way).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Answers, Verifies
from vlmkit.data.loader import ImageTextDataset, task_rng
from vlmkit.data.records import answer_vocabulary, answers_of, record_texts, soft_scores  # noqa: F401 (soft_scores re-exported)
from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import MLP
from vlmkit.layers.transformer import Transformer
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class VQAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(causal=False, pool="cls", eos_token_id=None))
    fusion_depth: int = 2
    answers: tuple[str, ...] = ()  # normalised answers, the classifier's classes: set from the training data
    max_answers: int = 3129  # VQA v2's usual vocabulary size: the most frequent training answers
    pointer: bool = False  # spatial relations: a soft-argmax pointer from text tokens to the patch grid
    offset_readout: bool = False  # spatial relations: the named objects' offset, with the words, into the pooled feature


@dataclass
class VQATraining:
    """The recipe's `training:` options of the VQA / reasoning classifier."""

    statement_fraction: float = 0.5  # share of samples that are statements (records with both)
    balance_question_types: bool = False  # draw a question type uniformly, then a question of it
    grounding_fraction: float = 0.0  # share of samples that ground an object name (records with objects; needs pointer)
    grounding_weight: float = 1.0  # weight of the box-centre L1 loss
    ground_mentions: bool = False  # also ground object names inside questions/statements (needs pointer)
    offset_weight: float = 0.0  # weight of the L1 loss of the readout's offset to the true one (needs offset_readout)


# ---- spatial relations: pointing at the patch grid, and reading the offset of two named objects ----

def grid_centres(grid_size: int) -> torch.Tensor:
    """(grid_size**2, 2) centres (x, y) in [0, 1] of a square grid's cells, in row-major order."""
    steps = (torch.arange(grid_size, dtype=torch.float) + 0.5) / grid_size
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


class SoftArgmaxPointer(nn.Module):
    """queries (B, L, Dq), grid tokens (B, G*G, Dk) row-major -> positions (B, L, 2), weights (B, L, G*G).

    Each query scores every grid cell (a dot product of projections); the softmax over cells weights
    the cells' centre coordinates, giving a differentiable position in [0, 1]^2 (x right, y down).
    """

    def __init__(self, query_dim: int, key_dim: int, grid_size: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.key = nn.Linear(key_dim, dim)
        self.grid_size = grid_size  # centres are rebuilt per call: a buffer would stay on `meta` in from_pretrained

    def forward(self, queries: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.query(queries), self.key(grid)  # (B, L, d), (B, N, d)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, L, N)
        centres = grid_centres(self.grid_size).to(weights.device, weights.dtype)  # (N, 2)
        return weights @ centres, weights  # (B, L, 2), (B, L, N)


class OffsetReadout(nn.Module):
    """tokens (B, L, D), points (B, L, 2), token ids (B, L), real (B, L) bool -> feature (B, D), offset (B, 2).

    With the relation asked in its true or mirrored form at random, neither the relation word nor the
    objects' offset alone says anything, so a pooled feature that must assemble both through
    attention gets no gradient until everything is in place. Here each part is a direct step:
    1. two attention slots over the text tokens pick the "first" and the "second" named object and
       average the positions their tokens point at: offset = p_first - p_second, trainable (L1);
    2. the question is a bag of dedicated learned word vectors (the contextual token features carry
       *which* relation word was asked only weakly, since no other objective needs it);
    3. the two meet in a low-rank bilinear product (MLB, Kim et al., 2017),
       out(words * tanh(embed(offset))), in which "left of and offset x < 0" is linear.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.slots = nn.Linear(dim, 2)  # attention logits of the first and the second named object
        self.offset_embed = MLP(2, dim, out_dim=dim)
        self.words = nn.Embedding(vocab_size, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, points: torch.Tensor, token_ids: torch.Tensor,
                real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slots(tokens).masked_fill(~real[..., None], float("-inf")).softmax(1)  # (B, L, 2)
        located = slots.transpose(1, 2) @ points  # (B, 2 slots, 2 coordinates)
        offset = located[:, 0] - located[:, 1]  # (B, 2): first minus second, x right and y down
        words = (self.words(token_ids) * real[..., None]).sum(1)  # (B, D)
        return self.out(words * torch.tanh(self.offset_embed(offset))), offset  # (B, D), (B, 2)


def _word_occurrences(text: str, phrase: str) -> list[int]:
    """Start offsets of `phrase` in `text` as whole words (case-insensitive)."""
    return [match.start() for match in re.finditer(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower())]


def _box_centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


class QuestionStatementDataset(ImageTextDataset):
    """Samples for the VQA classifier and the true/false reasoning head, drawn as `options` (VQATraining) say.

    Each sample is a question (with soft scores over `answers`, the answer vocabulary) or, with
    probability `statement_fraction` when the record has statements, a statement with its label.
    With `balance_question_types` a question is drawn by first drawing one of the record's question
    types (`type`) uniformly, so rarer types (spatial relations) are not starved.
    Spatial-relation targets, from records with `objects`: with probability `grounding_fraction` a
    sample is instead a grounding sample, the text "the <object name>" and the object's box centre
    (x, y) in [0, 1] of the transformed image (the training crop applied). With `ground_mentions`
    every object name occurring in a sample's text (as whole words) is a phrase-grounding
    annotation: its tokens get the object's box centre as target. `collate` adds `answer_scores`
    (B, A), `statement_labels` (B,), `is_statement` (B,), `is_grounding` (B,), `point_targets`
    (B, L, 2), `point_mask` (B, L) (tokens with a target), and `pair_offsets` (B, 2) with
    `has_offset` (B,): the first named object's centre minus the second's, for texts naming two.
    """

    def __init__(self, records, transform, tokenizer, answers: Sequence[str], options: VQATraining, seed: int = 0):
        super().__init__(records, transform, tokenizer=tokenizer, caption="first", seed=seed, cache_images=True)
        self.answer_index = {answer: i for i, answer in enumerate(answers)}
        self.options = options

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
        options, record, rng = self.options, self.records[index], task_rng(self.seed, self.epoch, index)
        qa, statements = record.get("qa") or [], record.get("statements") or []
        scores = torch.zeros(len(self.answer_index))
        objects = [item for item in record.get("objects") or [] if item.get("name") and item.get("box")]
        sample.update(is_grounding=False, spans=[])
        if objects and options.grounding_fraction and rng.random() < options.grounding_fraction:
            item = rng.choice(objects)
            centre = self._point_map(index, sample["pixels"])(*_box_centre(item["box"]))
            text = f"the {item['name']}"
            sample.update(text=text, is_statement=False, label=0.0, scores=scores, is_grounding=True,
                          spans=[(0, len(text), *centre)])  # every token of the phrase points at it
            return sample
        if statements and (not qa or rng.random() < options.statement_fraction):
            item = rng.choice(statements)
            sample.update(text=item["text"], is_statement=True, label=float(bool(item["label"])), scores=scores)
        else:
            if options.balance_question_types:  # a question type first, then a question of that type
                kind = rng.choice(sorted({str(q.get("type")) for q in qa}))
                item = rng.choice([q for q in qa if str(q.get("type")) == kind])
            else:
                item = rng.choice(qa)
            for answer, score in soft_scores(answers_of(item)).items():
                if answer in self.answer_index:  # answers outside the vocabulary count as all-zero targets
                    scores[self.answer_index[answer]] = score
            sample.update(text=item["question"], is_statement=False, label=0.0, scores=scores)
        if options.ground_mentions and objects:
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


@register_family
class VQAClassifier(VLModel):
    family = "vqa"
    config_class = VQAConfig
    capabilities = (Answers, Verifies)
    training_class = VQATraining
    towers = {"image": "visual", "text": "text"}
    # The vocabulary normally comes from the training answers; tests and examples build without data.
    example_config = {"answers": ["yes", "no", "0", "1", "2", "red", "blue", "circle", "square"]}

    def __init__(self, config: VQAConfig) -> None:
        super().__init__(config)
        if not config.answers:
            raise UserError("the VQA model has no answer vocabulary: pass answers=[...] (model.answers=[...] on the "
                            "command line) or train it on records with 'qa'")
        if config.offset_readout and not config.pointer:
            raise UserError("the offset readout reads the pointer's positions; set pointer: true as well")
        width = config.text.width
        self.visual = build_vision_tower(config.vision, None)
        self.text = build_text_tower(config.text, None)
        self.fusion = Transformer(width, config.fusion_depth, config.text.heads, mlp_ratio=config.text.mlp_ratio,
                                  activation=config.text.activation, context_dim=config.vision.width)
        self.answer_head = MLP(width, 2 * width, out_dim=len(config.answers))
        self.reasoning_head = MLP(width, width, out_dim=1)
        grid = config.vision.image_size // config.vision.patch_size
        self.pointer = SoftArgmaxPointer(width, config.vision.width, grid) if config.pointer else None
        self.offset_readout = OffsetReadout(width, config.text.vocab_size) if config.offset_readout else None

    def set_training_options(self, options) -> None:
        super().set_training_options(options)
        chosen = self.training_options
        if (chosen.grounding_fraction > 0 or chosen.ground_mentions) and self.pointer is None:
            raise UserError("training.grounding_fraction / ground_mentions train the pointer; set model.pointer=true")
        if chosen.offset_weight > 0 and self.offset_readout is None:
            raise UserError("training.offset_weight trains the offset readout; set model.offset_readout=true")

    @classmethod
    def adapt_config_to_data(cls, config, records):
        """The answer vocabulary: the `max_answers` most frequent normalised training answers."""
        answers = answer_vocabulary(records, config.get("max_answers", VQAConfig.max_answers))
        if answers:
            config["answers"] = answers
        return config

    @classmethod
    def tokenizer_texts(cls, records):
        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        records = [record for record in records if record.get("qa") or record.get("statements")]
        if not records:
            raise UserError("no training record has questions ('qa') or statements ('statements') for the VQA model")
        return QuestionStatementDataset(records, transform, tokenizer, self.config.answers, self.training_options, seed=seed)

    def fused(self, pixels: torch.Tensor, tokens: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The pooled image+text feature (B, D), each token's pointed image position (B, L, 2) and the
        offset between the two named objects (B, 2); the last two are None without a pointer/readout."""
        image = self.visual.norm_post(self.visual(pixels).tokens)  # (B, 1+N, Dv)
        text = self.text(tokens).tokens  # (B, L, D)
        points = offset = None
        if self.pointer is not None:
            points, _ = self.pointer(text, image[:, 1:])  # (B, L, 2): patch tokens only, row-major grid
        real = self.text.real_tokens(tokens)  # (B, L)
        fused = self.fusion(text, mask=padding_mask(real), context=image)  # (B, L, D)
        pooled = fused[:, 0]  # (B, D)
        if self.offset_readout is not None:
            feature, offset = self.offset_readout(fused, points, tokens, real)  # (B, D), (B, 2)
            pooled = pooled + feature
        return pooled, points, offset

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pooled, points, offset = self.fused(batch["pixels"], batch["tokens"])  # (B, D), (B, L, 2) | None, (B, 2) | None
        answer_logits = self.answer_head(pooled)  # (B, A)
        truth_logits = self.reasoning_head(pooled)[:, 0]  # (B,)
        is_statement = batch["is_statement"]  # (B,) bool
        is_grounding = batch.get("is_grounding", torch.zeros_like(is_statement))  # (B,) bool: "the red circle" samples
        is_question = ~is_statement & ~is_grounding  # (B,) bool
        options, loss, logs = self.training_options, pooled.new_zeros(()), {}
        # Spatial relations (batches carry these only when the training options turn them on).
        named = batch.get("point_mask")  # (B, L) bool: tokens that name an object
        if points is not None and named is not None and named.any():
            grounding = (points - batch["point_targets"]).abs().sum(-1)[named].mean()  # L1 (x + y) to the box centres
            loss = loss + options.grounding_weight * grounding
            logs.update(grounding_loss=grounding)
        has_offset = batch.get("has_offset")  # (B,) bool: the text names two objects
        if options.offset_weight > 0 and has_offset is not None and has_offset.any():
            offset_loss = (offset[has_offset] - batch["pair_offsets"][has_offset]).abs().sum(-1).mean()  # L1, true offset
            loss = loss + options.offset_weight * offset_loss
            logs.update(offset_loss=offset_loss)
        # Questions: BCE on VQA v2 soft scores, times the number of answers (the VQA v2 baselines' scale).
        if is_question.any():
            scores, logits = batch["answer_scores"][is_question], answer_logits[is_question]  # (Bq, A), (Bq, A)
            vqa = F.binary_cross_entropy_with_logits(logits, scores) * scores.shape[1]
            loss = loss + vqa
            logs.update(vqa_loss=vqa, vqa_acc=scores.gather(1, logits.argmax(-1, keepdim=True)).mean())
        # Statements: true/false.
        if is_statement.any():
            labels, logits = batch["statement_labels"][is_statement], truth_logits[is_statement]  # (Bs,), (Bs,)
            truth = F.binary_cross_entropy_with_logits(logits, labels)
            loss = loss + truth
            logs.update(reasoning_loss=truth, reasoning_acc=((logits > 0).float() == labels).float().mean())
        return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=answer_logits)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random questions/statements: even rows are questions (soft scores), odd rows statements."""
        from vlmkit.encoders.lm import random_texts

        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        scores = torch.rand(batch_size, len(self.config.answers), generator=generator).round()
        return {
            "pixels": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator),
            "tokens": random_texts(text, batch_size, generator),
            "answer_scores": scores,
            "statement_labels": torch.randint(0, 2, (batch_size,), generator=generator).float(),
            "is_statement": torch.arange(batch_size) % 2 == 1,
        }

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: list[str], **_) -> list[str]:
        """The highest-scoring vocabulary answer for each (image, question)."""
        pooled, _, _ = self.fused(pixels.to(self.device), self.tokenize(questions).to(self.device))
        return [self.config.answers[i] for i in self.answer_head(pooled).argmax(-1).tolist()]

    @torch.no_grad()
    def verify(self, pixels: torch.Tensor, statements: list[str]) -> torch.Tensor:
        """Probability that each statement is true of its image. (B,)"""
        pooled, _, _ = self.fused(pixels.to(self.device), self.tokenize(statements).to(self.device))
        return torch.sigmoid(self.reasoning_head(pooled)[:, 0]).cpu()


register_config("vqa-tiny", "vqa", tiny=True, config={
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4},
    "text": {"width": 128, "depth": 2, "heads": 4, "context_length": 24, "vocab_size": 1024, "causal": False,
             "pool": "cls", "eos_token_id": 1023},
    "fusion_depth": 2,
    # spatial relations (module docstring, docs/generation.md): the pointer and the offset readout;
    # the recipe vqa-tiny.yaml turns on their training losses
    "pointer": True, "offset_readout": True,
})
