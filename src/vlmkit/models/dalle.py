"""DALL-E (Ramesh et al. 2021): a transformer over [text tokens ; image tokens] of a frozen discrete VAE.

    caption -> BPE tokens (B, T): [sot] w1 .. wn [eot] pads   (pad at position i -> id vocab + i)
    image   -> frozen dVAE encoder -> argmax codes (B, N) (N = h * w, raster order)
    x = [text_embedding + text_position ; image_embedding + row + column embeddings]  (B, T + N - 1, D)
    -> causal blocks under the paper's decoder mask (layers.masks.text_to_image_mask) -> final norm
    position t < T - 1 predicts text token t + 1 (text head), position T - 1 + j image token j (image head)
    loss = text_weight * CE_text + image_weight * CE_image   (the paper: 1/8 and 7/8)

As in the paper (and DALLE-pytorch), every text pad position gets its own pad token, so pads are
keys like any other and the decoder mask is the causal mask of the whole sequence: training runs
SDPA with `is_causal` (the flash kernel on GPU), and a test checks the explicit mask gives the
same logits. Sampling (`imagine`) draws the N image tokens one by one with temperature and top-k
(default: the top half of the codebook, DALLE-pytorch's `filter_thres=0.5`) through
`vlmkit.generation.generate` with a KV cache, then decodes them with the dVAE. Re-ranking of many
samples by a CLIP is the task's (`vlmkit imagine --rerank`), as DALL-E re-ranked with CLIP.

The dVAE comes from a `dvae` run (`init_image: RUN`) and is always frozen: DALL-E trains its
transformer on the codes of a fixed VAE. The paper's sparse row / column / convolutional image
attention masks of the 12B model are not implemented (dense attention at this size).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Imagines
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.dvae import DiscreteVAE, DiscreteVAEConfig
from vlmkit.errors import UserError
from vlmkit.generation import GenerationConfig, generate
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.layers.norm import make_norm
from vlmkit.layers.transformer import Transformer
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family

# `imagine` options: the capability's (seed, temperature, top_k) and use_cache (False: the
# uncached reference the cache is tested against).
IMAGINE_OPTIONS = ("seed", "temperature", "top_k", "use_cache")


@dataclass
class DalleTextConfig:
    """The text side: the tokenizer's vocabulary and ids (set by the trainer) and the text length."""

    vocab_size: int = bounded(16384, low=2)
    context_length: int = bounded(256, low=2)  # T, text tokens per caption (the paper: 256)
    eos_token_id: int = 16383
    pad_token_id: int = 0


@dataclass
class DalleConfig:
    vision: DiscreteVAEConfig = field(default_factory=DiscreteVAEConfig)  # the dVAE (from init_image)
    text: DalleTextConfig = field(default_factory=DalleTextConfig)
    width: int = bounded(512, low=8)
    depth: int = bounded(8, low=1)
    heads: int = bounded(8, low=1)
    mlp_ratio: float = bounded(4.0, low=0, low_open=True)
    dropout: float = bounded(0.0, low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "config", separator=" ")
        if self.width % self.heads:
            raise UserError(f"width {self.width} is not divisible by heads {self.heads}; change one of them")


@dataclass
class DalleTraining:
    """The recipe's `training:` options of DALL-E: the weights of the two cross-entropies."""

    text_loss_weight: float = bounded(1 / 8, low=0)  # 0 trains on the image tokens only
    image_loss_weight: float = bounded(7 / 8, low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "training", separator=".")


