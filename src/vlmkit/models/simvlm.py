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

from vlmkit.capabilities import Answers, Generates
from vlmkit.data.loader import ImageTextDataset, task_rng
from vlmkit.data.records import answers_of, record_texts
from vlmkit.encoders.config import TextConfig, VisionConfig, build_vision_tower
from vlmkit.encoders.lm import random_tokens
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import combine, padding_mask, prefix_lm_mask
from vlmkit.layers.transformer import TokenTransformer
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


@dataclass
class SimVLMConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(patch_size=16, width=768, depth=0, conv_stem=(64, 128, 256)))
    text: TextConfig = field(default_factory=lambda: TextConfig(width=768, depth=12, heads=12, context_length=32))
    prefix_length: int = 16  # prompt slots (question or caption prefix), padded


@dataclass
class SimVLMTraining:
    """The recipe's `training:` options of SimVLM."""

    qa_fraction: float = 0.5  # share of samples that are question -> answer (records with `qa`)
    prefix_split: float = 0.0  # share of captions split into prefix + suffix at a random word (PrefixLM pretraining)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        for name in ("qa_fraction", "prefix_split"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"training.{name} must be between 0 and 1, got {getattr(self, name)}")


def empty_prefix(batch: int, config: SimVLMConfig, device=None) -> torch.Tensor:
    """The "no prompt" prefix: a lone end token then padding. (B, P)"""
    prefix = torch.full((batch, config.prefix_length), config.text.pad_token_id, dtype=torch.long, device=device)
    prefix[:, 0] = config.text.eos_token_id
    return prefix


class PrefixDataset(ImageTextDataset):
    """(prefix, suffix) samples for the PrefixLM: a caption with no prefix (or split at a random word),
    or question -> answer. `collate` adds `prefix_tokens` (B, P) to the usual batch."""

    def __init__(self, records, transform, tokenizer, config: SimVLMConfig, options: SimVLMTraining,
                 seed: int = 0, caption: str = "random"):
        super().__init__(records, transform, tokenizer=tokenizer, caption=caption, seed=seed, cache_images=True)
        self.config, self.options = config, options

    def __getitem__(self, index: int) -> dict | None:
        sample = super().__getitem__(index)
        if sample is None:
            return None
        record, rng = self.records[index], task_rng(self.seed, self.epoch, index)
        qa = record.get("qa") or []
        if qa and (not sample["text"] or rng.random() < self.options.qa_fraction):
            item = rng.choice(qa)
            sample["prefix"], sample["text"] = item["question"], rng.choice(answers_of(item))
        elif self.options.prefix_split and rng.random() < self.options.prefix_split:
            words = sample["text"].split()
            cut = rng.randint(1, max(len(words) - 1, 1))
            sample["prefix"], sample["text"] = " ".join(words[:cut]), " ".join(words[cut:])
        else:
            sample["prefix"] = None
        return sample

    def collate(self, samples) -> dict:
        batch = super().collate(samples)
        prefixes = [sample["prefix"] for sample in samples if sample is not None]
        prefix_tokens = empty_prefix(len(prefixes), self.config)  # (B, P)
        given = [row for row, prefix in enumerate(prefixes) if prefix is not None]
        if given:
            prefix_tokens[given] = self.tokenizer([prefixes[row] for row in given], context_length=self.config.prefix_length)
        batch["prefix_tokens"] = prefix_tokens
        return batch


@register_family
class SimVLM(Generative, VLModel):
    family = "simvlm"
    config_class = SimVLMConfig
    capabilities = (Generates, Answers)
    training_class = SimVLMTraining
    towers = {"image": "visual"}

    def __init__(self, config: SimVLMConfig) -> None:
        super().__init__(config)
        text = config.text
        self.visual = build_vision_tower(config.vision, None)
        self.image_proj = nn.Linear(config.vision.width, text.width)
        # Text positions count from the first prefix slot: prefix at 0..P-1, suffix from P on. Tied LM head.
        self.lm = TokenTransformer(text.vocab_size, config.prefix_length + text.context_length, text.width, text.depth,
                                   text.heads, mlp_ratio=text.mlp_ratio, activation=text.activation,
                                   norm_eps=text.norm_eps, dropout=text.dropout)
        self.generation_config = GenerationConfig(max_new_tokens=20)

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
        loss, logs = lm_loss_and_logs(logits, targets, target_mask, self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

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
        records = [record for record in records if record.get("texts") or record.get("qa")]
        if not records:
            raise UserError("no training record has captions ('texts') or questions ('qa') for SimVLM")
        return PrefixDataset(records, transform, tokenizer, self.config, self.training_options, seed=seed, caption=caption)

    @classmethod
    def tokenizer_texts(cls, records):
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


register_config("simvlm-tiny", "simvlm", tiny=True, config={
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
