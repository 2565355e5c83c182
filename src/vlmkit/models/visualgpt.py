"""VisualGPT (Chen et al. 2022): a captioner whose decoder starts from a pretrained language model.

image -> ResNet grid + pooled vector -> Linear -> (B, N, D)
      -> encoder (L transformer layers); the output of every layer is one memory level (B, N, D) x L
caption [bos] w1 .. wn [eos] -> decoder = the blocks of a pretrained DecoderLM, and in each block,
between its self-attention and its MLP, encoder-decoder attention to every level joined to the
self-attention output `a` through the self-resurrecting activation unit (layers/srau.py):

    e_l = a + cross(norm(a), level_l)          (B, T, D), one cross-attention shared by the levels
    a'  = sum_l SRAU_l(a, e_l) / sqrt(L)       (the reference's meshed sum)
    x   = a' + MLP(norm(a'))

-> final norm -> LM head -> next-token loss on the caption.

The decoder is the `text` tower (`init_text: RUN` copies an `lm` run's weights in strictly, with its
tokenizer); the cross-attention and the gates are new. `gate: plain` replaces the SRAU by plain
residual cross-attention, `a' = a + mean_l cross(norm(a), level_l)`: the baseline of the paper's
data-efficiency claim (with no `init_text`, the same decoder from scratch). Differences from the
reference (Vision-CAIR/VisualGPT): the image side is a small CNN trained with the decoder instead of
detector region features, the encoder has no memory slots, and the stack is pre-norm, as the
library's LM is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.capabilities import Generates
from vlmkit.encoders.config import LMConfig, VisionConfig, build_vision_tower, lm_config_llama
from vlmkit.encoders.lm import DecoderLM, random_tokens
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig, left_padded_prompts
from vlmkit.layers.attention import Attention, KVCache
from vlmkit.layers.masks import causal_mask, combine, padding_mask, real_tokens_through_end
from vlmkit.layers.norm import make_norm
from vlmkit.layers.srau import PAPER_TAU, SelfResurrectingGate
from vlmkit.layers.transformer import Transformer
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family

GATES = ("srau", "plain")


@dataclass
class VisualGPTConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="resnet", width=16, heads=4, image_size=64))
    lm: LMConfig = field(default_factory=LMConfig)
    encoder_depth: int = 3  # memory levels: the reference's meshed-memory encoder has 3
    encoder_heads: int = 4
    gate: str = "srau"  # srau | plain (residual cross-attention, the baseline)
    tau: float = PAPER_TAU  # the SRAU threshold

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise UserError(f"gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not 0 <= self.tau < 0.5:
            raise UserError(f"tau must be in [0, 0.5) so that every channel keeps a gate open, got {self.tau}")
        if self.encoder_depth < 1:
            raise UserError(f"encoder_depth must be at least 1 (one memory level per encoder layer), got {self.encoder_depth}")
        if self.lm.width % self.encoder_heads:
            raise UserError(f"encoder_heads {self.encoder_heads} must divide lm.width {self.lm.width}")


@dataclass
class VisualGPTTraining:
    """The recipe's `training:` options of VisualGPT."""

    label_smoothing: float = 0.0


class EncoderDecoderFusion(nn.Module):
    """One decoder block's encoder-decoder attention over L memory levels, joined by SRAU or plainly."""

    def __init__(self, dim: int, heads: int, levels: int, gate: str, tau: float, norm: str, norm_eps: float) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, norm_eps)
        self.cross_attn = Attention(dim, heads, context_dim=dim)  # shared by the levels, as in the reference
        self.gates = nn.ModuleList(SelfResurrectingGate(dim, tau) for _ in range(levels)) if gate == "srau" else None
        self.levels = levels

    def forward(self, a: torch.Tensor, memory: list[torch.Tensor], cache: KVCache | None, name: str) -> torch.Tensor:
        """`a` (B, T, D): the block's state after self-attention; `memory`: L levels (B, N, D)."""
        query = self.norm(a)
        reads = [self.cross_attn(query, context=level, cache=cache.layer(f"{name}.level{index}.cross") if cache is not None else None)
                 for index, level in enumerate(memory)]  # L x (B, T, D)
        if self.gates is None:
            return a + torch.stack(reads).mean(dim=0)
        mixed = [gate(a, a + read) for gate, read in zip(self.gates, reads)]  # SRAU_l(a, e_l)
        return torch.stack(mixed).sum(dim=0) / math.sqrt(self.levels)  # (B, T, D)

    def sparsity(self) -> torch.Tensor | None:
        """Mean fraction of gate entries switched off in the last forward (None for plain fusion)."""
        if self.gates is None or self.gates[0].last_sparsity is None:
            return None
        return torch.stack([gate.last_sparsity for gate in self.gates]).mean()


