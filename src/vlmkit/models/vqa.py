"""Discriminative VQA and visual reasoning: a fusion encoder with two classification heads.

image -> ViT -> tokens (B, N, Dv)          question / statement -> bidirectional text tower (B, L, D)
fused = fusion blocks (self-attention over text, cross-attention to the image tokens) (B, L, D)
pooled = fused[:, 0] (the start token)
- Optional grounding (`grounding_fraction` > 0 or `ground_mentions`): each text token points at
  the image patch grid (soft-argmax of its attention, layers/pointer.py); tokens that name an
  object (grounding samples "the red circle", or object names inside questions) are pulled to the
  object's box centre (L1), as in phrase grounding (Flickr30k Entities, MDETR).
- Optional offset readout (`offset_readout`, layers/offset.py): the offset between the two
  objects a text names, read from the pointed positions (L1 to the true offset with
  `offset_weight`), fused bilinearly with the question's words and added to the pooled feature:
  what spatial-relation questions need.
- VQA as classification over an answer vocabulary (VQA v2 style): BCE against soft scores
  min(1, #humans who gave the answer / 3), scaled by the number of answers as in the VQA v2
  baselines; the answer vocabulary is the most frequent training answers.
- Visual reasoning (NLVR-style): a true/false logit for a statement about the image.

The generative formulation of the same questions is SimVLM with the question as prefix
(`vlmkit eval vqa` scores both the same way).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import MLP
from vlmkit.layers.offset import OffsetReadout
from vlmkit.layers.pointer import SoftArgmaxPointer
from vlmkit.layers.transformer import Transformer
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family

# The answers of the built-in synthetic data: the default vocabulary before training sets it.
SYNTHETIC_ANSWERS = ("0", "1", "2", "3", "4", "yes", "no", "red", "green", "blue", "yellow", "purple", "orange",
                     "circle", "square", "triangle", "star")


@dataclass
class VQAConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(causal=False, pool="cls", eos_token_id=None))
    fusion_depth: int = 2
    answers: tuple[str, ...] = SYNTHETIC_ANSWERS  # normalised answers, the classifier's classes
    max_answers: int = 3129  # VQA v2's usual vocabulary size: the most frequent training answers
    statement_fraction: float = 0.5  # training: share of samples that are statements (records with both)
    balance_question_types: bool = False  # training: draw a question type uniformly, then a question of it
    grounding_fraction: float = 0.0  # training: share of samples that ground an object name (records with objects)
    grounding_weight: float = 1.0  # weight of the box-centre L1 loss
    ground_mentions: bool = False  # training: also ground object names inside questions/statements
    offset_readout: bool = False  # add the offset between the two named objects, fused with the words, to the pooled feature
    offset_weight: float = 0.0  # training: weight of the L1 loss of that offset to the true one (texts naming two objects)


@register_family
class VQAClassifier(VLModel):
    family = "vqa"
    config_class = VQAConfig
    capabilities = frozenset({"vqa_classify", "reasoning", "answer"})

    def __init__(self, config: VQAConfig) -> None:
        super().__init__(config)
        if not config.answers:
            raise UserError("the VQA model needs an answer vocabulary; train it on records with 'qa' or set answers")
        width = config.text.width
        self.visual = build_vision_tower(config.vision, None)
        self.text = build_text_tower(config.text, None)
        self.fusion = Transformer(width, config.fusion_depth, config.text.heads, mlp_ratio=config.text.mlp_ratio,
                                  activation=config.text.activation, context_dim=config.vision.width)
        self.answer_head = MLP(width, 2 * width, out_dim=len(config.answers))
        self.reasoning_head = MLP(width, width, out_dim=1)
        if config.offset_weight > 0 and not config.offset_readout:
            raise UserError("offset_weight trains the offset readout; set offset_readout: true as well")
        self.pointer = None
        if config.grounding_fraction > 0 or config.ground_mentions or config.offset_readout:
            grid = config.vision.image_size // config.vision.patch_size
            self.pointer = SoftArgmaxPointer(width, config.vision.width, grid)
        self.offset_readout = OffsetReadout(width, config.text.vocab_size) if config.offset_readout else None

    @classmethod
    def adapt_config_to_data(cls, config, records):
        """The answer vocabulary: the `max_answers` most frequent normalised training answers."""
        from vlmkit.data.task_datasets import answers_of
        from vlmkit.metrics.vqa import normalize_answer

        counts = Counter(normalize_answer(a) for record in records for item in record.get("qa") or [] for a in answers_of(item))
        if counts:
            limit = config.get("max_answers", VQAConfig.max_answers)
            config["answers"] = [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]
        return config

    @classmethod
    def tokenizer_texts(cls, records):
        from vlmkit.data.task_datasets import record_texts

        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        from vlmkit.data.task_datasets import QuestionStatementDataset

        records = [record for record in records if record.get("qa") or record.get("statements")]
        if not records:
            raise UserError("no training record has questions ('qa') or statements ('statements') for the VQA model")
        return QuestionStatementDataset(records, transform, tokenizer, self.config.answers, self.config.statement_fraction,
                                        seed=seed, grounding_fraction=self.config.grounding_fraction,
                                        ground_mentions=self.config.ground_mentions,
                                        balance_types=self.config.balance_question_types)

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
        pooled, points, offset = self.fused(batch["pixels"], batch["tokens"])  # (B, D), (B, L, 2), (B, 2)
        answer_logits = self.answer_head(pooled)  # (B, A)
        truth_logits = self.reasoning_head(pooled)[:, 0]  # (B,)
        is_statement = batch["is_statement"]  # (B,) bool
        is_grounding = batch.get("is_grounding", torch.zeros_like(is_statement))  # (B,) bool
        is_question = ~is_statement & ~is_grounding
        logs = {}
        loss = pooled.new_zeros(())
        point_mask = batch.get("point_mask")  # (B, L) bool: tokens that name an object
        if points is not None and point_mask is not None and point_mask.any():
            error = (points - batch["point_targets"]).abs().sum(-1)  # (B, L): L1 (x + y) to the box centre
            grounding = error[point_mask].mean()
            loss = loss + self.config.grounding_weight * grounding
            logs.update(grounding_loss=grounding.item())
        has_offset = batch.get("has_offset")  # (B,) bool: the text names two objects
        if self.config.offset_weight > 0 and has_offset is not None and has_offset.any():
            offset_loss = (offset[has_offset] - batch["pair_offsets"][has_offset]).abs().sum(-1).mean()
            loss = loss + self.config.offset_weight * offset_loss
            logs.update(offset_loss=offset_loss.item())
        if is_question.any():
            scores = batch["answer_scores"][is_question]  # (Bq, A)
            vqa = F.binary_cross_entropy_with_logits(answer_logits[is_question], scores) * scores.shape[1]
            loss = loss + vqa
            best = answer_logits[is_question].argmax(-1, keepdim=True)
            logs.update(vqa_loss=vqa.item(), vqa_acc=scores.gather(1, best).mean().item())
        if is_statement.any():
            labels = batch["statement_labels"][is_statement]
            truth = F.binary_cross_entropy_with_logits(truth_logits[is_statement], labels)
            loss = loss + truth
            logs.update(reasoning_loss=truth.item(), reasoning_acc=((truth_logits[is_statement] > 0).float() == labels).float().mean().item())
        logs["loss"] = loss.item()
        return ModelOutput(loss=loss, logs=logs, logits=answer_logits)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random questions/statements: even rows are questions (soft scores), odd rows statements."""
        from vlmkit.encoders.lm import random_tokens

        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        end = text.eos_token_id if text.eos_token_id is not None else text.vocab_size - 1
        scores = torch.rand(batch_size, len(self.config.answers), generator=generator).round()
        return {
            "pixels": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator),
            "tokens": random_tokens(text.vocab_size, text.context_length, end, text.pad_token_id, batch_size, generator),
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


register_config("vqa-tiny", "vqa", {
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4},
    "text": {"width": 128, "depth": 2, "heads": 4, "context_length": 24, "vocab_size": 1024, "causal": False,
             "pool": "cls", "eos_token_id": 1023},
    "fusion_depth": 2,
    # spatial relations (docs/generation.md): phrase grounding of the object names, the offset
    # readout trained on the named objects' offset, and every question type drawn equally often
    "statement_fraction": 0.3, "grounding_fraction": 0.15, "ground_mentions": True, "balance_question_types": True,
    "offset_readout": True, "offset_weight": 1.0,
})
