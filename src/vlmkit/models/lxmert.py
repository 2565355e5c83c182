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

Tasks and heads are the fusion encoders' (`encoders.fusion`): `task=pretrain` is masked language
modelling (on matched pairs) + image-text matching (`itm_labels`, 1 = match, as LXMERT's
`matched_label`) + masked object prediction: on matched pairs, 15% of the regions have their
features zeroed (LXMERT's masking), and the model regresses the original feature (SmoothL1) and
predicts the region's class distribution (KL; with a detector's one-hot label this is LXMERT's CE)
and, with `num_attr_labels`, its attribute (LXMERT's `attr` head; `region_attr_labels` in a batch).
The visual losses are means over the masked regions, which LXMERT's `mean() * 6.67` over all
regions (15% masked) approximates. The feature target is detached: the backbone trains with the
model, and regressing onto a moving target would let both collapse. LXMERT's QA head is the shared
answer head (`heads.answer`, the `logit_fc` layout HF's `answer_head` has), trained by `task=vqa`
(LXMERT's QA pre-training task is not run during `task=pretrain` here); `reasoning` and `retrieval`
fine-tune the shared true/false and ITM heads on the pooled output.

Visual inputs: with a `vision` tower the model computes them from `pixels` (`encoders.regions`:
RoIAlign-pooled object boxes and/or grid cells of the tower's last grid, with their normalised
boxes as `visual_pos`); without one (`vision: null`, what an HF checkpoint loads as) it reads region
features directly (`visual_feats` (B, N, F), `visual_pos` (B, N, 4), optional `visual_mask` (B, N)),
as HF's `LxmertModel` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from vlmkit.capabilities import Answers, MatchesImageText, ReadsRegions, Verifies
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.config import VisionConfig, build_vision_tower
from vlmkit.encoders.fusion import (IGNORE, FusionHeads, FusionTaskDataset, FusionTraining, fusion_task_loss,
                                    keep_fresh_heads, masked_lm_loss)
from vlmkit.encoders.regions import VisualInputConfig, VisualInputs, backbone_grid, random_regions
from vlmkit.encoders.twostream import TwoStreamTasks, idle_heads_term, Pooler, RegionEmbedding, RegionHead, feature_regression_loss, mask_regions
from vlmkit.errors import UserError
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.mlp import BertLMHead
from vlmkit.layers.transformer import CoAttentionBlock, TokenTransformer, Transformer
from vlmkit.losses import masked_region_kl_loss
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
    # Pre-training, reasoning and ITM heads (MLM, masked objects, `heads.itm`, `heads.reasoning`); an HF
    # LxmertModel / LxmertForQuestionAnswering checkpoint has none of them.
    pretraining_heads: bool = True
    reasoning_head: bool = True  # `heads.reasoning`, with the pre-training heads (an LxmertForPreTraining has none)
    num_object_labels: int = bounded(0, low=0)  # masked-object classes without an image tower (0: no such head)
    num_attr_labels: int = bounded(0, low=0)  # masked-object attribute classes (LXMERT's `attr`; 0: no such head)
    answers: list[str] = field(default_factory=list)  # the answer head's vocabulary (empty: no answer head)
    max_answers: int = bounded(100, low=1)  # answer vocabulary size taken from the training records
    # The image side. None: region features come in the batch (HF's interface); a tower: from pixels, and
    # visual_feat_dim is then the tower's grid width (a ViT's width).
    vision: VisionConfig | None = None
    visual: VisualInputConfig = field(default_factory=VisualInputConfig)
    region_classes: list[str] = field(default_factory=list)  # object names the masked-object head predicts (with a tower)

    def __post_init__(self) -> None:
        check_fields(self, "model", ".")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}; pick heads that divide it")
        if self.vision is not None:
            if self.vision.type != "vit":
                raise UserError("the LXMERT image tower must be a ViT (vision.type: vit), whose grid width is vision.width")
            self.visual_feat_dim = self.vision.width
            self.num_object_labels = 1 + len(self.region_classes) if self.region_classes else 0


@dataclass
class LxmertTraining(FusionTraining):
    """The fusion options (task, MLM, ITM) plus LXMERT's masked object prediction."""

    region_mask_probability: float = bounded(0.15, low=0, high=1)
    feat_weight: float = bounded(1.0, low=0)  # masked-feature regression
    obj_weight: float = bounded(1.0, low=0)  # masked-object classes (and attributes)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, "training", ".")


@register_family
class Lxmert(TwoStreamTasks, VLModel):
    family = "lxmert"
    config_class = LxmertConfig
    training_class = LxmertTraining
    capabilities = (Answers, Verifies, MatchesImageText, ReadsRegions)
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
        self.heads = FusionHeads(width, len(config.answers), "mlp", eps)
        if config.pretraining_heads:
            self.mlm_head = BertLMHead(width, config.vocab_size, config.activation, eps)
            sizes = {"feat": config.visual_feat_dim, "obj": config.num_object_labels, "attr": config.num_attr_labels}
            self.region_head = RegionHead(width, {name: size for name, size in sizes.items() if size}, config.activation, eps)
            if not config.reasoning_head:
                self.heads.reasoning = None
        else:  # an HF checkpoint: at most the answer head
            self.heads.reasoning = self.heads.itm = None
        self.visual = build_vision_tower(config.vision, None) if config.vision is not None else None
        if self.visual is not None:
            self.visual_inputs = VisualInputs(config.visual, config.vision.image_size, num_classes=len(config.region_classes))
        # What this instance can do: a feature-only model (an HF checkpoint) cannot read pixels.
        present = {Answers: self.heads.answer is not None, Verifies: self.heads.reasoning is not None,
                   MatchesImageText: config.pretraining_heads, ReadsRegions: True}
        self.capabilities = tuple(c for c in self.capabilities if self.visual is not None and present[c])

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
        "label_dist" (B, N, K) when the batch carries region classes, "attr_dist" (B, N, K') attributes}."""
        if self.visual is None:
            if "visual_feats" not in batch:
                raise UserError("this LXMERT model has no image tower, so it reads region features: give visual_feats "
                                "and visual_pos (an HF checkpoint), or build it with a vision section to read pixels")
            feats = batch["visual_feats"]
            mask = batch.get("visual_mask")
            out = {"feats": feats, "pos": batch["visual_pos"],
                   "mask": torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device) if mask is None else mask}
            for name, key, size in (("region_labels", "label_dist", self.config.num_object_labels),
                                    ("region_attr_labels", "attr_dist", self.config.num_attr_labels)):
                if name in batch and size:
                    labels = batch[name]  # (B, N) class ids, -1 = none: as one-hot distributions
                    out[key] = F.one_hot(labels.clamp(min=0), size).float() * (labels >= 0)[..., None]
            return out
        tokens = self.visual_inputs(backbone_grid(self.visual, batch["pixels"]), batch, generator)
        out = {"feats": tokens.features, "pos": tokens.geometry[..., :4], "mask": tokens.mask}  # LXMERT's 4-d normalised box
        if tokens.labels is not None and self.config.num_object_labels:
            out["label_dist"] = tokens.labels  # (B, T, 1 + K), 0 = background
        return out

    def answer_logits(self, tokens: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The answer head's logits (B, A) (HF's `question_answering_score`)."""
        if self.heads.answer is None:
            raise UserError("this LXMERT model has no answer head (no answer vocabulary); fine-tune it with task=vqa "
                            "on records with 'qa'")
        return self.heads.answer(self.encode(tokens, visual_feats, visual_pos, visual_mask=visual_mask)[2])

    def pretraining_logits(self, tokens: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
                           visual_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The pre-training heads' outputs: "mlm" (B, L, V) (HF's `prediction_logits`), "itm" (B, 2)
        [no match, match] (`cross_relationship_score`), the masked-region head's "feat" (B, N, F) and, where
        the model has them, "obj" / "attr" (B, N, K) (HF's `obj_predict_head`), and "answer" (B, A)."""
        if not self.config.pretraining_heads:
            raise UserError("this LXMERT model has no pre-training heads (an HF LxmertModel / ForQuestionAnswering "
                            "checkpoint)")
        language, vision, pooled = self.encode(tokens, visual_feats, visual_pos, visual_mask=visual_mask)
        out = {"mlm": self.mlm_head(language, self.text.token_embedding.weight), "itm": self.heads.itm(pooled),
               **self.region_head(vision)}
        if self.heads.answer is not None:
            out["answer"] = self.heads.answer(pooled)
        return out

    # ---- training -----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        options = self.training_options
        if not self.config.pretraining_heads:
            raise UserError("this LXMERT model has no pre-training heads (an HF LxmertModel / ForQuestionAnswering "
                            "checkpoint); build it with pretraining_heads=true to train it")
        generator = torch.Generator().manual_seed(int(batch.get("batch_seed", 0)))
        visual = self.visual_features(batch, generator)
        feats, boxes, real = visual["feats"], visual["pos"], visual["mask"]  # (B, N, F), (B, N, 4), (B, N)
        tokens = batch["tokens"]  # (B, L), already masked by the dataset in pre-training
        if options.task == "reasoning" and self.heads.reasoning is None:
            raise UserError("this LXMERT model has no reasoning head (an HF LxmertForPreTraining checkpoint); "
                            "build it with reasoning_head=true to fine-tune task=reasoning")
        if options.task != "pretrain":
            pooled = self.encode(tokens, feats, boxes, visual_mask=real)[2]
            loss, logs, logits = fusion_task_loss(self.heads, pooled, batch, options.task)
            return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=logits)
        matched = batch["itm_labels"].bool()  # (B,)
        masked = mask_regions(real & matched[:, None], options.region_mask_probability, generator)  # (B, N)
        language, vision, pooled = self.encode(tokens, feats.masked_fill(masked[..., None], 0.0), boxes, visual_mask=real)
        itm, logs, logits = fusion_task_loss(self.heads, pooled, batch, "pretrain")
        loss = options.itm_weight * itm + idle_heads_term(self.heads, pooled)
        mlm_labels = batch.get("mlm_labels")
        if mlm_labels is not None and bool((mlm_labels != IGNORE).any()):
            mlm = masked_lm_loss(partial(self.mlm_head, embedding=self.text.token_embedding.weight), language, mlm_labels)
            loss = loss + options.mlm_weight * mlm
            logs["mlm_loss"] = mlm
        # The region head runs on the masked regions only (M of them): every row it predicts has a target.
        predicted = self.region_head(vision[masked])  # name -> (M, size)
        feat = feature_regression_loss(predicted["feat"], feats.detach()[masked])
        loss = loss + options.feat_weight * feat
        logs["feat_loss"] = feat
        if "obj" in predicted:
            obj = (masked_region_kl_loss(predicted["obj"], visual["label_dist"][masked]) if "label_dist" in visual
                   else predicted["obj"].sum() * 0.0)  # keeps the head in the graph when the batch has no classes
            loss = loss + options.obj_weight * obj
            logs["obj_loss"] = obj
        if "attr" in predicted:  # no built-in data names attributes: only a batch's `region_attr_labels` train it
            attr = (masked_region_kl_loss(predicted["attr"], visual["attr_dist"][masked]) if "attr_dist" in visual
                    else predicted["attr"].sum() * 0.0)
            loss = loss + options.obj_weight * attr
            logs["attr_loss"] = attr
        return ModelOutput(loss=loss, logs=detached_logs(**logs, loss=loss), logits=logits)

    # ---- hooks ------------------------------------------------------------------------------
    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """Vocabulary size and the pad id from the tokenizer (the dataset masks with its [MASK])."""
        config["vocab_size"] = tokenizer.vocab_size
        config["pad_token_id"] = tokenizer.pad_id
        tokenizer.context_length = min(tokenizer.context_length, config.get("context_length", 512))
        return config

    @classmethod
    def adapt_config_to_data(cls, config: dict, records: list[dict]) -> dict:
        """The answer vocabulary and, with an image tower, the object names (masked-object classes) of the records."""
        from vlmkit.data.records import answer_vocabulary
        from vlmkit.encoders.regions import region_classes

        answers = answer_vocabulary(records, config.get("max_answers", LxmertConfig.max_answers))
        if answers:
            config["answers"] = answers
        classes = region_classes(records)
        if classes and config.get("vision") is not None:
            config["region_classes"] = classes
        return config

    def adapt_init_state(self, state, expected):
        return keep_fresh_heads(state, expected)

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        from vlmkit.data.records import record_texts

        return record_texts(records, questions=True, statements=True)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        if self.visual is None:
            raise UserError("this LXMERT model has no image tower (it reads precomputed region features), so it cannot "
                            "train on images; build it with a vision section")
        config = self.config
        return FusionTaskDataset(records, transform, tokenizer, self.training_options, self.family, config.answers,
                                 config.region_classes, config.visual, config.vision.image_size, config.vocab_size, seed=seed)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """A pre-training batch: captions with a masked token each, alternate rows matched, regions or features."""
        from vlmkit.encoders.lm import random_tokens

        config = self.config
        generator = torch.Generator().manual_seed(seed)
        tokens = random_tokens(config.vocab_size, min(config.context_length, 16), config.vocab_size - 1, config.pad_token_id,
                               batch_size, generator)
        labels = torch.full_like(tokens, IGNORE)
        labels[:, 1] = tokens[:, 1]
        batch = {"tokens": tokens, "mlm_labels": labels, "itm_labels": (torch.arange(batch_size) + 1) % 2,
                 "batch_seed": seed}
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
            if config.num_attr_labels:
                batch["region_attr_labels"] = torch.randint(config.num_attr_labels, (batch_size, regions), generator=generator)
        return batch

    # ---- capabilities: `encoders.twostream.TwoStreamTasks`, over these widths ---------------------
    def visual_widths(self) -> tuple[int, int]:
        """(F, P): the widths of a region's feature and location in `image_match_features`."""
        return self.config.visual_feat_dim, self.config.visual_pos_dim


register_config("lxmert-tiny", "lxmert", tiny=True, config={
    # 2 language, 1 relationship, 2 cross-modality layers at width 64 over a 2-block ViT's 4 x 4 grid at
    # 64 px: the whole image, the object boxes (RoIAlign) or, for an image without boxes, the 16 cells.
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "l_layers": 2, "r_layers": 1, "x_layers": 2,
    "region_classes": ["circle", "square", "triangle"],
    "vision": {"type": "vit", "image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 4},
    "visual": {"source": "auto", "max_regions": 8},
})
register_config("lxmert-tiny-features", "lxmert", config={
    # The same stacks reading 32-d region features directly (HF's interface; no image tower).
    "vocab_size": 1024, "context_length": 32, "width": 64, "heads": 4, "l_layers": 2, "r_layers": 1, "x_layers": 2,
    "visual_feat_dim": 32, "num_object_labels": 8,
})
register_config("lxmert-base", "lxmert", {
    # The paper's (and unc-nlp/lxmert-base-uncased's) sizes: 9 / 5 / 5 layers, 2048-d detector features.
    "num_object_labels": 1600,
})