@register_family
class VisualGPT(Generative, VLModel):
    family = "visualgpt"
    config_class = VisualGPTConfig
    capabilities = (Generates,)
    training_class = VisualGPTTraining
    towers = {"image": "visual", "text": "lm"}
    tower_configs = {"image": "vision", "text": "lm"}
    uses_every_parameter = True

    def __init__(self, config: VisualGPTConfig) -> None:
        super().__init__(config)
        lm = config.lm
        self.visual = build_vision_tower(config.vision, lm.width)
        self.visual_proj = nn.Linear(self.visual.width, lm.width)
        self.encoder = Transformer(lm.width, config.encoder_depth, config.encoder_heads, norm=lm.norm, norm_eps=lm.norm_eps)
        self.encoder_norm = make_norm(lm.norm, lm.width, lm.norm_eps)
        self.lm = DecoderLM.from_config(lm)
        self.fusion = nn.ModuleList(
            EncoderDecoderFusion(lm.width, lm.heads, config.encoder_depth, config.gate, config.tau, lm.norm, lm.norm_eps)
            for _ in range(lm.depth)
        )
        self.generation_config = GenerationConfig(max_new_tokens=20)

    def memory(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's memory levels: every encoder layer's output, normed. L x (B, 1+h*w, D)"""
        image = self.visual(pixels)
        tokens = torch.cat([image.pooled[:, None], self.visual_proj(image.tokens)], dim=1)  # (B, N, D)
        states = self.encoder(tokens, return_all=True)[1:]  # L x (B, N, D)
        return [self.encoder_norm(state) for state in states]

    def decode(self, tokens: torch.Tensor, memory: list[torch.Tensor], cache: KVCache | None = None,
               key_is_real: torch.Tensor | None = None, position_offset: int | torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of `tokens` (B, T) reading `memory`.

        Runs the LM's own blocks with the fusion between self-attention and MLP. `key_is_real`
        (B, K) hides left pads (K = cached + new positions); positions start at `position_offset`
        (default: the cached length).
        """
        lm = self.lm
        past = cache.length if cache is not None else 0
        offset = past if position_offset is None else position_offset
        x = lm.embed(tokens, offset)  # (B, T, D)
        rotary = lm.rotary(x.shape[1], offset, None, x.device)
        mask, is_causal = None, True
        if key_is_real is not None:  # SDPA takes a mask or is_causal: fold causality into the padding mask
            mask, is_causal = padding_mask(key_is_real), False
            if x.shape[1] > 1:
                mask = combine(causal_mask(x.shape[1], past + x.shape[1], device=x.device), mask)
        for index, (block, fusion) in enumerate(zip(lm.transformer.blocks, self.fusion)):
            self_cache = cache.layer(f"block{index}.self") if cache is not None else None
            a = block._residual(x, block.norm1, lambda h: block.attn(h, mask=mask, is_causal=is_causal, cache=self_cache,
                                                                      rotary=rotary), block.scale1)
            a = fusion(a, memory, cache, f"block{index}")
            x = block._residual(a, block.norm2, block.mlp, block.scale2)
        return lm.final_norm(x)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, L): [bos] caption [eos] pad...
        hidden = self.decode(tokens[:, :-1], self.memory(batch["pixels"]))  # (B, L-1, D)
        logits = self.lm.logits(hidden)  # (B, L-1, V)
        target_mask = real_tokens_through_end(tokens, self.config.lm.eos_token_id)[:, 1:]  # (B, L-1)
        loss, logs = lm_loss_and_logs(logits, tokens[:, 1:], target_mask, self.training_options.label_smoothing)
        sparsity = [s for s in (fusion.sparsity() for fusion in self.fusion) if s is not None]
        if sparsity:
            logs["gate_sparsity"] = torch.stack(sparsity).mean().detach()
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Memory once; a step decodes the new tokens (all of them without a cache)."""
        lm = self.config.lm
        memory = self.memory(pixels)  # L x (B, N, D)
        bos = self.tokenizer.bos_id
        if prompts is None:
            prompt_tokens, num_pad = torch.full((pixels.shape[0], 1), bos, dtype=torch.long, device=pixels.device), None
        else:
            prompt_tokens, num_pad = left_padded_prompts(self.tokenizer, prompts, bos, lm.pad_token_id, pixels.device)
            num_pad = num_pad if bool(num_pad.any()) else None

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            start = cache.length if cache is not None else 0
            key_is_real, offset = None, None
            if num_pad is not None:  # left-padded prompts: hide the pads, start positions at the first real token
                pads = num_pad.index_select(0, rows)  # (N,)
                key_is_real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= pads[:, None]
                offset = start - pads
            # Once cached, the memory keys/values come from the cache (already reordered for beams).
            step_memory = memory if start else [level.index_select(0, rows) for level in memory]
            hidden = self.decode(tokens[:, start:], step_memory, cache, key_is_real, offset)
            return self.lm.logits(hidden[:, -1])  # (N, V)

        return step, prompt_tokens

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, lm = self.config.vision, self.config.lm
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        end = lm.eos_token_id if lm.eos_token_id is not None else lm.vocab_size - 1
        tokens = random_tokens(lm.vocab_size, min(lm.context_length, 24), end, lm.pad_token_id, batch_size, generator)
        if lm.bos_token_id is not None:
            tokens[:, 0] = lm.bos_token_id
        return {"pixels": pixels, "tokens": tokens}


register_config("visualgpt-tiny", "visualgpt", tiny=True, config={
    # virtex-tiny's 64 px ResNet (a 2x2 grid + pooled vector), a 3-level encoder, and lm-tiny's decoder shape.
    "vision": {"type": "resnet", "image_size": 64, "width": 16, "heads": 4, "resnet_layers": [1, 1, 1, 1]},
    "lm": lm_config_llama(vocab_size=1024, context_length=128, width=128, depth=4, heads=4, kv_heads=2, mlp_hidden=344,
                          bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
    "encoder_depth": 3,
    "encoder_heads": 4,
})
