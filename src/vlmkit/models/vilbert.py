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

Tasks and heads are the fusion encoders' (`encoders.fusion`), on the fused pooled_t * pooled_v:
`task=pretrain` is the paper's two proxy tasks — masked multi-modal modelling (MLM on matched pairs,
BERT's 80/10/10; on matched pairs 15% of the regions have their features zeroed and the model
predicts each one's class distribution, KL against it) and multi-modal alignment prediction (the
ITM head, `itm_labels` 1 = aligned); `vqa`, `reasoning` and `retrieval` fine-tune the shared heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from vlmkit.capabilities import Answers, MatchesImageText, ReadsRegions, Verifies
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.config import VisionConfig, build_vision_tower
from vlmkit.encoders.regions import VisualInputConfig, VisualInputs, backbone_grid, random_regions
from vlmkit.encoders.fusion import (IGNORE, FusionHeads, FusionTaskDataset, FusionTraining, fusion_task_loss,
                                    keep_fresh_heads, masked_lm_loss)
from vlmkit.encoders.twostream import TwoStreamTasks, idle_heads_term, Pooler, RegionEmbedding, RegionHead, mask_regions
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import BertLMHead
from vlmkit.layers.transformer import CoAttentionBlock, TokenTransformer, Transformer
from vlmkit.losses import masked_region_kl_loss
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


@dataclass
class ViLBERTTraining(FusionTraining):
    """The fusion options (task, MLM, ITM) plus ViLBERT's masked region classification."""

    region_mask_probability: float = bounded(0.15, low=0, high=1)
    region_weight: float = bounded(1.0, low=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, "training", ".")


@register_family
class ViLBERT(TwoStreamTasks, VLModel):
    family = "vilbert"
    config_class = ViLBERTConfig
    training_class = ViLBERTTraining
    capabilities = (Answers, Verifies, MatchesImageText, ReadsRegions)
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
        self.heads = FusionHeads(config.width, len(config.answers), "mlp", eps)  # on pooled_t * pooled_v
        num_classes = 1 + len(config.region_classes) if config.region_classes else 0
        self.region_head = RegionHead(config.v_width, {"cls": num_classes}, act, eps) if num_classes else None
        if self.heads.answer is None:
            self.capabilities = tuple(c for c in self.capabilities if c is not Answers)

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

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        options = self.training_options
        generator = torch.Generator().manual_seed(int(batch.get("batch_seed", 0)))
        visual = self.visual_features(batch, generator)
        feats, pos, real = visual["feats"], visual["pos"], visual["mask"]  # (B, N, F), (B, N, 5), (B, N)
        tokens = batch["tokens"]  # (B, L), already masked by the dataset in pre-training
        if options.task != "pretrain":
            fused = self.encode(tokens, feats, pos, real)[2]
            loss, logs, logits = fusion_task_loss(self.heads, fused, batch, options.task)
            return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=logits)
        matched = batch["itm_labels"].bool()  # (B,)
        masked = mask_regions(real & matched[:, None], options.region_mask_probability, generator)  # (B, N)
        text, image, fused = self.encode(tokens, feats.masked_fill(masked[..., None], 0.0), pos, real)
        itm, logs, logits = fusion_task_loss(self.heads, fused, batch, "pretrain")
        loss = options.itm_weight * itm + idle_heads_term(self.heads, fused)
        mlm_labels = batch.get("mlm_labels")
        if mlm_labels is not None and bool((mlm_labels != IGNORE).any()):
            mlm = masked_lm_loss(partial(self.mlm_head, embedding=self.text.token_embedding.weight), text, mlm_labels)
            loss = loss + options.mlm_weight * mlm
            logs["mlm_loss"] = mlm
        if self.region_head is not None:
            region_logits = self.region_head(image[masked])["cls"]  # (M, 1 + K): the masked regions only
            region = (masked_region_kl_loss(region_logits, visual["label_dist"][masked]) if "label_dist" in visual
                      else region_logits.sum() * 0.0)  # keeps the head in the graph when the batch has no classes
            loss = loss + options.region_weight * region
            logs["region_loss"] = region
        return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=logits)

    # ---- hooks ------------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """Vocabulary size and the pad id from the tokenizer (the dataset masks with its [MASK])."""
        config.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
        tokenizer.context_length = min(tokenizer.context_length, config.get("context_length", 512))
        return config

    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        """The answer vocabulary and the object names (masked-region classes) of the training records."""
        from vlmkit.data.records import answer_vocabulary
        from vlmkit.encoders.regions import region_classes

        answers = answer_vocabulary(records, config.get("max_answers", ViLBERTConfig.max_answers))
        if answers:
            config["answers"] = answers
        classes = region_classes(records)
        if classes:
            config["region_classes"] = classes
        return config

    def adapt_init_state(self, state, expected):
        return keep_fresh_heads(state, expected)

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        from vlmkit.data.records import record_texts

        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        config = self.config
        return FusionTaskDataset(records, transform, tokenizer, self.training_options, self.family, config.answers,
                                 config.region_classes, config.visual, config.vision.image_size, config.vocab_size, seed=seed)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """A pre-training batch: captions with a masked token each, alternate rows matched, regions (one image without)."""
        from vlmkit.encoders.lm import random_tokens

        config = self.config
        generator = torch.Generator().manual_seed(seed)
        size = config.vision.image_size
        tokens = random_tokens(config.vocab_size, min(config.context_length, 16), config.vocab_size - 1, config.pad_token_id,
                               batch_size, generator)
        labels = torch.full_like(tokens, IGNORE)
        labels[:, 1] = tokens[:, 1]
        return {"tokens": tokens, "mlm_labels": labels, "itm_labels": (torch.arange(batch_size) + 1) % 2, "batch_seed": seed,
                "pixels": torch.randn(batch_size, 3, size, size, generator=generator),
                **random_regions(batch_size, size, len(config.region_classes), generator)}

    # ---- capabilities: `encoders.twostream.TwoStreamTasks`, over these widths ---------------------
    def visual_widths(self) -> tuple[int, int]:
        """(F, P): the widths of a region's feature and location in `image_match_features`."""
        return self.config.vision.width, LOCATION_DIM


register_config("vilbert-tiny", "vilbert", tiny=True, config={
    # Text stream 3 layers at 64 (the last 2 co-attentional), visual stream 2 layers at 48 over a
    # 2-block ViT's 4 x 4 grid at 64 px: the whole image, then the object boxes (RoIAlign) or the 16 cells.
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "t_layers": 3,
    "v_width": 48, "v_heads": 4, "v_layers": 2, "v_mlp_ratio": 2.0, "co_layers": 2,
    "region_classes": ["circle", "square", "triangle"],
    "vision": {"type": "vit", "image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 4},
    "visual": {"source": "auto", "max_regions": 8},
})
register_config("vilbert-base", "vilbert", {
    # bert_base_6layer_6conect: BERT-base text, a 6-layer 1024-wide visual stream, 6 co-attention layers.
    "vision": {"type": "vit", "image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12},
})
