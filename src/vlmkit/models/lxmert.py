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

Visual inputs: with a `vision` tower the model computes them from `pixels` (the batch contract of
`encoders.regions`: RoIAlign-pooled object boxes and/or grid cells of the tower's last grid, their
normalised boxes as `visual_pos`, the region-class distribution of each token as the masked-object
target, a soft-target CE); without one (`vision: null`, what an HF checkpoint loads as) it reads
region features directly (`visual_feats` (B, N, F), `visual_pos` (B, N, 4), optional
`visual_mask` (B, N) and `region_labels` (B, N)), as HF's `LxmertModel` does. The feature-regression
target is detached: the backbone trains with the model, and regressing onto a moving target
would let both collapse to a constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.capabilities import Answers, MatchesImageText
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.config import VisionConfig, build_vision_tower
from vlmkit.encoders.regions import VisualInputConfig, VisualInputs, backbone_grid, random_regions
from vlmkit.encoders.twostream import (IGNORE_INDEX, AnswerHead, Pooler, RegionEmbedding, RegionHead,
                                       feature_regression_loss, mask_regions, mask_tokens, maskable_tokens,
                                       mismatched_images, soft_region_loss)
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
    # The image side. None: region features come in the batch (HF's interface); a tower: from pixels, and
    # visual_feat_dim is then the tower's grid width (a ViT's width).
    vision: VisionConfig | None = None
    visual: VisualInputConfig = field(default_factory=VisualInputConfig)
    region_classes: list[str] = field(default_factory=list)  # object names the masked-object head predicts (with a tower)
    max_answers: int = bounded(100, low=1)  # answer vocabulary size taken from the training records

    def __post_init__(self) -> None:
        check_fields(self, "model", ".")
        if self.vision is not None:
            if self.vision.type != "vit":
                raise UserError("the LXMERT image tower must be a ViT (vision.type: vit), whose grid width is vision.width")
            self.visual_feat_dim = self.vision.width
            self.num_object_labels = 1 + len(self.region_classes) if self.region_classes else 0
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
    question_fraction: float = bounded(0.3, low=0, high=1)  # samples that are a question with its answers (QA task)

    def __post_init__(self) -> None:
        check_fields(self, "training", ".")


