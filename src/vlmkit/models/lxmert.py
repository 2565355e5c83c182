"""LXMERT (Tan & Bansal 2019): language, object-relationship and cross-modality encoders.

    tokens (B, L) -> BERT embeddings -> l_layers language blocks ------------------+
    region features (B, N, F) + boxes (B, N, 4) -> (LN(fc f) + LN(fc box)) / 2      |
        -> r_layers object-relationship blocks --------------------------------+   |
                                                                               v   v
    x_layers cross-modality layers: shared cross-attention both ways -> self-attention per stream -> FFN per stream
    -> language (B, L, D), vision (B, N, D), pooled = tanh(dense(language[:, 0])) (B, D)

Every block is post-LN BERT (LayerNorm eps 1e-12), so the parameters map one to one onto HF's
`LxmertModel` / `LxmertForQuestionAnswering` (`vlmkit.interop.hf_lxmert`); the cross-modality
layer is `layers.transformer.CoAttentionBlock(self_attention=True, shared_cross=True)`.

Pre-training (the paper's five tasks, minus attribute classification): masked language modelling
(BERT's 80/10/10 corruption, CE), masked object prediction (15% of the regions have their
features zeroed; SmoothL1 regression of the original feature, and CE on the region's class when
the batch carries `region_labels`), image-text matching (half the pairs get another row's image;
`matched` 1 = match, as in LXMERT — the opposite of VisualBERT's), and question answering on the
matched pairs that carry `answer_scores` (VQA soft scores, BCE times the answer count). The visual
losses are means over the masked regions only, which is what LXMERT's `mean() * 6.67` over all
regions (15% masked) approximates. The masks of a step are drawn from `batch["seed"]`, so a batch
gives the same loss every time it is seen.

The model reads region features directly (`visual_feats`, `visual_pos`, optional `visual_mask`),
as HF's does; computing them from pixels is the region encoder's job (`encoders/regions.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.config import bounded, check_fields
from vlmkit.encoders.twostream import (IGNORE_INDEX, AnswerHead, Pooler, RegionEmbedding, RegionHead,
                                       feature_regression_loss, mask_regions, mask_tokens)
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import BertLMHead
from vlmkit.layers.transformer import CoAttentionBlock, TokenTransformer, Transformer
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class LxmertConfig:
    """The architecture (HF LxmertConfig's fields under vlmkit names) and which heads it carries."""

    vocab_size: int = bounded(30522, low=1)
    context_length: int = bounded(512, low=1)  # max_position_embeddings
    type_vocab_size: int = bounded(2, low=1)
    width: int = bounded(768, low=1)
    heads: int = bounded(12, low=1)
    mlp_ratio: float = bounded(4.0, low=0, low_open=True)  # intermediate_size / width
    activation: str = "gelu"
    norm_eps: float = bounded(1e-12, low=0, low_open=True)
    l_layers: int = bounded(9, low=0)
    r_layers: int = bounded(5, low=0)
    x_layers: int = bounded(5, low=0)
    visual_feat_dim: int = bounded(2048, low=1)
    visual_pos_dim: int = bounded(4, low=1)  # normalised [x0, y0, x1, y1]
    pad_token_id: int = 0
    eos_token_id: int | None = 102  # [SEP]: never masked by MLM
    mask_token_id: int | None = 103  # [MASK]
    pretraining_heads: bool = True  # MLM + ITM + masked-region heads (HF's LxmertModel has none)
    num_object_labels: int = bounded(0, low=0)  # masked-region classification classes (0: no such head)
    answers: list[str] = field(default_factory=list)  # the QA head's answer vocabulary (empty: no QA head)

    def __post_init__(self) -> None:
        check_fields(self, "model", ".")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}; pick heads that divide it")
        if self.pretraining_heads and self.mask_token_id is None:
            raise UserError("LXMERT pre-training masks tokens but the config has no mask_token_id; "
                            "train with a tokenizer that has [MASK] (tokenizer: wordpiece)")


@dataclass
class LxmertTraining:
    """The recipe's `training:` options of LXMERT pre-training."""

    mlm_probability: float = bounded(0.15, low=0, high=1)
    region_mask_probability: float = bounded(0.15, low=0, high=1)
    mismatch_probability: float = bounded(0.5, low=0, high=1)  # ITM negatives
    mlm_weight: float = bounded(1.0, low=0)
    region_weight: float = bounded(1.0, low=0)
    itm_weight: float = bounded(1.0, low=0)
    qa_weight: float = bounded(1.0, low=0)

    def __post_init__(self) -> None:
        check_fields(self, "training", ".")


