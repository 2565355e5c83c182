"""Normalisation layers: LayerNorm (torch's) and Llama's RMSNorm, chosen per stack by name."""
from __future__ import annotations

import torch
from torch import nn

NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, exactly as HF's LlamaRMSNorm computes it.

    The mean of squares is taken in float32 whatever the input dtype (bf16 squares lose too much),
    and the gain multiplies the normalised input cast back to that dtype: `weight * x.to(dtype)`.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A "layernorm" (with bias) or "rmsnorm" (gain only) over the last `dim` features."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'; use one of {', '.join(NORMS)}")
