"""Reading where two named things are relative to each other, for spatial-relation questions.

"Is the red circle left of the blue square?" is answered by the sign of one coordinate of the
offset between the two named objects *and* by which word was asked; with the question asked in
its true or mirrored form at random, neither alone says anything (an XOR), so a model whose
pooled feature must assemble both through attention gets no gradient until everything is in
place. This readout makes each part a direct, separately supervised step:

1. two attention slots over the text tokens pick the "first" and the "second" named object and
   average the image positions the tokens point at (`layers/pointer.py`):
   offset = p_first - p_second, (B, 2), trainable with an L1 loss to the true offset;
2. the question is a bag of learned word vectors (a dedicated embedding: the contextual token
   features carry *which* relation word was asked only weakly, since no other objective needs it);
3. the two meet in a low-rank bilinear product (MLB, Kim et al., 2017),
   out(words ⊙ tanh(embed(offset))), in which "left of and offset x < 0" is linear.
"""
from __future__ import annotations

import torch
from torch import nn

from vlmkit.layers.mlp import MLP


class OffsetReadout(nn.Module):
    """tokens (B, L, D), points (B, L, 2), token ids (B, L), real (B, L) bool -> feature (B, D), offset (B, 2)."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.slots = nn.Linear(dim, 2)  # attention logits of the first and the second named object
        self.offset_embed = MLP(2, dim, out_dim=dim)
        self.words = nn.Embedding(vocab_size, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, points: torch.Tensor, token_ids: torch.Tensor,
                real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slots(tokens).masked_fill(~real[..., None], float("-inf")).softmax(1)  # (B, L, 2)
        located = slots.transpose(1, 2) @ points  # (B, 2 slots, 2 coordinates)
        offset = located[:, 0] - located[:, 1]  # (B, 2): first minus second, x right and y down
        words = (self.words(token_ids) * real[..., None]).sum(1)  # (B, D)
        return self.out(words * torch.tanh(self.offset_embed(offset))), offset  # (B, D), (B, 2)
