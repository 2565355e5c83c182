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
            loss, logits = contrastive_loss(
                image, text, self.logit_scale, local_loss=options.local_loss, label_smoothing=options.label_smoothing
            )
        logs = detached_logs(loss=loss, i2t_acc=matching_accuracy(logits), logit_scale=self.logit_scale.exp())
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
        """The image-caption dataset; with `loss: unicl` each batch also carries `labels` (B,) class ids."""
        dataset = super().training_dataset(records, transform, tokenizer, seed=seed, caption=caption)
        return _LabelledDataset(dataset) if self.config.loss == "unicl" else dataset

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.config.max_logit_scale)


class _LabelledDataset:
    """Wraps an ImageTextDataset so `collate` adds UniCL's `labels` (B,): one id per distinct record
    `label` (sorted, so every rank numbers them alike), and for a record without one an id of its own
    (number of labels + its index), which makes it a positive of its own caption only."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        names = sorted({str(record["label"]) for record in dataset.records if record.get("label") is not None})
        ids = {name: number for number, name in enumerate(names)}
        self.labels = [ids[str(record["label"])] if record.get("label") is not None else len(names) + index
                       for index, record in enumerate(dataset.records)]

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
