"""VisualBERT (Li et al. 2019) with UNITER's pre-training objectives as options: one transformer over
[text tokens ; visual tokens].

pixels -> image tower grid (B, C, g, g) -> encoders.regions: region / grid tokens, features (B, T, C)
          + box geometry (B, T, 7); visual_embeds = [feature ; geometry] (B, T, C + 7)
text   = LN(word + position + segment 0)                                  (B, L, W)
visual = LN(visual_projection(visual_embeds) + visual position + segment 1) (B, T, W)
hidden = BERT (post-LN) blocks over [text ; visual] with the padding of both masked (B, L + T, W)
pooled = tanh(dense(hidden[:, 0]))                                                (B, W)

This is HF's `VisualBertModel` layout exactly (one embedding LayerNorm shared by both parts, the
visual position embedding is row 0 when no alignment is given), so `interop/hf_visualbert.py` maps
its weights one to one; HF's `visual_embeds` are our [feature ; geometry] (HF takes no boxes: the
geometry enters through the same `visual_projection`). A model loaded from HF has no image tower
(`vision: null`): it reads precomputed `visual_embeds` (`forward_features`) as HF does.

Pre-training (task=pretrain): MLM (on matched pairs) + ITM (class 1 = match: vlmkit's ITM head;
HF's seq_relationship has 0 = match, swapped on import/export); options from UNITER, each with
its weight in the recipe's training section: masked region feature regression (`mrfr_weight`),
masked region classification by KL to the region's label distribution (`mrc_weight`, the
overlap of its box with each object class, background for none), word-region alignment by IPOT
optimal transport (`wra_weight`). UNITER's conditional masking: a matched pair masks its words or
(with a region objective on) its regions, drawn per pair, never both. Fine-tuning heads and tasks:
`encoders.fusion` (shared with every fusion family).

Inference reads regions where it is given them: the evaluation tasks pass the records' object
boxes (`ReadsRegions`); an image without boxes (`vlmkit ask IMAGE`) falls back to its grid cells
(`visual.source: auto`), which pre-training on grid-only samples (`grid_fraction`) teaches too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Answers, MatchesImageText, ReadsRegions, Verifies
from vlmkit.config import bounded
from vlmkit.data.records import answer_vocabulary, record_texts
from vlmkit.encoders.config import TextConfig, VisionConfig, build_vision_tower
from vlmkit.encoders.fusion import (IGNORE, FusionHeads, FusionTaskDataset, FusionTraining, fusion_task_loss,
                                    keep_fresh_heads, masked_lm_loss)
from vlmkit.encoders.regions import (GEOMETRY_DIM, VisualInputConfig, VisualInputs, VisualTokens, backbone_grid,
                                     random_regions, region_classes, region_inputs)
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import make_activation
from vlmkit.layers.transformer import TokenTransformer
from vlmkit.losses import masked_region_feature_loss, masked_region_kl_loss, word_region_alignment_loss
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


def _bert_text() -> TextConfig:
    return TextConfig(causal=False, pool="cls", eos_token_id=None, prenorm=False, embed_norm=True, type_vocab_size=2,
                      norm_eps=1e-12, vocab_size=30522, context_length=512, width=768, depth=12, heads=12)


@dataclass
class VisualBertConfig:
    vision: VisionConfig | None = field(default_factory=VisionConfig)  # None: precomputed visual_embeds (HF)
    text: TextConfig = field(default_factory=_bert_text)  # the BERT stack (post-LN, segments, embedding norm)
    visual: VisualInputConfig = field(default_factory=VisualInputConfig)
    geometry: bool = True  # append the 7-d box geometry to each visual feature
    visual_dim: int = bounded(0, low=0)  # HF's visual_embedding_dim without a backbone; 0 = backbone width (+ 7)
    answers: tuple[str, ...] = ()  # VQA classes, set from the training data
    max_answers: int = bounded(3129, low=1)
    region_classes: tuple[str, ...] = ()  # object names region_labels index (masked region classification)
    answer_head: str = "mlp"  # mlp (UNITER / LXMERT layout) | linear (HF VisualBertForQuestionAnswering's cls)
    answer_pool: str = "pooler"  # pooler | last_text (HF VQA: the last text token before [SEP])

    def __post_init__(self) -> None:
        if self.vision is not None and self.vision.type != "vit":
            raise UserError("visualbert pools regions from a ViT grid; set model.vision.type=vit")
        if self.vision is None and not self.visual_dim:
            raise UserError("a visualbert without an image tower (vision: null) needs visual_dim, the width of its "
                            "visual_embeds")
        if self.text.prenorm or self.text.causal or not self.text.embed_norm or self.text.type_vocab_size < 2:
            raise UserError("visualbert's text stack is BERT's: text.prenorm=false, causal=false, embed_norm=true, "
                            "type_vocab_size >= 2")
        if self.answer_pool not in ("pooler", "last_text"):
            raise UserError(f"answer_pool must be 'pooler' or 'last_text', not {self.answer_pool!r}")

    @property
    def embeds_dim(self) -> int:
        """Width of `visual_embeds`: the backbone's feature (+ the geometry), or `visual_dim`."""
        if self.visual_dim:
            return self.visual_dim
        return self.vision.width + (GEOMETRY_DIM if self.geometry else 0)


