"""ViLBERT (Lu et al. 2019): two BERT streams joined by co-attentional transformer layers.

    tokens (B, L) -> BERT embeddings -> text layers (the first t_layers - co_layers alone) ----+
    regions: the whole image + boxes / grid cells (B, N, F), 5-d locations (x0, y0, x1, y1, area)  |
        -> LN(fc(feat) + fc(loc)) -> visual layers (one before each co-attention layer) ------+ |
    co_layers times: [visual layer k] [text layer] -> co-attention: each stream's queries       v v
        attend to the other stream's keys and values, then each stream's FFN (CoAttentionBlock)
    -> text (B, L, Dt), image (B, N, Dv); pooled_t = tanh(W h_[CLS]), pooled_v = tanh(W v_[IMG])
    alignment / answers read pooled_t * pooled_v (the paper's "mul" pooling)

As in vilbert-multi-task's `bert_base_6layer_6conect`, the co-attention layers connect the last
co_layers text layers with the first co_layers visual layers; the attention's inner width is
the querying stream's width (the original has a separate `bi_hidden_size`). Region 0 is the
whole image (`visual.image_region`, the paper's IMG token: the mean of the grid).

Pre-training (the paper's two proxy tasks plus MLM's usual set-up): masked multi-modal modelling
(15% of the text tokens, BERT's 80/10/10; 15% of the regions have their features zeroed and the
model predicts the region's class distribution, KL against it, computed as a soft-target CE) and
multi-modal alignment prediction (half the pairs get another row's image; a linear head on
pooled_t * pooled_v, 1 = aligned). With an answer vocabulary the VQA head (a 2-layer MLP on the
same product) trains on the batch's questions. A step's masks come from `batch["seed"]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.capabilities import Answers, MatchesImageText
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.config import VisionConfig, build_vision_tower
from vlmkit.encoders.regions import VisualInputConfig, VisualInputs, backbone_grid, random_regions
from vlmkit.encoders.twostream import (IGNORE_INDEX, AnswerHead, Pooler, RegionEmbedding, RegionHead, mask_regions,
                                       mask_tokens, maskable_tokens, mismatched_images, soft_region_loss)
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import BertLMHead
from vlmkit.layers.transformer import CoAttentionBlock, TokenTransformer, Transformer
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family

LOCATION_DIM = 5  # x0, y0, x1, y1, area fraction (vmurahari3/visdial-bert #10)


@dataclass
class ViLBERTConfig:
    vocab_size: int = bounded(30522, low=1)
    context_length: int = bounded(512, low=1)
    width: int = bounded(768, low=1)  # the text stream
    heads: int = bounded(12, low=1)
    t_layers: int = bounded(12, low=1)
    mlp_ratio: float = bounded(4.0, low=0, low_open=True)
    v_width: int = bounded(1024, low=1)  # the visual stream
    v_heads: int = bounded(8, low=1)
    v_layers: int = bounded(6, low=1)
    v_mlp_ratio: float = bounded(1.0, low=0, low_open=True)  # v_intermediate_size 1024 / v_hidden_size 1024
    co_layers: int = bounded(6, low=1)  # co-attention layers: text layers [t - co, t), visual layers [0, co)
    activation: str = "gelu"
    norm_eps: float = bounded(1e-12, low=0, low_open=True)
    pad_token_id: int = 0
    eos_token_id: int | None = 102
    mask_token_id: int | None = 103
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="vit", image_size=224, patch_size=16))
    visual: VisualInputConfig = field(default_factory=VisualInputConfig)
    region_classes: list[str] = field(default_factory=list)  # the masked-region classes (with background: 1 + K)
    answers: list[str] = field(default_factory=list)  # the VQA head's vocabulary (empty: no head)
    max_answers: int = bounded(100, low=1)

    def __post_init__(self) -> None:
        check_fields(self, "model", ".")
        for name, width, heads in (("width", self.width, self.heads), ("v_width", self.v_width, self.v_heads)):
            if width % heads:
                raise UserError(f"{name} {width} is not divisible by its {heads} heads; pick heads that divide it")
        if self.co_layers > min(self.t_layers, self.v_layers):
            raise UserError(f"co_layers {self.co_layers} needs at least as many text (t_layers {self.t_layers}) and visual "
                            f"(v_layers {self.v_layers}) layers; lower co_layers or add layers")
        if self.vision.type != "vit":
            raise UserError("the ViLBERT image tower must be a ViT (vision.type: vit), whose grid width is vision.width")
        if self.mask_token_id is None:
            raise UserError("ViLBERT pre-training masks tokens but the config has no mask_token_id; "
                            "train with a tokenizer that has [MASK] (tokenizer: wordpiece)")


@dataclass
class ViLBERTTraining:
    mlm_probability: float = bounded(0.15, low=0, high=1)
    region_mask_probability: float = bounded(0.15, low=0, high=1)
    mismatch_probability: float = bounded(0.5, low=0, high=1)
    mlm_weight: float = bounded(1.0, low=0)
    region_weight: float = bounded(1.0, low=0)
    itm_weight: float = bounded(1.0, low=0)
    qa_weight: float = bounded(1.0, low=0)
    question_fraction: float = bounded(0.3, low=0, high=1)  # samples that are a question with its answers

    def __post_init__(self) -> None:
        check_fields(self, "training", ".")


@register_family
class ViLBERT(VLModel):
    family = "vilbert"
    config_class = ViLBERTConfig
    training_class = ViLBERTTraining
    capabilities = (Answers, MatchesImageText)
    towers = {"text": "text", "image": "visual"}
    example_config = {"answers": ["yes", "no", "0", "1", "2"]}

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__(config)
        eps, act = config.norm_eps, config.activation
        self.text = TokenTransformer(config.vocab_size, config.context_length, config.width, config.t_layers, config.heads,
                                     mlp_ratio=config.mlp_ratio, activation=act, prenorm=False, norm_eps=eps,
                                     type_vocab_size=2, embed_norm=True)
        self.visual = build_vision_tower(config.vision, None)
        self.visual_inputs = VisualInputs(config.visual, config.vision.image_size, num_classes=len(config.region_classes))
        self.regions = RegionEmbedding(config.vision.width, LOCATION_DIM, config.v_width, eps, combine="sum")
        self.image_stream = Transformer(config.v_width, config.v_layers, config.v_heads, mlp_ratio=config.v_mlp_ratio,
                                        activation=act, prenorm=False, norm_eps=eps)
        self.co_attention = torch.nn.ModuleList(
            CoAttentionBlock(config.width, config.heads, other_dim=config.v_width, other_heads=config.v_heads,
                             mlp_ratio=config.mlp_ratio, other_mlp_ratio=config.v_mlp_ratio, activation=act, norm_eps=eps)
            for _ in range(config.co_layers))
        self.text_pooler, self.image_pooler = Pooler(config.width), Pooler(config.v_width)
        self.image_to_text = torch.nn.Linear(config.v_width, config.width)  # pooled_v into the text width for the product
        self.mlm_head = BertLMHead(config.width, config.vocab_size, act, eps)
        self.itm_head = torch.nn.Linear(config.width, 2)
        num_classes = 1 + len(config.region_classes) if config.region_classes else 0
        self.region_head = RegionHead(config.v_width, {"cls": num_classes}, act, eps) if num_classes else None
        self.answer_head = AnswerHead(config.width, len(config.answers), eps) if config.answers else None
        if self.answer_head is None:
            self.capabilities = (MatchesImageText,)

    # ---- the encoder ------------------------------------------------------------------------
    def visual_features(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{"feats" (B, N, F), "pos" (B, N, 5), "mask" (B, N)[, "label_dist" (B, N, 1 + K)]} from `pixels` (and boxes)."""
        tokens = self.visual_inputs(backbone_grid(self.visual, batch["pixels"]), batch, generator)
        geometry = tokens.geometry  # (B, N, 7): x0, y0, x1, y1, w, h, area
        out = {"feats": tokens.features, "pos": torch.cat([geometry[..., :4], geometry[..., 6:]], dim=-1),
               "mask": tokens.mask}
        if tokens.labels is not None and self.region_head is not None:
            out["label_dist"] = tokens.labels
        return out

    def encode(self, tokens: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor, visual_mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text (B, L, Dt), image (B, N, Dv), fused = pooled_t * W pooled_v (B, Dt))."""
        config = self.config
        text_mask = padding_mask(tokens != config.pad_token_id)  # (B, 1, 1, L)
        image_mask = padding_mask(visual_mask) if visual_mask is not None else None  # (B, 1, 1, N)
        text = self.text.embed(tokens, 0)  # (B, L, Dt)
        image = self.regions(feats, pos)  # (B, N, Dv)
        text_blocks, image_blocks = self.text.transformer.blocks, self.image_stream.blocks
        alone = config.t_layers - config.co_layers
        for block in text_blocks[:alone]:  # the text layers before the first co-attention
            text = block(text, text_mask)
        for index, co_attention in enumerate(self.co_attention):
            image = image_blocks[index](image, image_mask)
            text = text_blocks[alone + index](text, text_mask)
            text, image = co_attention(text, image, mask_a=text_mask, mask_b=image_mask)
        for block in image_blocks[config.co_layers:]:  # visual layers after the last co-attention
            image = block(image, image_mask)
        fused = self.text_pooler(text) * self.image_to_text(self.image_pooler(image))  # (B, Dt)
        return text, image, fused

    # ---- pre-training -------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        options, config = self.training_options, self.config
        tokens = batch["tokens"]  # (B, L)
        batch_size, device = tokens.shape[0], tokens.device
        generator = torch.Generator().manual_seed(int(batch.get("seed", 0)))
        visual = self.visual_features(batch, generator)
        matched, source = mismatched_images(batch_size, options.mismatch_probability, generator, device)
        feats, pos, real = visual["feats"][source], visual["pos"][source], visual["mask"][source]
        corrupted, mlm_labels = mask_tokens(tokens, maskable_tokens(tokens, config.pad_token_id, config.eos_token_id),
                                            config.mask_token_id, config.vocab_size, options.mlm_probability, generator)
        masked = mask_regions(real, options.region_mask_probability, generator)  # (B, N)
        text, image, fused = self.encode(corrupted, feats.masked_fill(masked[..., None], 0.0), pos, real)
        mlm_logits = self.mlm_head(text, self.text.token_embedding.weight)  # (B, L, V)
        mlm = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE_INDEX)
        itm_logits = self.itm_head(fused)  # (B, 2)
        itm = F.cross_entropy(itm_logits, matched.long())
        loss = options.mlm_weight * mlm + options.itm_weight * itm
        logs = {"mlm_loss": mlm, "itm_loss": itm, "itm_acc": (itm_logits.argmax(-1) == matched.long()).float().mean()}
        if self.region_head is not None:
            logits = self.region_head(image)["cls"]  # (B, N, 1 + K)
            if "label_dist" in visual:
                region = soft_region_loss(logits, visual["label_dist"][source], masked & matched[:, None])
            else:
                region = logits.sum() * 0.0
            loss = loss + options.region_weight * region
            logs["region_loss"] = region
        if self.answer_head is not None:
            answer_logits = self.answer_head(fused)  # (B, A)
            has_answer = batch.get("has_answer", torch.zeros(batch_size, dtype=torch.bool, device=device)) & matched
            if "answer_scores" in batch and has_answer.any():
                scores = batch["answer_scores"][has_answer]  # (Bq, A)
                qa = F.binary_cross_entropy_with_logits(answer_logits[has_answer], scores) * scores.shape[1]
                logs["qa_loss"] = qa
            else:
                qa = answer_logits.sum() * 0.0
            loss = loss + options.qa_weight * qa
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, **logs), logits=mlm_logits)

    # ---- hooks ------------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """Vocabulary size and the pad / [SEP] / [MASK] ids from the tokenizer (a wordpiece one has [MASK])."""
        mask_id = getattr(tokenizer, "mask_id", None)
        if mask_id is None:
            if hasattr(tokenizer, "add_special_tokens"):
                raise UserError("ViLBERT pre-training needs a tokenizer with a [MASK] token; use tokenizer: wordpiece")
            mask_id = tokenizer.vocab_size - 1  # a stand-in vocabulary (dry run): its last id
        config.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
                      mask_token_id=mask_id)
        tokenizer.context_length = min(tokenizer.context_length, config.get("context_length", 512))
        return config

    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        from vlmkit.encoders.regions import region_classes
        from vlmkit.encoders.twostream import answer_vocabulary

        if not config.get("region_classes"):
            config["region_classes"] = region_classes(records)
        if not config.get("answers"):
            config["answers"] = answer_vocabulary(records, config.get("max_answers", ViLBERTConfig.max_answers))
        return config

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        from vlmkit.data.records import record_texts

        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        from vlmkit.encoders.twostream import RegionTextDataset

        return RegionTextDataset(records, transform, tokenizer, seed, self.config.vision.image_size, self.config.region_classes,
                                 self.config.visual.max_regions, self.config.answers, self.training_options.question_fraction)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_tokens

        config = self.config
        generator = torch.Generator().manual_seed(seed)
        eos = config.eos_token_id if config.eos_token_id is not None else config.vocab_size - 1
        size = config.vision.image_size
        batch = {"tokens": random_tokens(config.vocab_size, min(config.context_length, 16), eos, config.pad_token_id,
                                         batch_size, generator),
                 "pixels": torch.randn(batch_size, 3, size, size, generator=generator), "seed": seed,
                 **random_regions(batch_size, size, len(config.region_classes), generator)}
        if config.answers:
            batch["answer_scores"] = torch.rand(batch_size, len(config.answers), generator=generator).round()
            batch["has_answer"] = torch.ones(batch_size, dtype=torch.bool)
        return batch

    # ---- capabilities -------------------------------------------------------------------------
    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, questions: list[str], **_) -> list[str]:
        """The VQA head's highest-scoring answer for each (image, question)."""
        visual = self.visual_features({"pixels": pixels.to(self.device)})
        fused = self.encode(self.tokenize(questions).to(self.device), visual["feats"], visual["pos"], visual["mask"])[2]
        return [self.config.answers[i] for i in self.answer_head(fused).argmax(-1).tolist()]

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, F + 5 + 1): each image's region features, locations and mask, packed for `match_scores`."""
        visual = self.visual_features({"pixels": pixels.to(self.device)})
        return torch.cat([visual["feats"], visual["pos"], visual["mask"][..., None].to(visual["feats"].dtype)], dim=-1)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the alignment head's log-odds that text row b matches image-feature row b."""
        feats, pos, mask = image_features.split([self.config.vision.width, LOCATION_DIM, 1], dim=-1)
        logits = self.itm_head(self.encode(tokens.to(self.device), feats, pos, mask[..., 0] > 0.5)[2])  # (B, 2)
        return logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) probability that text row b describes image row b."""
        return torch.sigmoid(self.match_scores(self.image_match_features(pixels), tokens)).cpu()


register_config("vilbert-tiny", "vilbert", tiny=True, config={
    # Text stream 3 layers at 64 (the last 2 co-attentional), visual stream 2 layers at 48 over a
    # 2-block ViT's 4 x 4 grid at 64 px plus the whole image (vlmkit eval gives pixels only, no boxes).
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "t_layers": 3,
    "v_width": 48, "v_heads": 4, "v_layers": 2, "v_mlp_ratio": 2.0, "co_layers": 2,
    "eos_token_id": 2, "mask_token_id": 3, "region_classes": ["circle", "square", "triangle"],
    "vision": {"type": "vit", "image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 4},
    "visual": {"source": "grid"},
})
register_config("vilbert-base", "vilbert", {
    # bert_base_6layer_6conect: BERT-base text, a 6-layer 1024-wide visual stream, 6 co-attention layers.
    "vision": {"type": "vit", "image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12},
})
