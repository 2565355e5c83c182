"""VirTex: a CNN encodes the image; a transformer decoder captions it, cross-attending to the grid.

image -> ResNet -> grid (B, h*w, C) and attention-pooled vector (B, D)
      -> context = [pooled ; Linear(grid)] (B, 1+h*w, D)
caption tokens [sot] w1 .. wn [eot] -> DecoderLM(cross-attention to context) -> next-token loss
(left to right; Desai & Johnson 2021 use label smoothing 0.1). VirTex's bidirectional
variant (a second, right-to-left decoder) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.capabilities import Generates
from vlmkit.encoders.config import TextConfig, VisionConfig, build_vision_tower
from vlmkit.encoders.lm import DecoderLM, random_tokens
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.generation import Generative, GenerationConfig, left_padded_prompts
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import padding_mask
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


@dataclass
class VirTexConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="resnet", width=64, heads=32))
    text: TextConfig = field(default_factory=lambda: TextConfig(width=512, depth=1, heads=8, context_length=30))
    cross_attention_every: int = 1  # a cross-attention sublayer in every N-th decoder block
    tie_embeddings: bool = True


@dataclass
class VirTexTraining:
    """The recipe's `training:` options of VirTex."""

    label_smoothing: float = 0.1  # Desai & Johnson 2021


@register_family
class VirTex(Generative, VLModel):
    family = "virtex"
    config_class = VirTexConfig
    capabilities = (Generates,)
    training_class = VirTexTraining
    towers = {"image": "visual"}

    def __init__(self, config: VirTexConfig) -> None:
        super().__init__(config)
        text = config.text
        self.visual = build_vision_tower(config.vision, text.width)
        self.visual_proj = nn.Linear(self.visual.width, text.width)
        self.decoder = DecoderLM(
            text.vocab_size, text.context_length, text.width, text.depth, text.heads, mlp_ratio=text.mlp_ratio,
            activation=text.activation, context_dim=text.width, cross_attention_every=config.cross_attention_every,
            tie_embeddings=config.tie_embeddings, norm_eps=text.norm_eps, dropout=text.dropout,
        )
        self.generation_config = GenerationConfig(max_new_tokens=20)  # caption length limit of generate()

    def image_context(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tokens the decoder cross-attends to: pooled vector + projected grid. (B, 1+h*w, D)"""
        image = self.visual(pixels)
        return torch.cat([image.pooled[:, None], self.visual_proj(image.tokens)], dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, L): [sot] caption [eot] pad...
        context = self.image_context(batch["pixels"])  # (B, N, D)
        logits = self.decoder(tokens[:, :-1], context=context)  # (B, L-1, V)
        targets = tokens[:, 1:]  # (B, L-1)
        target_mask = real_tokens_through_end(tokens, self.config.text.eos_token_id)[:, 1:]  # up to [eot]
        loss, logs = lm_loss_and_logs(logits, targets, target_mask, self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        tokens = random_tokens(text.vocab_size, text.context_length, text.eos_token_id, text.pad_token_id, batch_size, generator)
        return {"pixels": pixels, "tokens": tokens}

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Image context once; a step runs the decoder on the new tokens (all of them without a cache)."""
        text = self.config.text
        context = self.image_context(pixels)  # (B, N, D)
        bos = self.tokenizer.bos_id
        if prompts is None:
            prompt_tokens = torch.full((pixels.shape[0], 1), bos, dtype=torch.long, device=pixels.device)
            num_pad = None
        else:
            prompt_tokens, num_pad = left_padded_prompts(self.tokenizer, prompts, bos, text.pad_token_id, pixels.device)
            num_pad = num_pad if bool(num_pad.any()) else None

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            start = cache.length if cache is not None else 0
            mask, offset = None, None
            if num_pad is not None:  # left-padded prompts: hide the pads, start positions at the first real token
                pads = num_pad.index_select(0, rows)  # (N,)
                key_is_real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= pads[:, None]
                mask, offset = padding_mask(key_is_real), start - pads
            # Once cached, the image keys/values come from the cache (already reordered for beams).
            step_context = context if start else context.index_select(0, rows)
            logits = self.decoder(tokens[:, start:], context=step_context, mask=mask, cache=cache, position_offset=offset)
            return logits[:, -1]  # (N, V)

        return step, prompt_tokens


register_config("virtex-tiny", "virtex", tiny=True, config={
    # 64 px images -> a 2x2 ResNet grid (512 channels) + the pooled vector; a 2-block decoder of width 128.
    "vision": {"type": "resnet", "image_size": 64, "width": 16, "heads": 4, "resnet_layers": [1, 1, 1, 1]},
    "text": {"width": 128, "depth": 2, "heads": 4, "context_length": 32, "vocab_size": 1024, "eos_token_id": 1023},
})
register_config("virtex-r50", "virtex", {
    # The paper's model: ResNet-50 and a 1-layer, 2048-wide decoder (VirTex's best setting uses 1x2048).
    "vision": {"type": "resnet", "image_size": 224, "width": 64, "heads": 32, "resnet_layers": [3, 4, 6, 3]},
    "text": {"width": 2048, "depth": 1, "heads": 32, "context_length": 30, "vocab_size": 10000, "eos_token_id": 9999},
})