@register_family
class Lxmert(VLModel):
    family = "lxmert"
    config_class = LxmertConfig
    training_class = LxmertTraining
    capabilities = (Answers, MatchesImageText)
    towers = {"text": "text", "image": "visual"}
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
        self.visual = build_vision_tower(config.vision, None) if config.vision is not None else None
        if self.visual is not None:
            self.visual_inputs = VisualInputs(config.visual, config.vision.image_size, num_classes=len(config.region_classes))
        # What this instance can do: a feature-only model (an HF checkpoint) cannot read pixels.
        can_see = self.visual is not None
        self.capabilities = tuple(c for c, present in ((Answers, can_see and self.answer_head is not None),
                                                       (MatchesImageText, can_see and config.pretraining_heads)) if present)

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

    def visual_features(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch's region features: {"feats" (B, N, F), "pos" (B, N, 4), "mask" (B, N) bool, and
        "labels" (B, N) class ids or "label_dist" (B, N, K) when the batch carries region classes}."""
        if self.visual is None:
            if "visual_feats" not in batch:
                raise UserError("this LXMERT model has no image tower, so it reads region features: give visual_feats "
                                "and visual_pos (an HF checkpoint), or build it with a vision section to read pixels")
            feats = batch["visual_feats"]
            mask = batch.get("visual_mask")
            out = {"feats": feats, "pos": batch["visual_pos"],
                   "mask": torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device) if mask is None else mask}
            if "region_labels" in batch:
                out["labels"] = batch["region_labels"]
            return out
        tokens = self.visual_inputs(backbone_grid(self.visual, batch["pixels"]), batch, generator)
        out = {"feats": tokens.features, "pos": tokens.geometry[..., :4], "mask": tokens.mask}  # LXMERT's 4-d normalised box
        if tokens.labels is not None and self.config.num_object_labels:
            out["label_dist"] = tokens.labels  # (B, T, 1 + K), 0 = background
        return out

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
        tokens = batch["tokens"]  # (B, L)
        batch_size, device = tokens.shape[0], tokens.device
        generator = torch.Generator().manual_seed(int(batch.get("seed", 0)))
        visual = self.visual_features(batch, generator)
        feats, boxes, real_regions = visual["feats"], visual["pos"], visual["mask"]  # (B, N, F), (B, N, 4), (B, N)
        # ITM: a share of the rows see another row's image.
        matched, source = mismatched_images(batch_size, options.mismatch_probability, generator, device)
        feats, boxes, real_regions = feats[source], boxes[source], real_regions[source]
        # MLM on the text, masked object prediction on the (possibly swapped) regions.
        maskable = maskable_tokens(tokens, config.pad_token_id, config.eos_token_id)
        corrupted, mlm_labels = mask_tokens(tokens, maskable, config.mask_token_id, config.vocab_size,
                                            options.mlm_probability, generator)
        masked_regions = mask_regions(real_regions, options.region_mask_probability, generator)  # (B, N)
        inputs = feats.masked_fill(masked_regions[..., None], 0.0)  # LXMERT zeroes the masked features
        language, vision, pooled = self.encode(corrupted, inputs, boxes, batch.get("token_types"), real_regions)

        mlm_logits = self.mlm_head(language, self.text.token_embedding.weight)  # (B, L, V)
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE_INDEX)
        itm_logits = self.itm_head(pooled)  # (B, 2)
        itm = F.cross_entropy(itm_logits, matched.long())
        predicted = self.region_head(vision)  # name -> (B, N, size)
        on_own_image = masked_regions & matched[:, None]  # a swapped image's regions are not the text's to predict
        region = feature_regression_loss(predicted["feat"], feats.detach(), on_own_image)
        logs = {"mlm_loss": mlm, "itm_loss": itm, "feat_loss": region,
                "itm_acc": (itm_logits.argmax(-1) == matched.long()).float().mean()}
        if "obj" in predicted:
            obj = predicted["obj"].sum() * 0.0  # keeps the head in the graph when the batch has no classes
            if "label_dist" in visual:  # soft targets: each token's share of every class (0 = background)
                obj = soft_region_loss(predicted["obj"], visual["label_dist"][source], on_own_image)
            elif "labels" in visual:
                labels = visual["labels"][source].masked_fill(~on_own_image, IGNORE_INDEX)  # (B, N)
                labels = labels.masked_fill(labels < 0, IGNORE_INDEX)
                if (labels != IGNORE_INDEX).any():
                    obj = F.cross_entropy(predicted["obj"].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
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

    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        """With an image tower: the object names of the records (the masked-object classes), and the
        `max_answers` most frequent answers (the QA head) when the records have questions."""
        from vlmkit.encoders.regions import region_classes
        from vlmkit.encoders.twostream import answer_vocabulary

        if config.get("vision") is not None and not config.get("region_classes"):
            config["region_classes"] = region_classes(records)
        if not config.get("answers"):
            config["answers"] = answer_vocabulary(records, config.get("max_answers", LxmertConfig.max_answers))
        return config

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        from vlmkit.data.records import record_texts

        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        from vlmkit.encoders.twostream import RegionTextDataset

        if self.visual is None:
            raise UserError("this LXMERT model has no image tower (it reads precomputed region features), so it cannot "
                            "train on images; build it with a vision section")
        return RegionTextDataset(records, transform, tokenizer, seed, self.config.vision.image_size, self.config.region_classes,
                                 self.config.visual.max_regions, self.config.answers, self.training_options.question_fraction)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_tokens

        config = self.config
        generator = torch.Generator().manual_seed(seed)
        eos = config.eos_token_id if config.eos_token_id is not None else config.vocab_size - 1
        tokens = random_tokens(config.vocab_size, min(config.context_length, 16), eos, config.pad_token_id, batch_size, generator)
        batch = {"tokens": tokens, "seed": seed}
        if config.vision is not None:
            size = config.vision.image_size
            batch["pixels"] = torch.randn(batch_size, 3, size, size, generator=generator)
            batch.update(random_regions(batch_size, size, len(config.region_classes), generator))
        else:
            regions = 5
            corners = torch.rand(batch_size, regions, 2, 2, generator=generator).sort(dim=2).values  # x0 < x1, y0 < y1
            batch["visual_feats"] = torch.rand(batch_size, regions, config.visual_feat_dim, generator=generator)
            batch["visual_pos"] = corners.transpose(2, 3).reshape(batch_size, regions, 4)
            if config.num_object_labels:
                batch["region_labels"] = torch.randint(config.num_object_labels, (batch_size, regions), generator=generator)
        if config.answers:
            batch["answer_scores"] = torch.rand(batch_size, len(config.answers), generator=generator).round()
            batch["has_answer"] = torch.ones(batch_size, dtype=torch.bool)
        return batch

    # ---- capabilities -------------------------------------------------------------------------
    def _pixel_batch(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.visual_features({"pixels": pixels.to(self.device)})

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: list[str], **_) -> list[str]:
        """The QA head's highest-scoring answer for each (image, question)."""
        visual = self._pixel_batch(pixels)
        logits = self.answer_logits(self.tokenize(questions).to(self.device), visual["feats"], visual["pos"], visual["mask"])
        return [self.config.answers[i] for i in logits.argmax(-1).tolist()]

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, F + 4 + 1): each image's region features, boxes and mask, packed for `match_scores`."""
        visual = self._pixel_batch(pixels)
        return torch.cat([visual["feats"], visual["pos"], visual["mask"][..., None].to(visual["feats"].dtype)], dim=-1)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the ITM head's log-odds that text row b matches image-feature row b."""
        feats, pos, mask = image_features.split([self.config.visual_feat_dim, 4, 1], dim=-1)
        logits = self.itm_head(self.encode(tokens.to(self.device), feats, pos, visual_mask=mask[..., 0] > 0.5)[2])  # (B, 2)
        return logits[:, 1] - logits[:, 0]  # matched_label 1 = match

    @torch.no_grad()
    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) probability that text row b describes image row b."""
        return torch.sigmoid(self.match_scores(self.image_match_features(pixels), tokens)).cpu()


register_config("lxmert-tiny", "lxmert", tiny=True, config={
    # 2 language, 1 relationship, 2 cross-modality layers at width 64 over a 2-block ViT's 4x4 grid at
    # 64 px (the whole image + 16 cells as visual tokens: `vlmkit eval` gives pixels only, no boxes).
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "l_layers": 2, "r_layers": 1, "x_layers": 2,
    "eos_token_id": 2, "mask_token_id": 3, "region_classes": ["circle", "square", "triangle"],
    "vision": {"type": "vit", "image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 4},
    "visual": {"source": "grid"},
})
register_config("lxmert-tiny-features", "lxmert", config={
    # The same stacks reading 32-d region features directly (HF's interface; no image tower).
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "l_layers": 2, "r_layers": 1, "x_layers": 2,
    "visual_feat_dim": 32, "eos_token_id": 2, "mask_token_id": 3, "num_object_labels": 8,
})
register_config("lxmert-base", "lxmert", {
    # The paper's (and unc-nlp/lxmert-base-uncased's) sizes: 9 / 5 / 5 layers, 2048-d detector features.
    "num_object_labels": 1600,
})
