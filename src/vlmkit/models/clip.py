"""CLIP and ALIGN: a dual encoder trained with a contrastive (or SigLIP sigmoid) loss.

image -> vision tower -> (B, D)      text -> text tower -> (B, D)
loss = symmetric cross-entropy over exp(t) * normalised image @ normalised text.T, with the
temperature t learned, initialised at ln(1/0.07) and clamped to [0, ln 100] after each step.
`loss: unicl` (Florence/UniCL) makes every pair of the batch that shares a record `label` a
positive; records without a label are their own class, so on captions alone it is CLIP's loss.
ALIGN is the same family with a bidirectional BERT-like text tower pooled at [CLS].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.capabilities import EmbedsImages, EmbedsTexts
from vlmkit.encoders.config import TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vlmkit.encoders.lm import random_texts
from vlmkit.errors import UserError
from vlmkit.losses import contrastive_loss, matching_accuracy, sigmoid_loss, unicl_loss
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: str = "contrastive"  # contrastive | sigmoid (SigLIP) | unicl (Florence: shared labels are positives)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = -10.0  # sigmoid loss only
    max_logit_scale: float = math.log(100)
    # Tower initialisation: "openclip" (OpenCLIP's stds and zero attention biases for the ViT and the causal
    # text tower; learns faster, docs/clip_vs_openclip.md) or "torch" (PyTorch's module defaults).
    init: str = "openclip"

    def __post_init__(self) -> None:
        if self.loss not in ("contrastive", "sigmoid", "unicl"):
            raise UserError(f"unknown CLIP loss '{self.loss}'; use 'contrastive', 'sigmoid' or 'unicl'")
        if self.init not in ("openclip", "torch"):
            raise UserError(f"unknown CLIP init '{self.init}'; use 'openclip' or 'torch'")
        if self.embed_dim < 1:
            raise UserError(f"embed_dim must be at least 1, got {self.embed_dim}")


@dataclass
class CLIPTraining:
    """The recipe's `training:` options of a dual encoder."""

    local_loss: bool = True  # each rank scores its own rows against all gathered texts (OpenCLIP's --local-loss)
    label_smoothing: float = 0.0  # ALIGN uses 0.1
    # NegCLIP: each caption's hard negative (vlmkit.data.negatives; kinds "spatial", "swap") as one more
    # text its image must score lower. Empty: off.
    hard_negatives: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from vlmkit.data.negatives import validate_kinds

        if isinstance(self.hard_negatives, str):
            self.hard_negatives = (self.hard_negatives,)
        if self.hard_negatives:
            try:
                self.hard_negatives = validate_kinds(self.hard_negatives)
            except ValueError as error:
                raise UserError(f"training.{error}") from None
            if self.label_smoothing:
                raise UserError("training.hard_negatives and training.label_smoothing cannot be combined "
                                "(a caption without a negative leaves an empty column); drop one")


