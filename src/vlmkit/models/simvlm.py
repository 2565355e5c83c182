"""SimVLM: one transformer over [image patches ; prefix text ; suffix text] trained as a PrefixLM.

image -> conv stem + patchify (the hybrid ViT, here with few or no blocks of its own) -> (B, N, D)
prefix tokens (B, P) and suffix tokens (B, S) -> token embeddings + text positions
x = [image ; prefix ; suffix] (B, N+P+S, D) -> Transformer with the PrefixLM mask:
    bidirectional over image + prefix, causal over the suffix, padding keys hidden
-> LM loss on the suffix only.

The prefix always has `prefix_length` slots (padded), so suffix positions do not depend on the
prompt's length. Training mixes captions (empty prefix, or a caption split at a random word
with probability `prefix_split`, SimVLM's PrefixLM pretraining) with question -> answer pairs
(`qa_fraction` of the samples whose record has questions). Captioning is generation with an
empty prefix; VQA is generation with the question as the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.encoders.config import TextConfig, VisionConfig, build_vision_tower
from vlmkit.encoders.lm import random_tokens
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import combine, padding_mask, prefix_lm_mask
from vlmkit.layers.transformer import TokenTransformer
from vlmkit.losses import lm_output
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


@dataclass
class SimVLMConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(patch_size=16, width=768, depth=0, conv_stem=(64, 128, 256)))
    text: TextConfig = field(default_factory=lambda: TextConfig(width=768, depth=12, heads=12, context_length=32))
    prefix_length: int = 16  # prompt slots (question or caption prefix), padded
    qa_fraction: float = 0.5  # training: share of samples that are question -> answer (records with `qa`)
    prefix_split: float = 0.0  # training: share of captions split into prefix + suffix at a random word
    label_smoothing: float = 0.0
    max_new_tokens: int = 20


def empty_prefix(batch: int, config: SimVLMConfig, device=None) -> torch.Tensor:
    """The "no prompt" prefix: a lone end token then padding. (B, P)"""
    prefix = torch.full((batch, config.prefix_length), config.text.pad_token_id, dtype=torch.long, device=device)
    prefix[:, 0] = config.text.eos_token_id
    return prefix


@register_family
class SimVLM(Generative, VLModel):
    family = "simvlm"
    config_class = SimVLMConfig
    capabilities = frozenset({"generate", "answer"})

    def __init__(self, config: SimVLMConfig) -> None:
        super().__init__(config)
        text = config.text
        self.visual = build_vision_tower(config.vision, None)
        self.image_proj = nn.Linear(config.vision.width, text.width)
        # Text positions count from the first prefix slot: prefix at 0..P-1, suffix from P on. Tied LM head.
        self.lm = TokenTransformer(text.vocab_size, config.prefix_length + text.context_length, text.width, text.depth,
                                   text.heads, mlp_ratio=text.mlp_ratio, activation=text.activation,
                                   norm_eps=text.norm_eps, dropout=text.dropout)
        self.default_generation = GenerationConfig(max_new_tokens=config.max_new_tokens)

    # ---- pieces ------------------------------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Conv-stem patches (and the ViT's own blocks, if any), projected to the text width. (B, N, D)"""
        return self.image_proj(self.visual.norm_post(self.visual(pixels).tokens))

    def attention_mask(self, num_image: int, prefix_is_real: torch.Tensor, suffix_length: int) -> torch.Tensor:
        """PrefixLM mask over [image ; prefix ; suffix]: (B, 1, L, L), True = may attend.

        Query i may see key j iff key j is not prefix padding and (j is in image+prefix or j <= i).
        """
        batch, prefix_length = prefix_is_real.shape
        length = num_image + prefix_length + suffix_length
        key_is_real = torch.cat([
            torch.ones(batch, num_image, dtype=torch.bool, device=prefix_is_real.device),
            prefix_is_real,
            torch.ones(batch, suffix_length, dtype=torch.bool, device=prefix_is_real.device),
        ], dim=1)  # (B, L)
        prefix_lengths = torch.full((batch,), num_image + prefix_length, device=prefix_is_real.device)
        return combine(prefix_lm_mask(prefix_lengths, length), padding_mask(key_is_real))

    def prefix_is_real(self, prefix: torch.Tensor) -> torch.Tensor:
        return real_tokens_through_end(prefix, self.config.text.eos_token_id)  # (B, P)

    # ---- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pixels, suffix = batch["pixels"], batch["tokens"]  # (B, 3, H, W), (B, S): [sot] text [eot] pad
        prefix = batch.get("prefix_tokens")  # (B, P) or None = no prompt
        if prefix is None:
            prefix = empty_prefix(pixels.shape[0], self.config, pixels.device)
        image = self.image_tokens(pixels)  # (B, N, D)
        P = self.config.prefix_length
        text = torch.cat([prefix, suffix[:, :-1]], dim=1)  # (B, P+S-1): the prefix fills its P slots, the suffix follows
        mask = self.attention_mask(image.shape[1], self.prefix_is_real(prefix), suffix.shape[1] - 1)  # (B, 1, L, L)
        hidden = self.lm(text, prefix_embeds=image, mask=mask)  # (B, L, D), L = N+P+S-1
        logits = self.lm.logits(hidden[:, image.shape[1] + P :])  # (B, S-1, V): suffix positions only
        targets = suffix[:, 1:]
        target_mask = real_tokens_through_end(suffix, self.config.text.eos_token_id)[:, 1:]
        return lm_output(logits, targets, target_mask, self.config.label_smoothing)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random suffixes; every other row also has a random (padded) prefix, the others none."""
        generator = torch.Generator().manual_seed(seed)
        config, text = self.config, self.config.text
        pixels = torch.randn(batch_size, 3, config.vision.image_size, config.vision.image_size, generator=generator)
        tokens = random_tokens(text.vocab_size, text.context_length, text.eos_token_id, text.pad_token_id, batch_size, generator)
        prefix = random_tokens(text.vocab_size, config.prefix_length, text.eos_token_id, text.pad_token_id, batch_size, generator)
        prefix[1::2] = empty_prefix(batch_size, config)[1::2]
        return {"pixels": pixels, "tokens": tokens, "prefix_tokens": prefix}

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        from vlmkit.data.task_datasets import PrefixDataset

        records = [record for record in records if record.get("texts") or record.get("qa")]
        if not records:
            raise UserError("no training record has captions ('texts') or questions ('qa') for SimVLM")
        return PrefixDataset(records, transform, tokenizer, self.config, seed=seed, caption=caption)

    @classmethod
    def tokenizer_texts(cls, records):
        from vlmkit.data.task_datasets import record_texts

        return record_texts(records, questions=True)

    # ---- generation --------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str] | None, batch: int, device) -> torch.Tensor:
        if prompts is None:
            return empty_prefix(batch, self.config, device)
        return self.tokenizer(prompts, context_length=self.config.prefix_length).to(device)

    def max_new_tokens_allowed(self, prompt_tokens: torch.Tensor) -> int:
        return self.config.text.context_length - 1  # suffix slots after [sot]; the prefix has its own

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """The prefix (image + prompt) is encoded in the first step; later steps add suffix tokens."""
        image = self.image_tokens(pixels)  # (B, N, D)
        prefix = self.encode_prompts(prompts, pixels.shape[0], pixels.device)  # (B, P)
        prefix_real = self.prefix_is_real(prefix)
        num_image, P = image.shape[1], self.config.prefix_length
        start_tokens = torch.full((pixels.shape[0], 1), self.tokenizer.bos_id, dtype=torch.long, device=pixels.device)

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            done = 0 if cache is None or cache.length == 0 else cache.length - num_image - P  # suffix tokens cached
            if done == 0:  # the whole sequence, with the training mask
                text = torch.cat([prefix.index_select(0, rows), tokens], dim=1)  # (N, P+T)
                mask = self.attention_mask(num_image, prefix_real.index_select(0, rows), tokens.shape[1])
                hidden = self.lm(text, prefix_embeds=image.index_select(0, rows), mask=mask, cache=cache)
            else:  # new suffix tokens over the cached keys: causal, prefix padding hidden
                new = tokens[:, done:]  # (N, T')
                keys = cache.length + new.shape[1]
                key_is_real = torch.cat([torch.ones(len(rows), num_image, dtype=torch.bool, device=new.device),
                                         prefix_real.index_select(0, rows),
                                         torch.ones(len(rows), keys - num_image - P, dtype=torch.bool, device=new.device)], dim=1)
                hidden = self.lm(new, position_offset=P + done, mask=padding_mask(key_is_real), is_causal=True, cache=cache)
            return self.lm.logits(hidden[:, -1])  # (N, V)

        return step, start_tokens

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """Answers generated with each question as the prefix (greedy, short, by default)."""
        decoding.setdefault("max_new_tokens", 5)
        return self.generate(pixels, prompt=questions, **decoding)


register_config("simvlm-tiny", "simvlm", {
    # Conv stem (2 stride-2 stages) + 16 px patches -> 1+16 image tokens; a 4-block PrefixLM of width 128.
    "vision": {"type": "vit", "image_size": 64, "patch_size": 16, "width": 128, "depth": 0, "heads": 4, "conv_stem": [32, 64]},
    "text": {"width": 128, "depth": 4, "heads": 4, "context_length": 24, "vocab_size": 1024, "eos_token_id": 1023},
    "prefix_length": 16,
})
register_config("simvlm-base", "simvlm", {
    # SimVLM-Base: ResNet-ish conv stem, 16 px patches at 224, a 12-layer width-768 transformer.
    "vision": {"type": "vit", "image_size": 224, "patch_size": 16, "width": 768, "depth": 0, "heads": 12, "conv_stem": [64, 128, 256]},
    "text": {"width": 768, "depth": 12, "heads": 12, "context_length": 32, "vocab_size": 32000, "eos_token_id": 31999},
})
