"""The self-resurrecting activation unit (SRAU) of VisualGPT (Chen et al. 2022).

A decoder that starts from a pretrained language model should keep its language knowledge where
the image adds nothing. The SRAU mixes, channel by channel, the decoder's own (linguistic) state
`language` (B, T, D) with what encoder-decoder attention read from the image, `visual` (B, T, D):

    B     = sigmoid(W [language ; visual] + b)           (B, T, D), W: Linear(2D -> D)
    B_vis = B       * 1[B > tau]                          the visual gate
    B_lan = (1 - B) * 1[(1 - B) > tau]                    the linguistic gate
    out   = B_vis * visual + B_lan * language

The thresholds make the gates sparse: a channel whose gate falls to tau or below is switched off
exactly (zero, not small), yet it can come back ("resurrect") at the next token or the next update,
because the gate still depends on its inputs and W keeps learning through the channels left on. With
tau < 0.5 at least one gate of every channel stays on (B <= tau implies 1 - B > tau). The paper's
ablation picks tau = 0.2; tau = 0 makes the unit a plain sigmoid interpolation.

The reference code (Vision-CAIR/VisualGPT, gpt_decoder_visualGPT.py) calls its sigmoid `alpha` and
lets `alpha` weigh the linguistic side; the paper, and this module, let `B` weigh the visual side.
The two are the same family of functions (the learned W and b flip sign), so nothing else changes.
"""
from __future__ import annotations

import torch
from torch import nn

PAPER_TAU = 0.2  # the paper's choice (the reference code's --tau defaults to 0, its README example is 0.2)


def srau_gates(gate: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(visual gate, linguistic gate) of sigmoid values `gate` (any shape): each zeroed at or below `tau`."""
    visual = gate * (gate > tau).to(gate.dtype)
    linguistic = (1 - gate) * ((1 - gate) > tau).to(gate.dtype)
    return visual, linguistic


class SelfResurrectingGate(nn.Module):
    """The SRAU of one encoder level: `forward(language, visual)` mixes the two (B, T, D) states.

    `last_sparsity` holds, after each forward, the fraction of gate entries (visual and linguistic
    together) that the thresholds switched off, detached, for logging.
    """

    def __init__(self, dim: int, tau: float = PAPER_TAU) -> None:
        super().__init__()
        if not 0 <= tau < 1:
            raise ValueError(f"the SRAU threshold tau must be in [0, 1), got {tau}")
        self.tau = tau
        self.fc = nn.Linear(2 * dim, dim)
        self.last_sparsity: torch.Tensor | None = None

    def forward(self, language: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(torch.cat([language, visual], dim=-1)))  # (B, T, D)
        visual_gate, linguistic_gate = srau_gates(gate, self.tau)
        with torch.no_grad():
            self.last_sparsity = ((visual_gate == 0).float().mean() + (linguistic_gate == 0).float().mean()) / 2
        return visual_gate * visual + linguistic_gate * language  # (B, T, D)
