"""ASIF (Norelli et al. 2023): a dual encoder made of two encoders never trained together, with no training.

image -> image encoder -> cosine to the N anchor images   -> top-k, ^p, L2-normalise -> (B, N)
text  -> text encoder  -> cosine to the N anchor captions -> top-k, ^p, L2-normalise -> (B, N)
An anchor set of N image-caption pairs puts both modalities in one space: the coordinates of an
image are its similarities to the anchor images, those of a text its similarities to the paired
anchor captions, so image @ text.T compares "which anchors does each resemble". Defaults are the
reference code's (noranta4/ASIF relreps.py): keep the k = 800 largest similarities (`non_zeros`)
and raise them to p = 8 (`val_exp`). Negative similarities are clamped to 0 before the power (an
even power would otherwise turn a dissimilar anchor into a similar one; with the paper's 1.6M
anchors the kept top-k are all positive anyway).

The two encoders are whole vlmkit models (any family with `encode_image`, any with `encode_text`)
stored inside this model, with the anchor embeddings as buffers, so one folder (config.json +
model.safetensors + the text encoder's tokenizer + the image encoder's preprocessing) loads with
`vlmkit.load`. `vlmkit asif build` (models/_asif_cli.py) writes it. There is nothing to train:
`trainable = False` and `forward` refuses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.capabilities import EmbedsImages, EmbedsTexts
from vlmkit.config import bounded
from vlmkit.errors import UserError
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import build_model, named_config, register_config, register_family

DEFAULT_K = 800  # relreps.py `non_zeros`
DEFAULT_P = 8.0  # relreps.py `val_exp` / the paper's p


@dataclass
class ASIFConfig:
    # Each encoder as {"family": ..., "config": {...}}: what its own config.json holds.
    image_encoder: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    num_anchors: int = bounded(1, low=1)
    image_dim: int = bounded(1, low=1)  # the image encoder's embedding width
    text_dim: int = bounded(1, low=1)
    k: int = bounded(DEFAULT_K, low=1)  # similarities kept per row (the rest set to 0)
    p: float = bounded(DEFAULT_P, low=0, low_open=True)  # power the kept similarities are raised to

    def __post_init__(self) -> None:
        for role in ("image_encoder", "text_encoder"):
            value = getattr(self, role)
            if not isinstance(value, dict) or "family" not in value or "config" not in value:
                raise UserError(f"ASIF config '{role}' must be an encoder's config.json contents "
                                f"({{'family': ..., 'config': {{...}}}}); rebuild the folder with 'vlmkit asif build'")


def relative_representation(embeddings: torch.Tensor, anchors: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """ASIF's representation of (B, D) embeddings against (N, D) anchors: (B, N) L2-normalised rows.

    Cosine similarities to every anchor, only the k largest kept (k capped at N), clamped at 0,
    raised to the power p, then each row L2-normalised (a row with no positive similarity is 0).
    """
    similarity = F.normalize(embeddings.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).T  # (B, N)
    values, indices = similarity.topk(min(k, similarity.shape[1]), dim=-1)  # (B, k)
    sparse = torch.zeros_like(similarity).scatter_(1, indices, values.clamp(min=0) ** p)  # (B, N)
    return F.normalize(sparse, dim=-1)


@register_family
class ASIF(VLModel):
    family = "asif"
    config_class = ASIFConfig
    capabilities = (EmbedsImages, EmbedsTexts)
    trainable = False
    tower_configs = {}  # its encoders are whole models (image_encoder / text_encoder), not tower sections

    def __init__(self, config: ASIFConfig) -> None:
        super().__init__(config)
        self.image_encoder = build_model(config.image_encoder["family"], config.image_encoder["config"])
        self.text_encoder = build_model(config.text_encoder["family"], config.text_encoder["config"])
        for role, encoder, capability in (("image", self.image_encoder, EmbedsImages), ("text", self.text_encoder, EmbedsTexts)):
            encoder.require(capability, task=f"ASIF's {role} encoder")
        self.requires_grad_(False)
        # Unit-norm anchor embeddings, replaced by `vlmkit asif build` (`set_anchors`); random until then,
        # like the weights of any freshly created model.
        self.register_buffer("anchor_images", F.normalize(torch.randn(config.num_anchors, config.image_dim), dim=-1))
        self.register_buffer("anchor_texts", F.normalize(torch.randn(config.num_anchors, config.text_dim), dim=-1))

    @classmethod
    def from_pretrained(cls, directory) -> "ASIF":
        """Load the folder, then copy each weight into freshly allocated memory: tensors read from
        safetensors sit at the file's byte offsets, and a matmul on an unaligned buffer can round
        differently (1 ulp) from the same weights in aligned memory, so the loaded model would not
        give exactly the embeddings of the one that was saved."""
        model = super().from_pretrained(directory)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    def set_anchors(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Store (N, D_image) anchor image and (N, D_text) anchor caption embeddings (normalised here)."""
        if images.shape != self.anchor_images.shape or texts.shape != self.anchor_texts.shape:
            raise ValueError(f"anchors of shapes {tuple(images.shape)} / {tuple(texts.shape)} do not fit the config "
                             f"({tuple(self.anchor_images.shape)} / {tuple(self.anchor_texts.shape)})")
        self.anchor_images = F.normalize(images.float(), dim=-1).to(self.anchor_images.device)
        self.anchor_texts = F.normalize(texts.float(), dim=-1).to(self.anchor_texts.device)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels (the image encoder's preprocessing) -> (B, N) similarities to the anchor images."""
        embeddings = self.image_encoder.encode_image(pixels)  # (B, D_image)
        return relative_representation(embeddings, self.anchor_images, self.config.k, self.config.p)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens (the text encoder's tokenizer) -> (B, N) similarities to the anchor captions."""
        embeddings = self.text_encoder.encode_text(tokens)  # (B, D_text)
        return relative_representation(embeddings, self.anchor_texts, self.config.k, self.config.p)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        raise UserError("ASIF is training-free and has no loss to train; build one with 'vlmkit asif build' "
                        "from two trained encoders and an anchor set")

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        pixels = self.image_encoder.dummy_batch(batch_size, seed)["pixels"]
        tokens = self.text_encoder.dummy_batch(batch_size, seed)["tokens"].clone()
        pad = self.text_encoder.config.text.pad_token_id if hasattr(self.text_encoder.config, "text") else None
        if pad is not None:
            tokens[:, 10:] = pad  # texts of at most 10 tokens, as a dual encoder's dummy batch has
        return {"pixels": pixels, "tokens": tokens}


def _encoder(name: str) -> dict[str, Any]:
    family, config = named_config(name)
    return {"family": family, "config": config}


# A CLIP-shaped image encoder and a BERT-shaped text encoder with random anchors: the registry-wide
# tests' configuration.
register_config("asif-tiny", "asif", tiny=True, config={
    "image_encoder": _encoder("clip-tiny"), "text_encoder": _encoder("text-encoder-tiny"),
    "num_anchors": 16, "image_dim": 128, "text_dim": 128, "k": 8,
})


def build_asif(image_encoder: str, text_encoder: str, anchors: str, out: str, k: int = DEFAULT_K, p: float = DEFAULT_P,
               num_anchors: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Write an ASIF model folder at `out` from two model folders and an anchor dataset; returns a summary.

    `image_encoder` is any model folder `vlmkit.load` reads whose family embeds images, `text_encoder`
    one that embeds texts (a vlmkit run, an HF BERT / sentence-transformers folder, ...). Each anchor
    is a record of `anchors` (JSONL/CSV/...) with its image and its first caption; unreadable images
    are skipped and counted; `num_anchors` keeps the first N usable ones. Fewer usable anchors than
    `k` is an error (the representation keeps k of them). The folder is written next to `out` and
    renamed into place, so a failure leaves nothing behind.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import vlmkit
    from vlmkit.data.formats import CorruptImage, load_image, read_records

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {target} already exists and is not empty; choose a new folder")
    if num_anchors is not None and num_anchors < 1:
        raise UserError(f"--num-anchors must be at least 1, got {num_anchors}")
    image_model, text_model = vlmkit.load(image_encoder), vlmkit.load(text_encoder)
    image_model.require(EmbedsImages, task="an ASIF image encoder (--image-encoder)")
    text_model.require(EmbedsTexts, task="an ASIF text encoder (--text-encoder)")
    for role, model, needed in (("--image-encoder", image_model, "transform"), ("--text-encoder", text_model, "tokenizer")):
        if getattr(model, needed) is None:
            raise UserError(f"{role} {image_encoder if role == '--image-encoder' else text_encoder} has no {needed} saved "
                            f"with it; give a folder written by 'vlmkit train' or a complete HF folder")
    images, captions, skipped = [], [], 0
    for record in read_records(anchors):
        if num_anchors is not None and len(images) >= num_anchors:
            break
        try:
            image = load_image(record["image"])
        except CorruptImage:
            skipped += 1
            continue
        images.append(image)
        captions.append(record["texts"][0])
    if len(images) < k:
        raise UserError(f"{anchors} gives {len(images)} usable anchor pair(s) ({skipped} unreadable image(s) skipped), fewer "
                        f"than k = {k} similarities kept per row; give more anchors or a smaller --k")
    anchor_images = image_model.embed_images(images, batch_size=batch_size)  # (N, D_image), normalised
    anchor_texts = text_model.embed_texts(captions, batch_size=batch_size)  # (N, D_text), normalised
    config = ASIFConfig(image_encoder=image_model.config_dict(), text_encoder=text_model.config_dict(),
                        num_anchors=len(images), image_dim=anchor_images.shape[1], text_dim=anchor_texts.shape[1], k=k, p=p)
    with torch.device("meta"):  # the encoders' weights come from the loaded models, not a random init
        model = ASIF(config)
    model.image_encoder, model.text_encoder = image_model.cpu(), text_model.cpu()
    model.image_encoder.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.anchor_images, model.anchor_texts = torch.empty_like(anchor_images), torch.empty_like(anchor_texts)
    model.set_anchors(anchor_images, anchor_texts)
    model.tokenizer, model.transform = text_model.tokenizer, image_model.transform
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out": str(target), "anchors": len(images), "skipped_images": skipped, "k": k, "p": p,
            "image_encoder": image_model.family, "text_encoder": text_model.family}