@register_family
class Lxmert(VLModel):
    family = "lxmert"
    config_class = LxmertConfig
    training_class = LxmertTraining
    capabilities = ()
    towers = {"text": "text"}
    export_formats = {"hf": "vlmkit.interop.hf_lxmert:export"}
    example_config = {"answers": ["yes", "no", "0", "1", "2"]}

    def __init__(self, config: LxmertConfig) -> None:
        super().__init__(config)
        width, heads, eps = config.width, config.heads, config.norm_eps
        common = dict(mlp_ratio=config.mlp_ratio, activation=config.activation, prenorm=False, norm_eps=eps)
        # The language encoder: BERT embeddings + l_layers post-LN blocks, no final norm.
        self.text = TokenTransformer(config.vocab_size, config.context_length, width, config.l_layers, heads,
                                     type_vocab_size=config.type_vocab_size, embed_norm=True, **common)
        self.regions = RegionEmbedding(config.visual_feat_dim, config.visual_pos_dim, width, eps, combine="mean")
        self.relation = Transformer(width, config.r_layers, heads, **common)  # the object-relationship encoder
        self.cross = torch.nn.ModuleList(
            CoAttentionBlock(width, heads, self_attention=True, shared_cross=True, **common) for _ in range(config.x_layers))
        self.pooler = Pooler(width)
        if config.pretraining_heads:
            self.mlm_head = BertLMHead(width, config.vocab_size, config.activation, eps)
            self.itm_head = torch.nn.Linear(width, 2)
            sizes = {"feat": config.visual_feat_dim, **({"obj": config.num_object_labels} if config.num_object_labels else {})}
            self.region_head = RegionHead(width, sizes, config.activation, eps)
        self.answer_head = AnswerHead(width, len(config.answers), eps) if config.answers else None

    # ---- the encoder ------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
               token_types: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(language (B, L, D), vision (B, N, D), pooled (B, D)) of tokens (B, L) over regions (B, N, F)
        with boxes (B, N, P); padding tokens (the pad id) and regions with `visual_mask` False are not attended."""
        text_mask = padding_mask(tokens != self.config.pad_token_id)  # (B, 1, 1, L)
        region_mask = padding_mask(visual_mask) if visual_mask is not None else None  # (B, 1, 1, N)
        language = self.text(tokens, token_types=token_types, position_offset=0, mask=text_mask)  # (B, L, D)
        vision = self.relation(self.regions(visual_feats, visual_pos), mask=region_mask)  # (B, N, D)
        for layer in self.cross:
            language, vision = layer(language, vision, mask_a=text_mask, mask_b=region_mask)
        return language, vision, self.pooler(language)

    def answer_logits(self, tokens: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The QA head's logits (B, A) (HF's `question_answering_score`)."""
        if self.answer_head is None:
            raise UserError("this LXMERT model has no question-answering head (no answer vocabulary); fine-tune it on "
                            "records with 'qa' first")
        return self.answer_head(self.encode(tokens, visual_feats, visual_pos, visual_mask=visual_mask)[2])

    # ---- pre-training -------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        if not self.config.pretraining_heads:
            raise UserError("this LXMERT model has no pre-training heads (an HF LxmertModel / ForQuestionAnswering "
                            "checkpoint); build it with pretraining_heads=true to pre-train")
        options, config = self.training_options, self.config
        tokens, feats, boxes = batch["tokens"], batch["visual_feats"], batch["visual_pos"]  # (B, L), (B, N, F), (B, N, P)
        batch_size, device = tokens.shape[0], tokens.device
        real_regions = batch.get("visual_mask")
        real_regions = torch.ones(feats.shape[:2], dtype=torch.bool, device=device) if real_regions is None else real_regions
        generator = torch.Generator().manual_seed(int(batch.get("seed", 0)))
        # ITM: a random share of the rows see another row's image (a shift by 1..B-1 never maps a row to itself).
        matched = torch.ones(batch_size, dtype=torch.bool, device=device)
        if batch_size > 1:
            matched = (torch.rand(batch_size, generator=generator) >= options.mismatch_probability).to(device)
            shift = int(torch.randint(1, batch_size, (1,), generator=generator))
            other = (torch.arange(batch_size, device=device) + shift) % batch_size
            source = torch.where(matched, torch.arange(batch_size, device=device), other)  # (B,) whose image each row sees
            feats, boxes, real_regions = feats[source], boxes[source], real_regions[source]
        # MLM on the text, masked object prediction on the (possibly swapped) regions.
        maskable = (tokens != config.pad_token_id) & (torch.arange(tokens.shape[1], device=device) > 0)
        if config.eos_token_id is not None:
            maskable &= tokens != config.eos_token_id
        corrupted, mlm_labels = mask_tokens(tokens, maskable, config.mask_token_id, config.vocab_size,
                                            options.mlm_probability, generator)
        masked_regions = mask_regions(real_regions, options.region_mask_probability, generator)  # (B, N)
        inputs = feats.masked_fill(masked_regions[..., None], 0.0)  # LXMERT zeroes the masked features
        language, vision, pooled = self.encode(corrupted, inputs, boxes, batch.get("token_types"), batch.get("visual_mask"))

        mlm_logits = self.mlm_head(language, self.text.token_embedding.weight)  # (B, L, V)
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE_INDEX)
        itm_logits = self.itm_head(pooled)  # (B, 2)
        itm = F.cross_entropy(itm_logits, matched.long())
        predicted = self.region_head(vision)  # name -> (B, N, size)
        on_own_image = masked_regions & matched[:, None]  # a swapped image's regions are not the text's to predict
        region = feature_regression_loss(predicted["feat"], feats, on_own_image)
        logs = {"mlm_loss": mlm, "itm_loss": itm, "feat_loss": region,
                "itm_acc": (itm_logits.argmax(-1) == matched.long()).float().mean()}
        if "obj" in predicted:
            labels = batch.get("region_labels")  # (B, N) long class ids, IGNORE_INDEX where unknown
            if labels is None:
                obj = predicted["obj"].sum() * 0.0
            else:
                labels = labels[source] if batch_size > 1 else labels
                labels = labels.masked_fill(~on_own_image, IGNORE_INDEX)
                obj = (F.cross_entropy(predicted["obj"].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
                       if (labels != IGNORE_INDEX).any() else predicted["obj"].sum() * 0.0)
            region = region + obj
            logs["obj_loss"] = obj
        loss = options.mlm_weight * mlm + options.itm_weight * itm + options.region_weight * region
        if self.answer_head is not None:
            answer_logits = self.answer_head(pooled)  # (B, A)
            has_answer = batch.get("has_answer", torch.zeros(batch_size, dtype=torch.bool, device=device)) & matched
            if "answer_scores" in batch and has_answer.any():
                scores = batch["answer_scores"][has_answer]  # (Bq, A) soft scores
                qa = F.binary_cross_entropy_with_logits(answer_logits[has_answer], scores) * scores.shape[1]
                logs["qa_loss"] = qa
            else:  # keeps the head in the graph (DDP, every-parameter tests)
                qa = answer_logits.sum() * 0.0
            loss = loss + options.qa_weight * qa
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, **logs), logits=mlm_logits)

    # ---- hooks ------------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """Vocabulary size and the pad / [SEP] / [MASK] ids from the tokenizer (a wordpiece one has [MASK])."""
        config["vocab_size"] = tokenizer.vocab_size
        config["pad_token_id"] = tokenizer.pad_id
        config["eos_token_id"] = tokenizer.eos_id
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None and config.get("pretraining_heads", True):
            if not hasattr(tokenizer, "add_special_tokens"):  # a stand-in vocabulary (dry run): its last id
                mask_id = tokenizer.vocab_size - 1
            else:
                raise UserError("LXMERT pre-training needs a tokenizer with a [MASK] token; use tokenizer: wordpiece")
        config["mask_token_id"] = mask_id
        tokenizer.context_length = min(tokenizer.context_length, config.get("context_length", 512))
        return config

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_tokens

        config = self.config
        generator = torch.Generator().manual_seed(seed)
        regions = 5
        eos = config.eos_token_id if config.eos_token_id is not None else config.vocab_size - 1
        tokens = random_tokens(config.vocab_size, min(config.context_length, 16), eos, config.pad_token_id, batch_size, generator)
        corners = torch.rand(batch_size, regions, 2, 2, generator=generator).sort(dim=2).values  # x0 < x1, y0 < y1
        batch = {
            "tokens": tokens,
            "visual_feats": torch.rand(batch_size, regions, config.visual_feat_dim, generator=generator),
            "visual_pos": corners.transpose(2, 3).reshape(batch_size, regions, 4),
            "seed": seed,
        }
        if config.num_object_labels:
            batch["region_labels"] = torch.randint(config.num_object_labels, (batch_size, regions), generator=generator)
        if config.answers:
            batch["answer_scores"] = torch.rand(batch_size, len(config.answers), generator=generator).round()
            batch["has_answer"] = torch.ones(batch_size, dtype=torch.bool)
        return batch


register_config("lxmert-tiny", "lxmert", tiny=True, config={
    # 2 language, 1 relationship, 2 cross-modality layers at width 64; region features of 32 dims.
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "l_layers": 2, "r_layers": 1, "x_layers": 2,
    "visual_feat_dim": 32, "eos_token_id": 2, "mask_token_id": 3, "num_object_labels": 8,
})
register_config("lxmert-base", "lxmert", {
    # The paper's (and unc-nlp/lxmert-base-uncased's) sizes: 9 / 5 / 5 layers, 2048-d detector features.
    "num_object_labels": 1600,
})
