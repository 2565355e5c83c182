"""Feed-forward blocks and activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        from vlmkit.errors import UserError

        raise UserError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Linear -> activation -> Linear, the transformer feed-forward block.

    `gated=True` is the GLU variant (SwiGLU with "silu", Llama): fc2(act(gate) * up), where one
    fused `fc1` of 2 * hidden outputs gives [gate; up] (one matmul instead of two).
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", out_dim: int | None = None, bias: bool = True,
                 gated: bool = False):
        super().__init__()
        self.gated = gated
        self.fc1 = nn.Linear(dim, 2 * hidden_dim if gated else hidden_dim, bias=bias)
        if gated:  # LoRA targets "mlp.fc1:gate,up" find their rows
            self.fc1.lora_slices = {"gate": (0, hidden_dim), "up": (hidden_dim, 2 * hidden_dim)}
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.fc1(x).chunk(2, dim=-1)  # (..., hidden) x 2
            return self.fc2(self.act(gate) * up)
        return self.fc2(self.act(self.fc1(x)))


class BertLMHead(nn.Module):
    """BERT's prediction head: dense -> activation -> LayerNorm -> the token embedding (tied) + a bias."""

    def __init__(self, width: int, vocab_size: int, activation: str, norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.activation = make_activation(activation)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.activation(self.dense(hidden))), embedding, self.bias)  # (B, T, V)