@dataclass
class VisualBertTraining(FusionTraining):
    """The fusion options (task, MLM, ITM) plus UNITER's region objectives (on by default; 0 = off)."""

    mrfr_weight: float = bounded(1.0, low=0)  # masked region feature regression (0 = VisualBERT's MLM + ITM only)
    mrc_weight: float = bounded(1.0, low=0)  # masked region classification, KL to the label distribution
    wra_weight: float = bounded(0.1, low=0)  # word-region alignment by optimal transport (IPOT; UNITER's 0.1)
    region_mask_probability: float = bounded(0.15, low=0, high=1, low_open=True)
    grid_fraction: float = bounded(0.0, low=0, high=1)  # samples that drop their boxes (grid features) in training


class PredictionHead(nn.Module):
    """BERT's head transform: dense -> activation -> LayerNorm, then a decoder (HF `cls.predictions.transform`)."""

    def __init__(self, width: int, out: int | None, activation: str, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = make_activation(activation)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, out) if out else None  # None: tied to the word embeddings (MLM)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.act(self.dense(hidden)))
        return self.decoder(hidden) if self.decoder is not None else hidden


@register_family
class VisualBert(VLModel):
    family = "visualbert"
    config_class = VisualBertConfig
    training_class = VisualBertTraining
    capabilities = (Answers, Verifies, MatchesImageText, ReadsRegions)
    towers = {"image": "visual"}
    tower_configs = {"image": "vision", "text": "text"}
    export_formats = {"hf": "vlmkit.interop.hf_visualbert:export"}
    example_config = {"answers": ["yes", "no", "1", "2", "red", "circle"], "region_classes": ["red circle", "blue square"]}

    def __init__(self, config: VisualBertConfig) -> None:
        super().__init__(config)
        text = config.text
        if config.vision is None:
            self.capabilities = ()  # no image tower: the pixel capabilities do not apply
        elif not config.answers:
            self.capabilities = tuple(c for c in self.capabilities if c is not Answers)
        self.visual = build_vision_tower(config.vision, None) if config.vision is not None else None
        self.inputs = VisualInputs(config.visual, config.vision.image_size if config.vision else 1,
                                   num_classes=len(config.region_classes))
        self.bert = TokenTransformer(text.vocab_size, text.context_length, text.width, text.depth, text.heads,
                                     mlp_ratio=text.mlp_ratio, activation=text.activation, prenorm=False,
                                     norm_eps=text.norm_eps, dropout=text.dropout, type_vocab_size=text.type_vocab_size,
                                     embed_norm=True)
        width = text.width
        self.visual_projection = nn.Linear(config.embeds_dim, width)
        self.visual_type_embedding = nn.Embedding(text.type_vocab_size, width)
        self.visual_position_embedding = nn.Embedding(text.context_length, width)
        self.pooler = nn.Linear(width, width)
        self.mlm_head = PredictionHead(width, None, text.activation, text.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(text.vocab_size))
        self.heads = FusionHeads(width, len(config.answers), config.answer_head, text.norm_eps)
        feature_dim = config.vision.width if config.vision else config.embeds_dim
        self.region_feature_head = PredictionHead(width, feature_dim, text.activation, text.norm_eps)  # MRFR
        self.region_class_head = PredictionHead(width, 1 + len(config.region_classes), text.activation,
                                                text.norm_eps)  # MRC (class 0 = background)
        self.mask_feature = nn.Parameter(torch.zeros(feature_dim))  # UNITER zeroes masked regions; learned here
        with torch.no_grad():  # HF's special_visual_initialize: the visual embeddings start as the text ones
            self.visual_type_embedding.weight.copy_(self.bert.type_embedding.weight)
            self.visual_position_embedding.weight.copy_(self.bert.positional_embedding)

    # ---- the encoder ----------------------------------------------------------------------------
    def visual_tokens(self, pixels: torch.Tensor, batch: dict, generator: torch.Generator | None = None) -> VisualTokens:
        """Region / grid tokens of the images (encoders.regions), from the image tower's grid."""
        if self.visual is None:
            raise UserError("this visualbert has no image tower (loaded from HF VisualBERT, which reads detector "
                            "features); give visual_embeds to forward_features, or train a vlmkit one")
        return self.inputs(backbone_grid(self.visual, pixels), batch, generator)

    def embeds_of(self, tokens: VisualTokens, features: torch.Tensor | None = None) -> torch.Tensor:
        """HF's `visual_embeds` (B, T, C [+ 7]) of visual tokens (their features replaced by `features`)."""
        features = tokens.features if features is None else features
        return torch.cat([features, tokens.geometry], dim=-1) if self.config.geometry else features

    def encode(self, tokens: torch.Tensor, visual_embeds: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, (B, T, E) visual_embeds, (B, T) mask -> hidden states (B, L + T, W) of [text ; visual]."""
        text_real = tokens != self.config.text.pad_token_id  # (B, L)
        text = self.bert.embed(tokens)  # (B, L, W): LN(word + position + segment 0)
        visual = (self.visual_projection(visual_embeds) + self.visual_position_embedding.weight[0]
                  + self.visual_type_embedding.weight[1])  # (B, T, W)
        visual = self.bert.embed_dropout(self.bert.embed_norm(visual))
        x = torch.cat([text, visual], dim=1)  # (B, L + T, W)
        real = torch.cat([text_real, visual_mask.bool()], dim=1)  # (B, L + T)
        return self.bert.transformer(x, mask=padding_mask(real))  # post-LN blocks end normalised

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L + T, W) -> (B, W): tanh(dense([CLS]))."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def answer_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, A) VQA logits, or a UserError when the model has no answer vocabulary."""
        if self.heads.answer is None:
            raise UserError("this visualbert has no answer head (no answer vocabulary); fine-tune it with task=vqa "
                            "on records with 'qa'")
        return self.heads.answer(self.answer_feature(hidden, tokens))

    def answer_feature(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """What the answer head reads: the pooled [CLS], or (HF VQA) the last text token before [SEP]."""
        if self.config.answer_pool == "pooler":
            return self.pool(hidden)
        last = (tokens != self.config.text.pad_token_id).sum(1) - 2  # (B,), HF's "as in original code"
        return hidden[torch.arange(len(hidden), device=hidden.device), last]

    def forward_features(self, tokens: torch.Tensor, visual_embeds: torch.Tensor,
                         visual_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """HF's interface: precomputed `visual_embeds` -> {"hidden" (B, L+T, W), "pooled" (B, W), "answer_logits",
        "itm_logits" (class 1 = match), "mlm_logits" (B, L, V)}."""
        if visual_mask is None:
            visual_mask = torch.ones(visual_embeds.shape[:2], dtype=torch.bool, device=visual_embeds.device)
        hidden = self.encode(tokens, visual_embeds, visual_mask)
        pooled = self.pool(hidden)
        answer = self.answer_logits(hidden, tokens) if self.heads.answer is not None else None
        return {"hidden": hidden, "pooled": pooled, "answer_logits": answer,
                "itm_logits": self.heads.itm(pooled), "mlm_logits": self.mlm_logits(hidden[:, :tokens.shape[1]])}

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., W) -> (..., V): the MLM decoder, tied to the word embeddings."""
        return self.mlm_head(hidden) @ self.bert.token_embedding.weight.t() + self.mlm_bias

    # ---- training -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """The losses of the targets the batch carries (the task's dataset decides which): `answer_scores`
        (VQA), `statement_labels` (reasoning), `itm_labels` (ITM), `mlm_labels` (MLM, and with it the region
        objectives and word-region alignment of pre-training)."""
        options, config = self.training_options, self.config
        pixels, tokens = batch["pixels"], batch["tokens"]  # (B, 3, S, S), (B, L)
        generator = torch.Generator().manual_seed(int(batch.get("batch_seed", 0)))
        if self.training and options.grid_fraction > 0 and "region_mask" in batch:  # some images use their grid
            drop = torch.rand(len(tokens), generator=generator) < options.grid_fraction
            batch = {**batch, "region_mask": batch["region_mask"] & ~drop[:, None].to(tokens.device)}
        visual = self.visual_tokens(pixels, batch, generator)  # (B, T, ...)
        features, masked_regions, mlm_labels = visual.features, None, batch.get("mlm_labels")
        if mlm_labels is not None:
            tokens, mlm_labels, masked_regions = self._conditional_masking(tokens, mlm_labels, visual, batch, generator)
            if masked_regions is not None:  # masked regions show a learned [MASK] feature, their geometry stays
                features = torch.where(masked_regions[..., None], self.mask_feature.to(features.dtype), features)
        hidden = self.encode(tokens, self.embeds_of(visual, features), visual.mask)  # (B, L + T, W)
        length = tokens.shape[1]
        pooled = self.pool(hidden)  # (B, W)
        loss, logs, logits = hidden.new_zeros(()), {}, None
        for task, key, feature, weight in (("vqa", "answer_scores", None, 1.0),
                                           ("reasoning", "statement_labels", pooled, 1.0),
                                           ("retrieval", "itm_labels", pooled, options.itm_weight)):
            if key in batch:
                feature = self.answer_feature(hidden, tokens) if feature is None else feature
                part, part_logs, part_logits = fusion_task_loss(self.heads, feature, batch, task)
                loss, logits = loss + weight * part, part_logits if logits is None else logits
                logs.update(part_logs)
        if mlm_labels is not None and bool((mlm_labels != IGNORE).any()):
            mlm = masked_lm_loss(self.mlm_logits, hidden[:, :length], mlm_labels)  # the decoder on masked tokens only
            loss = loss + options.mlm_weight * mlm
            logs["mlm_loss"] = mlm
        if masked_regions is not None:
            region_hidden = hidden[:, length:]  # (B, T, W)
            if options.mrfr_weight:
                mrfr = masked_region_feature_loss(self.region_feature_head(region_hidden), visual.features, masked_regions)
                loss = loss + options.mrfr_weight * mrfr
                logs["mrfr_loss"] = mrfr
            if options.mrc_weight and visual.labels is not None:
                mrc = masked_region_kl_loss(self.region_class_head(region_hidden), visual.labels, masked_regions)
                loss = loss + options.mrc_weight * mrc
                logs["mrc_loss"] = mrc
        if options.wra_weight and mlm_labels is not None and "itm_labels" in batch:
            text_real = tokens != config.text.pad_token_id
            wra = word_region_alignment_loss(hidden[:, 1:length], hidden[:, length:], text_real[:, 1:], visual.mask,
                                             batch["itm_labels"].bool())
            loss = loss + options.wra_weight * wra
            logs["wra_loss"] = wra
        return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=logits)

    def _conditional_masking(self, tokens, mlm_labels, visual: VisualTokens, batch, generator):
        """UNITER's conditional masking: with a region objective on, each matched pair masks its words or its
        regions (drawn per pair), so one modality is always seen whole. -> (tokens, mlm labels, masked regions or None)."""
        options = self.training_options
        if not (options.mrfr_weight or options.mrc_weight):
            return tokens, mlm_labels, None
        matched = batch["itm_labels"].bool() if "itm_labels" in batch else torch.ones(len(tokens), dtype=torch.bool,
                                                                                      device=tokens.device)  # (B,)
        regions_side = (torch.rand(len(tokens), generator=generator) < 0.5).to(tokens.device) & matched  # (B,)
        rows = matched.nonzero()[:, 0]
        if len(rows) >= 2 and not bool(regions_side.any()):  # every batch with two pairs trains both sides
            regions_side[rows[0]] = True
        if len(rows) >= 2 and bool(regions_side[rows].all()):
            regions_side[rows[-1]] = False
        # the pairs that mask regions keep their words: restore the original ids, predict none of them
        original = torch.where(mlm_labels != IGNORE, mlm_labels, tokens)
        tokens = torch.where(regions_side[:, None], original, tokens)
        mlm_labels = mlm_labels.masked_fill(regions_side[:, None], IGNORE)
        draw = torch.rand(visual.mask.shape, generator=generator).to(tokens.device)
        maskable = visual.mask & regions_side[:, None]
        masked = (draw < options.region_mask_probability) & maskable
        lowest = draw.masked_fill(~maskable, 2.0).argmin(dim=1)
        empty = ~masked.any(1) & maskable.any(1)  # at least one region per region-side pair
        masked[empty, lowest[empty]] = True
        return tokens, mlm_labels, masked

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """Every target at once (a real batch has one task's): masked captions, ITM labels, VQA soft scores,
        statement labels; regions (the last image without boxes)."""
        from vlmkit.encoders.lm import random_texts

        generator = torch.Generator().manual_seed(seed)
        side = self.config.vision.image_size
        tokens = random_texts(self.config.text, batch_size, generator)  # (B, L)
        labels = torch.full_like(tokens, IGNORE)
        labels[:, 1] = tokens[:, 1]
        return {"pixels": torch.randn(batch_size, 3, side, side, generator=generator), "tokens": tokens,
                "mlm_labels": labels, "itm_labels": (torch.arange(batch_size) < max(2, batch_size - 1)).long(),
                "answer_scores": torch.rand(batch_size, len(self.config.answers), generator=generator).round(),
                "statement_labels": torch.randint(0, 2, (batch_size,), generator=generator).float(), "batch_seed": seed,
                **random_regions(batch_size, side, len(self.config.region_classes), generator)}

    def adapt_init_state(self, state, expected):
        return keep_fresh_heads(state, expected)

    # ---- data -----------------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        """The answer vocabulary and the region classes of the training records."""
        answers = answer_vocabulary(records, config.get("max_answers", VisualBertConfig.max_answers))
        if answers:
            config["answers"] = answers
        classes = region_classes(records)
        if classes:
            config["region_classes"] = classes
        return config

    @classmethod
    def tokenizer_texts(cls, records):
        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        return FusionTaskDataset(records, transform, tokenizer, self.training_options, self.family, self.config.answers,
                                 self.config.region_classes, self.config.visual, self.config.vision.image_size,
                                 self.config.text.vocab_size, seed=seed)

    # ---- capabilities ---------------------------------------------------------------------------
    def region_inputs(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The records' object boxes where the evaluation transform puts them (`boxes`, `region_mask`,
        `region_labels`); a record without objects gets none (its grid cells then)."""
        config = self.config
        return region_inputs(records, self.transform, config.visual, config.vision.image_size, config.region_classes)

    def _hidden(self, pixels: torch.Tensor, tokens: torch.Tensor, regions: dict | None):
        """Hidden states for inference, in eval mode (every grid cell, no dropout) whatever the module's mode."""
        batch = {key: value.to(self.device) for key, value in (regions or {}).items()}
        was_training = self.training
        self.eval()
        try:
            visual = self.visual_tokens(pixels.to(self.device), batch)
            tokens = tokens.to(self.device)
            return self.encode(tokens, self.embeds_of(visual), visual.mask), tokens
        finally:
            self.train(was_training)

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: list[str], regions: dict | None = None, **_) -> list[str]:
        """The highest-scoring vocabulary answer for each (image, question); `regions` from `region_inputs`."""
        hidden, tokens = self._hidden(pixels, self.tokenize(questions), regions)
        logits = self.answer_logits(hidden, tokens)
        return [self.config.answers[i] for i in logits.argmax(-1).tolist()]

    @torch.no_grad()
    def verify(self, pixels: torch.Tensor, statements: list[str], regions: dict | None = None) -> torch.Tensor:
        """(B,) probability that each statement is true of its image."""
        hidden, _ = self._hidden(pixels, self.tokenize(statements), regions)
        return torch.sigmoid(self.heads.reasoning(self.pool(hidden))[:, 0]).cpu()

    @torch.no_grad()
    def match(self, pixels: torch.Tensor, tokens: torch.Tensor, regions: dict | None = None) -> torch.Tensor:
        """(B,) probability that text row b describes image row b (softmax of the ITM head)."""
        hidden, _ = self._hidden(pixels, tokens, regions)
        return self.heads.itm(self.pool(hidden)).softmax(-1)[:, 1].cpu()

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, T, E + 1): each image's visual_embeds with its mask as a last channel (grid / whole-image tokens)."""
        visual = self.visual_tokens(pixels.to(self.device), {})
        return torch.cat([self.embeds_of(visual), visual.mask[..., None].to(visual.features.dtype)], dim=-1)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the ITM "match" logit minus the "no match" one, of text row b against image-feature row b."""
        embeds, mask = image_features[..., :-1], image_features[..., -1] > 0.5
        logits = self.heads.itm(self.pool(self.encode(tokens.to(self.device), embeds, mask)))
        return logits[:, 1] - logits[:, 0]


register_config("visualbert-tiny", "visualbert", tiny=True, config={
    # a 64 px ViT (8x8 grid) and a 2-layer BERT of width 128, as the other tiny families
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 128, "depth": 3, "heads": 4},
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 3, "heads": 4, "causal": False,
             "pool": "cls", "eos_token_id": None, "prenorm": False, "embed_norm": True, "type_vocab_size": 2,
             "norm_eps": 1e-12},
    "visual": {"source": "auto", "max_regions": 8, "roi_size": 2, "image_region": True, "grid_keep": 0.5},
})