@register_family
class CLIP(VLModel):
    family = "clip"
    config_class = CLIPConfig
    capabilities = (EmbedsImages, EmbedsTexts)
    training_class = CLIPTraining
    towers = {"image": "visual", "text": "text"}
    uses_every_parameter = True
    # Formats `save_pretrained(format=...)` / `vlmkit convert --to` can write, and the function writing each.
    export_formats = {"hf": "vlmkit.interop.hf_clip:export", "openclip": "vlmkit.interop.openclip:export"}

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.visual = build_vision_tower(config.vision, config.embed_dim)
        self.text = build_text_tower(config.text, config.embed_dim)
        if config.init == "openclip":
            # Only the towers OpenCLIP defines an init for: its ViT and its causal (CLIP) text tower.
            if hasattr(self.visual, "init_openclip"):
                self.visual.init_openclip()
            if config.text.causal:
                self.text.init_openclip()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.loss == "sigmoid" else None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image embeddings (not L2-normalised)."""
        return self.visual(pixels, pooled_only=True).pooled

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) text embeddings (not L2-normalised)."""
        return self.text(tokens).pooled

    def logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B_img, B_txt), logits_per_text) as CLIP's forward returns them."""
        image = nn.functional.normalize(self.encode_image(pixels), dim=-1)
        text = nn.functional.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * image @ text.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        image = self.encode_image(batch["pixels"])  # (B, D)
        text = self.encode_text(batch["tokens"])  # (B, D)
        if self.config.loss == "sigmoid":
            loss, logits = sigmoid_loss(image, text, self.logit_scale, self.logit_bias)
        elif self.config.loss == "unicl":
            if "labels" not in batch:
                raise UserError("the 'unicl' loss needs the batch's `labels` (class ids; the CLIP family's training "
                                "dataset adds them from the records' `label` field)")
            loss, logits = unicl_loss(image, text, self.logit_scale, batch["labels"])
        else:
            options = self.training_options
            negatives = self.encode_text(batch["negative_tokens"]) if "negative_tokens" in batch else None  # (B, D)
            loss, logits = contrastive_loss(
                image, text, self.logit_scale, local_loss=options.local_loss, label_smoothing=options.label_smoothing,
                negative_features=negatives, negative_mask=batch.get("has_negative"),
            )
        logs = detached_logs(loss=loss, i2t_acc=matching_accuracy(logits), logit_scale=self.logit_scale.exp())
        if "negative_tokens" in batch:
            logs.update(detached_logs(negative_acc=_beats_negative(image, text, negatives, batch["has_negative"])))
        if self.logit_bias is not None:
            logs.update(detached_logs(logit_bias=self.logit_bias))
        return ModelOutput(loss=loss, logs=logs)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        batch = {"pixels": pixels, "tokens": random_texts(text, batch_size, generator)}  # texts of different lengths, padded
        if self.config.loss == "unicl":
            batch["labels"] = torch.arange(batch_size) // 2  # rows 0 and 1 share a class, ...
        return batch

    def training_dataset(self, records: list[dict], transform, tokenizer, seed: int, caption: str = "random"):
        """The image-caption dataset; with `loss: unicl` each batch also carries `labels` (B,) class ids,
        with `training.hard_negatives` `negative_tokens` (B, L) and `has_negative` (B,)."""
        dataset = super().training_dataset(records, transform, tokenizer, seed=seed, caption=caption)
        kinds = self.training_options.hard_negatives
        if kinds:
            if self.config.loss != "contrastive":
                raise UserError(f"training.hard_negatives needs the contrastive loss, not '{self.config.loss}'")
            dataset = _HardNegativeDataset(dataset, kinds)
        return _LabelledDataset(dataset) if self.config.loss == "unicl" else dataset

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.config.max_logit_scale)


@torch.no_grad()
def _beats_negative(image, text, negatives, has_negative) -> torch.Tensor:
    """How often an image scores its caption above the caption's hard negative (rows that have one)."""
    image, text, negatives = (nn.functional.normalize(x, dim=-1) for x in (image, text, negatives))
    wins = ((image * text).sum(-1) > (image * negatives).sum(-1))[has_negative]
    return wins.float().mean() if wins.numel() else torch.tensor(float("nan"))


