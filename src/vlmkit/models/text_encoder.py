"""A text-only encoder: a BERT-family tower (or any text tower) that embeds sentences.

tokens (B, L) -> text tower (bidirectional, padding-masked) -> pool (mean / [CLS] / eos) -> [proj] -> (B, D)

This is what a sentence-transformers model such as all-MiniLM-L6-v2 is: `embed_texts` gives its
normalised embeddings. It also serves as a pretrained text tower for LiT-style training (see
`vlmkit.interop.towers`). BERT's pooler (dense + tanh on [CLS]) is part of most BERT checkpoints:
with `pooler=True` it is kept as a real module, loaded like every other weight and exposed by
`pooler_output` (HF BertModel's `pooler_output`), but embeddings never use it, because
sentence-transformers' pooling does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.encoders.config import TextConfig, build_text_tower
from vlmkit.errors import UserError
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


def _bert_text() -> TextConfig:
    return TextConfig(causal=False, pool="mean", prenorm=False, embed_norm=True, type_vocab_size=2,
                      eos_token_id=None, norm_eps=1e-12, context_length=512)


@dataclass
class TextEncoderConfig:
    text: TextConfig = field(default_factory=_bert_text)
    embed_dim: int | None = None  # a projection after pooling; None = the pooled width as it is
    pooler: bool = False  # BERT's pooler (dense + tanh on [CLS]), kept so BERT checkpoints load whole


@register_family
class TextEncoder(VLModel):
    family = "text_encoder"
    config_class = TextEncoderConfig
    capabilities = frozenset({"embed_text"})

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
        raise UserError(
            "a text encoder is not trained on its own; use it as a CLIP text tower with the recipe key init_text "
            "(e.g. the shipped recipe: vlmkit train --recipe lit-minilm-tiny)"
        )


# all-MiniLM-L6-v2 / nreimers/MiniLM-L6-H384-uncased, the shape sentence-transformers popularised.
register_config("minilm-l6-h384", "text_encoder", {
    "text": {"vocab_size": 30522, "context_length": 512, "width": 384, "depth": 6, "heads": 12, "causal": False,
             "pool": "mean", "prenorm": False, "embed_norm": True, "type_vocab_size": 2, "eos_token_id": None,
             "norm_eps": 1e-12},
    "pooler": True,
})
