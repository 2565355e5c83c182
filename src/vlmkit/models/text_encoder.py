"""A text-only encoder: a BERT-family tower (or any text tower) that embeds sentences.

tokens (B, L) -> text tower (bidirectional, padding-masked) -> pool (mean / [CLS] / eos) -> [proj] -> (B, D)

This is what a sentence-transformers model such as all-MiniLM-L6-v2 is: `embed_texts` gives its
normalised embeddings. Trained on its own, it learns sentence embeddings the way
sentence-transformers' MultipleNegativesRankingLoss does: two captions of the same image are a
positive pair, every other caption in the batch a negative, InfoNCE at a fixed scale of 20
(symmetric here). It also serves as a pretrained text tower for LiT-style training (see
`vlmkit.interop.towers`). BERT's pooler (dense + tanh on [CLS]) is part of most BERT checkpoints:
with `pooler=True` it is kept as a real module, loaded like every other weight and exposed by
`pooler_output` (HF BertModel's `pooler_output`), but embeddings never use it, because
sentence-transformers' pooling does not.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.capabilities import EmbedsTexts
from vlmkit.encoders.config import TextConfig, build_text_tower
from vlmkit.errors import UserError
from vlmkit.losses import contrastive_loss, matching_accuracy
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


def _bert_text() -> TextConfig:
    return TextConfig(causal=False, pool="mean", prenorm=False, embed_norm=True, type_vocab_size=2,
                      eos_token_id=None, norm_eps=1e-12, context_length=512)


@dataclass
class TextEncoderConfig:
    text: TextConfig = field(default_factory=_bert_text)
    embed_dim: int | None = None  # a projection after pooling; None = the pooled width as it is
    pooler: bool = False  # BERT's pooler (dense + tanh on [CLS]), kept so BERT checkpoints load whole


@dataclass
class TextEncoderTraining:
    """The recipe's `training:` options of a sentence encoder."""

    scale: float = 20.0  # the fixed similarity scale of sentence-transformers' MultipleNegativesRankingLoss


class CaptionPairs(torch.utils.data.Dataset):
    """Two different captions of one record per sample (records with at least two captions).

    The pair of sample `index` at an epoch is drawn from its own seeded generator, so a resumed
    run sees the same pairs. `collate` gives `tokens` and `pair_tokens`, both (B, L).
    """

    def __init__(self, records, tokenizer, seed: int = 0):
        self.records = [record for record in records if len(record.get("texts") or []) >= 2]
        if not self.records:
            raise UserError("no training record has two or more captions ('texts'), which a text encoder trains on as pairs")
        self.tokenizer, self.seed, self.epoch = tokenizer, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[str, str]:
        rng = random.Random(f"vlmkit-pairs:{self.seed}:{self.epoch}:{index}")
        first, second = rng.sample(self.records[index]["texts"], 2)
        return first, second

    def collate(self, pairs) -> dict:
        return {"tokens": self.tokenizer([a for a, _ in pairs]), "pair_tokens": self.tokenizer([b for _, b in pairs]),
                "num_skipped": 0, "skipped": []}


@register_family
class TextEncoder(VLModel):
    family = "text_encoder"
    config_class = TextEncoderConfig
    capabilities = (EmbedsTexts,)
    training_class = TextEncoderTraining
    towers = {"text": "text"}
    export_formats = {"hf": "vlmkit.interop.bert:export"}

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config)
        self.text = build_text_tower(config.text, config.embed_dim)
        self.pooler = nn.Linear(config.text.width, config.text.width) if config.pooler else None

    def _trim(self, tokens: torch.Tensor) -> torch.Tensor:
        # A bidirectional tower masks padding out of attention and pooling, so trailing columns
        # that are padding in every row change nothing: drop them (texts are padded to 256-512).
        if self.text.causal:
            return tokens
        real = self.text.real_tokens(tokens).any(dim=0)  # (L,)
        length = int(real.nonzero().max()) + 1 if real.any() else 1
        return tokens[:, :length]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) sentence embeddings (not L2-normalised)."""
        return self.text(self._trim(tokens)).pooled

    def pooler_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """HF BertModel's `pooler_output`: tanh(dense(hidden state at [CLS])). (B, W)"""
        if self.pooler is None:
            raise UserError("this text encoder has no pooler weights; load a BERT checkpoint that has 'pooler.dense'")
        return torch.tanh(self.pooler(self.text(self._trim(tokens)).tokens[:, 0]))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        first = self.encode_text(batch["tokens"])  # (B, D)
        second = self.encode_text(batch["pair_tokens"])  # (B, D)
        scale = torch.tensor(math.log(self.training_options.scale), device=first.device)
        loss, logits = contrastive_loss(first, second, scale, local_loss=True)
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, pair_acc=matching_accuracy(logits)))

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        return CaptionPairs(records, tokenizer, seed=seed)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        text = self.config.text
        tokens = torch.randint(1, text.vocab_size, (2 * batch_size, min(text.context_length, 16)), generator=generator)
        tokens[1::2, 10:] = text.pad_token_id  # some padded rows
        return {"tokens": tokens[:batch_size], "pair_tokens": tokens[batch_size:]}


# all-MiniLM-L6-v2 / nreimers/MiniLM-L6-H384-uncased, the shape sentence-transformers popularised.
register_config("minilm-l6-h384", "text_encoder", {
    "text": {"vocab_size": 30522, "context_length": 512, "width": 384, "depth": 6, "heads": 12, "causal": False,
             "pool": "mean", "prenorm": False, "embed_norm": True, "type_vocab_size": 2, "eos_token_id": None,
             "norm_eps": 1e-12},
    "pooler": True,
})
register_config("text-encoder-tiny", "text_encoder", tiny=True, config={
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 2, "heads": 4, "causal": False,
             "pool": "mean", "prenorm": False, "embed_norm": True, "type_vocab_size": 2, "eos_token_id": None},
})