@register_family
class Dalle(VLModel):
    family = "dalle"
    config_class = DalleConfig
    training_class = DalleTraining
    capabilities = (Imagines,)
    imagine_options = ("temperature", "top_k")  # what `vlmkit imagine` may pass beyond --seed
    towers = {"image": "vae"}

    def __init__(self, config: DalleConfig) -> None:
        super().__init__(config)
        text, vision, width = config.text, config.vision, config.width
        self.vae = DiscreteVAE(vision)
        self.vae.requires_grad_(False)  # always frozen: DALL-E's second stage trains the transformer only
        # One embedding row per text token and one per pad position (the paper's per-position pads).
        self.text_embedding = nn.Embedding(text.vocab_size + text.context_length, width)
        self.text_positions = nn.Parameter(torch.randn(text.context_length, width) * 0.01)
        self.image_embedding = nn.Embedding(vision.num_tokens, width)
        self.image_rows = nn.Parameter(torch.randn(vision.grid_size, width) * 0.01)
        self.image_columns = nn.Parameter(torch.randn(vision.grid_size, width) * 0.01)
        self.transformer = Transformer(width, config.depth, config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout)
        self.final_norm = make_norm("layernorm", width, 1e-5)
        self.text_head = nn.Linear(width, text.vocab_size, bias=False)  # a pad is never a target
        self.image_head = nn.Linear(width, vision.num_tokens, bias=False)
        for embedding in (self.text_embedding, self.image_embedding):
            nn.init.normal_(embedding.weight, std=0.02)
        # Sampling defaults (saved as generation_config.json): all N tokens, top half of the codebook.
        self.generation_config = GenerationConfig(max_new_tokens=vision.num_image_tokens, do_sample=True,
                                                  top_k=max(1, vision.num_tokens // 2), temperature=1.0)

    def train(self, mode: bool = True) -> "Dalle":
        super().train(mode)
        self.vae.eval()  # frozen (it has no dropout or batch norm, but a frozen tower stays in eval mode)
        return self

    # ---- the sequence ---------------------------------------------------------------------------
    def text_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokenizer output (B, T) -> input ids with each pad position's own id (vocab + position)."""
        is_real = real_tokens_through_end(tokens, self.config.text.eos_token_id)  # (B, T)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        return torch.where(is_real, tokens, self.config.text.vocab_size + positions)  # (B, T)

    def embed(self, text_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """[text ; image] embeddings with positions, (B, T + n, D) for n <= N image tokens given."""
        text = self.text_embedding(text_ids) + self.text_positions[: text_ids.shape[1]]  # (B, T, D)
        count, side = image_tokens.shape[1], self.config.vision.grid_size
        index = torch.arange(count, device=image_tokens.device)
        positions = self.image_rows[index // side] + self.image_columns[index % side]  # (n, D)
        image = self.image_embedding(image_tokens) + positions  # (B, n, D)
        return torch.cat([text, image], dim=1)

    def hidden(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The blocks under the decoder mask: causal, or an explicit boolean `mask` (tests). (B, L, D)"""
        return self.final_norm(self.transformer(x, mask=mask, is_causal=mask is None, cache=cache))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, T): [sot] caption [eot] pad...
        codes = self.vae.encode(batch["pixels"])  # (B, N), no gradient: the dVAE is frozen
        num_text = tokens.shape[1]
        hidden = self.hidden(self.embed(self.text_inputs(tokens), codes[:, :-1]))  # (B, T + N - 1, D)
        image_logits = self.image_head(hidden[:, num_text - 1 :])  # (B, N, K): position T-1+j predicts code j
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), codes.flatten())
        options = self.training_options
        loss = options.image_loss_weight * image_loss
        logs = {"image_loss": image_loss}
        if options.text_loss_weight > 0:
            text_logits = self.text_head(hidden[:, : num_text - 1])  # (B, T-1, V)
            targets = tokens[:, 1:]
            real = real_tokens_through_end(tokens, self.config.text.eos_token_id)[:, 1:]  # up to [eot]
            text_loss = F.cross_entropy(text_logits[real].float(), targets[real])
            loss = loss + options.text_loss_weight * text_loss
            logs["text_loss"] = text_loss
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, **logs), logits=image_logits)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        from vlmkit.encoders.lm import random_tokens

        generator = torch.Generator().manual_seed(seed)
        text, size = self.config.text, self.config.vision.image_size
        return {"pixels": torch.randn(batch_size, 3, size, size, generator=generator),
                "tokens": random_tokens(text.vocab_size, text.context_length, text.eos_token_id, text.pad_token_id,
                                        batch_size, generator)}

    # ---- a pretrained dVAE (init_image) ---------------------------------------------------------
    @classmethod
    def adapt_pretrained_tower_config(cls, role: str, section: dict) -> dict:
        """Only a discrete VAE's config (a `dvae` run) can be DALL-E's image tower."""
        expected = {item.name for item in fields(DiscreteVAEConfig)}
        if role == "image" and not ("num_tokens" in section and set(section) <= expected):
            raise UserError("init_image is not a discrete VAE (a 'dvae' run): its image tower has no codebook; "
                            "train one with 'vlmkit train --recipe dvae-tiny' and give that run as init_image")
        return section

    # ---- sampling -------------------------------------------------------------------------------
    def imagine_settings(self, options: dict) -> GenerationConfig:
        """The sampling settings `imagine` runs with: the model's defaults updated by `options`."""
        unknown = sorted(set(options) - set(IMAGINE_OPTIONS))
        if unknown:
            raise UserError(f"DALL-E takes no option {', '.join(unknown)}; its options are: {', '.join(IMAGINE_OPTIONS)}")
        temperature, top_k = options.get("temperature"), options.get("top_k")
        if temperature is not None and not temperature > 0:
            raise UserError(f"temperature {temperature} must be above 0 (1 samples the model's distribution, lower is greedier)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise UserError(f"top_k {top_k} must be a whole number of at least 1 (the codebook size "
                            f"{self.config.vision.num_tokens} keeps every code)")
        return GenerationConfig.from_kwargs(self.generation_config, max_new_tokens=self.config.vision.num_image_tokens,
                                            do_sample=True, **options)

    def sample_tokens(self, prompts: Sequence[str], **options) -> torch.Tensor:
        """Image token ids (B, N) sampled for text prompts (options as `imagine`)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or any(not isinstance(prompt, str) or not prompt.strip() for prompt in prompts):
            raise UserError("a prompt is empty; give each image a caption such as \"a red triangle\"")
        settings = self.imagine_settings(options)
        text_ids = self.text_inputs(self.tokenize(prompts).to(self.device))  # (B, T)
        num_text = text_ids.shape[1]

        def step(sequence: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            past = cache.length if cache is not None else 0
            x = self.embed(sequence[:, :num_text], sequence[:, num_text:])[:, past:]  # (B, new, D)
            return self.image_head(self.hidden(x, cache=cache)[:, -1])  # (B, K)

        # No end token: every row draws exactly N codes (-1 is never sampled).
        return generate(step, text_ids, settings, eos_token_id=-1).tokens  # (B, N)

    @torch.no_grad()
    def imagine(self, prompts: Sequence[str], **options) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1], one per prompt. Options: seed, temperature (> 0), top_k (>= 1), use_cache."""
        was_training = self.training
        self.eval()
        try:
            return self.vae.decode(self.sample_tokens(prompts, **options)).clamp(0, 1)
        finally:
            self.train(was_training)


register_config("dalle-tiny", "dalle", tiny=True, config={
    # A 4-block, 128-wide transformer over 24 text tokens + the 8x8 codes of dvae-tiny (32 px, K = 512).
    "vision": {"image_size": 32, "num_tokens": 512, "hidden": 32, "groups": 3, "blocks_per_group": 1, "decoder_init": 64},
    "text": {"vocab_size": 1024, "context_length": 24, "eos_token_id": 1023},  # built-in captions: at most 22 tokens
    "width": 128, "depth": 4, "heads": 4,
})