class _DatasetWrapper:
    """Wraps an ImageTextDataset, forwarding everything but `collate` (which subclasses extend)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getattr__(self, name: str):  # anything else the trainer reads (records, ...) is the wrapped dataset's
        if name.startswith("__") or "dataset" not in self.__dict__:  # unpickling in a loader worker
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


class _HardNegativeDataset(_DatasetWrapper):
    """`collate` adds NegCLIP's `negative_tokens` (B, L), one hard negative of each sample's caption
    (`vlmkit.data.negatives.hard_negative`, drawn from the sample's own seed and epoch, so a resumed
    run draws the same ones), and `has_negative` (B,), False where none applies (its row of
    `negative_tokens` is the empty text, masked out of the loss)."""

    def __init__(self, dataset, kinds: tuple[str, ...]) -> None:
        super().__init__(dataset)
        self.kinds = kinds

    def collate(self, samples):
        from vlmkit.data.loader import task_rng
        from vlmkit.data.negatives import hard_negative

        batch = self.dataset.collate(samples)
        negatives = [hard_negative(text, task_rng(self.dataset.seed, self.dataset.epoch, int(index)), self.kinds)
                     for text, index in zip(batch["texts"], batch["indices"])]
        batch["has_negative"] = torch.tensor([negative is not None for negative in negatives], dtype=torch.bool)  # (B,)
        tokens = torch.as_tensor(self.dataset.tokenizer([negative or "" for negative in negatives] or [""]), dtype=torch.long)
        batch["negative_tokens"] = tokens[:len(negatives)]  # (B, L)
        return batch


class _LabelledDataset(_DatasetWrapper):
    """Wraps an ImageTextDataset so `collate` adds UniCL's `labels` (B,): one id per distinct record
    `label` (sorted, so every rank numbers them alike), and for a record without one an id of its own
    (number of labels + its index), which makes it a positive of its own caption only."""

    def __init__(self, dataset) -> None:
        super().__init__(dataset)
        names = sorted({str(record["label"]) for record in dataset.records if record.get("label") is not None})
        ids = {name: number for number, name in enumerate(names)}
        self.labels = [ids[str(record["label"])] if record.get("label") is not None else len(names) + index
                       for index, record in enumerate(dataset.records)]

    def collate(self, samples):
        batch = self.dataset.collate(samples)
        batch["labels"] = torch.tensor([self.labels[int(index)] for index in batch["indices"]], dtype=torch.long)  # (B,)
        return batch


# ---- named configurations ------------------------------------------------------------------
def _vit(image_size, patch_size, width, depth, heads, **extra):
    return {"type": "vit", "image_size": image_size, "patch_size": patch_size, "width": width, "depth": depth, "heads": heads, **extra}


def _text(width, depth, heads, **extra):
    return {"width": width, "depth": depth, "heads": heads, **extra}


register_config("clip-tiny", "clip", tiny=True, config={
    # The demo model: 64 px images, a tokenizer trained on the data (vocab set by the trainer).
    "embed_dim": 128,
    "vision": _vit(64, 8, 128, 4, 4),
    "text": _text(128, 3, 4, context_length=32, vocab_size=1024, eos_token_id=1023),
})
register_config("clip-vit-b-32", "clip", {
    "embed_dim": 512, "vision": _vit(224, 32, 768, 12, 12, activation="quick_gelu"),
    "text": _text(512, 12, 8, activation="quick_gelu"),
})
register_config("clip-vit-b-16", "clip", {
    "embed_dim": 512, "vision": _vit(224, 16, 768, 12, 12, activation="quick_gelu"),
    "text": _text(512, 12, 8, activation="quick_gelu"),
})
register_config("clip-vit-l-14", "clip", {
    "embed_dim": 768, "vision": _vit(224, 14, 1024, 24, 16, activation="quick_gelu"),
    "text": _text(768, 12, 12, activation="quick_gelu"),
})
register_config("clip-rn50", "clip", {
    "embed_dim": 1024,
    "vision": {"type": "resnet", "image_size": 224, "width": 64, "heads": 32, "resnet_layers": [3, 4, 6, 3]},
    "text": _text(512, 12, 8, activation="quick_gelu"),
})
register_config("clip-rn-tiny", "clip", tiny=True, config={
    "embed_dim": 128,
    "vision": {"type": "resnet", "image_size": 64, "width": 32, "heads": 4, "resnet_layers": [1, 1, 1, 1]},
    "text": _text(128, 3, 4, context_length=32, vocab_size=1024, eos_token_id=1023),
})
register_config("siglip-tiny", "clip", tiny=True, config={
    "embed_dim": 128, "loss": "sigmoid", "init_logit_scale": math.log(10),
    "vision": _vit(64, 8, 128, 4, 4),
    "text": _text(128, 3, 4, context_length=32, vocab_size=1024, eos_token_id=1023),
})
register_config("align-tiny", "clip", tiny=True, config={
    # ALIGN: a bidirectional BERT-like text tower pooled at [CLS] (its recipe sets label smoothing 0.1).
    "embed_dim": 128, "init_logit_scale": 0.0,
    "vision": _vit(64, 8, 128, 4, 4, conv_stem=[32]),
    "text": _text(128, 3, 4, context_length=32, vocab_size=1024, causal=False, pool="cls",
                  prenorm=False, embed_norm=True, type_vocab_size=2, eos_token_id=None),
})
