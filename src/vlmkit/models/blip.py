"""BLIP (Li et al. 2022): one ViT, one BERT-style text transformer used three ways, three losses.

image -> ViT (class token, no ln_pre, ln_post on every token) -> image tokens (B, 1+N, W)
text  -> one stack of post-LN BERT blocks with a cross-attention sublayer between self-attention
         and MLP, run in three modes:
  unimodal encoder   [CLS] caption [SEP], no cross-attention          -> [CLS] -> text_proj  (ITC)
  grounded encoder   [ENC] caption [SEP], cross-attends to the image  -> [ENC] -> itm_head   (ITM)
  grounded decoder   [DEC] prompt caption, causal, cross-attends      -> BERT LM head        (LM)
The decoder shares every parameter with the encoder except the self-attention (each block's
`decoder_attn`, see layers/transformer.py), as blip_pretrain.py ties them.

Losses (blip_pretrain.py): ITC against momentum encoders (m = 0.995) and feature queues with soft
targets alpha * softmax(sim_m) + (1 - alpha) * onehot (alpha = 0.4), temperature a Parameter
(0.07) clamped to [0.001, 0.5]; ITM on [positives ; texts with a hard negative image ; images with
a hard negative text], the negatives drawn in proportion to softmax(similarity) with the positive
excluded; LM with label smoothing 0.1, the prompt "a picture of " left unsupervised. Total = sum.

A model may hold the encoder side only (`encoder`, what HF's BlipForImageTextRetrieval holds), the
decoder side only (`decoder`, BlipForConditionalGeneration) or both (what training builds); its
capabilities follow. `enc_token_id = None` reads ITM texts as given (HF's BlipForImageTextRetrieval
does not substitute [ENC]; salesforce/BLIP's training and evaluation code does).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, Generates, MatchesImageText
from vlmkit.data.loader import ImageTextDataset, batch_seed
from vlmkit.encoders.config import TextConfig, VisionConfig, build_vision_tower
from vlmkit.encoders.lm import random_texts
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig, left_padded_prompts
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import padding_mask, real_tokens_through_end
from vlmkit.layers.mlp import BertLMHead
from vlmkit.layers.moving_average import copy_weights, paired_parameters, update_moving_average
from vlmkit.layers.transformer import TokenTransformer
from vlmkit.losses import enqueue, lm_loss_and_logs, momentum_contrastive_loss, sample_hard_negatives
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family

DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"


def _bert_text(**overrides) -> TextConfig:
    """BERT-base as BLIP's text side: post-LN, embedding LayerNorm, no token types, [CLS] pooling."""
    values = dict(vocab_size=30524, context_length=512, width=768, depth=12, heads=12, causal=False, pool="cls",
                  eos_token_id=102, pad_token_id=0, prenorm=False, embed_norm=True, type_vocab_size=0, norm_eps=1e-12)
    return TextConfig(**{**values, **overrides})


@dataclass
class BLIPConfig:
    embed_dim: int = 256  # the ITC space (vision_proj / text_proj)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=384, patch_size=16, width=768, depth=12, heads=12, norm_pre=False, patch_bias=True))
    text: TextConfig = field(default_factory=_bert_text)
    encoder: bool = True  # ITC + ITM: projections, ITM head, the encoder self-attention
    decoder: bool = True  # captioning: the decoder self-attention and the LM head
    dec_token_id: int | None = 30522  # [DEC], the decoder's first token (HF's text bos_token_id)
    enc_token_id: int | None = 30523  # [ENC] at position 0 of ITM texts; None keeps the text as given (HF)
    prompt: str = "a picture of "  # captions are trained and generated after it; it is not supervised
    momentum: float = 0.995
    queue_size: int = 57600  # momentum features kept for ITC (a multiple of the global batch in BLIP)
    distill: bool = True  # momentum encoders + queues; False: in-batch ITC, no momentum copies (HF checkpoints)
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5

    def __post_init__(self) -> None:
        if not (self.encoder or self.decoder):
            raise UserError("a BLIP model needs its encoder side, its decoder side or both; set encoder or decoder to true")
        if self.vision.type != "vit" or self.vision.pool != "cls":
            raise UserError("BLIP's image tower is a ViT pooled at its class token; set vision.type 'vit' and vision.pool 'cls'")
        if self.text.causal or self.text.pool != "cls":
            raise UserError("BLIP's text side is bidirectional and pooled at [CLS]; set text.causal false and text.pool 'cls'")
        if self.text.eos_token_id is None:
            raise UserError("BLIP's text side needs text.eos_token_id ([SEP], where decoding stops)")
        if self.decoder and self.dec_token_id is None:
            raise UserError("a BLIP decoder needs dec_token_id (the [DEC] token it starts from)")
        for name in ("dec_token_id", "enc_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.text.vocab_size:
                raise UserError(f"{name} {value} is outside the vocabulary of {self.text.vocab_size} tokens")
        if not 0.0 <= self.momentum < 1.0:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 1:
            raise UserError(f"queue_size must be at least 1, got {self.queue_size}")
        if not 0 < self.min_temperature <= self.init_temperature <= self.max_temperature:
            raise UserError("temperatures must satisfy 0 < min_temperature <= init_temperature <= max_temperature")


@dataclass
class BLIPTraining:
    """The recipe's `training:` options of BLIP."""

    alpha: float = 0.4  # weight of the momentum model's soft targets in ITC
    label_smoothing: float = 0.1  # LM loss (salesforce/BLIP med.py; HF's default is 0.0)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"training.alpha must be between 0 and 1, got {self.alpha}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"training.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class CaptionDataset(ImageTextDataset):
    """Image-caption pairs; `collate` adds `caption_tokens` (B, L): the caption after the prompt, for
    the LM loss, and `prompt_length` (B,): how many prompt tokens follow [CLS] (left unsupervised)."""

    def __init__(self, records, transform, tokenizer, prompt: str, seed: int = 0, caption: str = "random"):
        super().__init__(records, transform, tokenizer=tokenizer, caption=caption, seed=seed, cache_images=True)
        self.prompt = prompt
        self.prompt_length = len(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else 0

    def collate(self, samples) -> dict:
        batch = super().collate(samples)
        texts = batch["texts"]
        if texts:
            batch["caption_tokens"] = self.tokenizer([self.prompt + text for text in texts])
        batch["prompt_length"] = torch.full((len(texts),), self.prompt_length, dtype=torch.long)
        # The ITM hard negatives are drawn from a generator seeded by the batch itself (run seed, epoch,
        # samples), a plain int so no device sync: a resumed run draws what the uninterrupted one drew,
        # whatever else consumed the global RNG in between (a new DataLoader iterator does).
        batch["negative_seed"] = batch_seed(self.seed, self.epoch, batch["indices"])
        return batch


@register_family
class BLIP(Generative, VLModel):
    family = "blip"
    config_class = BLIPConfig
    capabilities = (EmbedsImages, EmbedsTexts, Generates, MatchesImageText)
    training_class = BLIPTraining
    towers = {"image": "visual", "text": "text"}
    export_formats = {"hf": "vlmkit.interop.hf_blip:export"}
    uses_every_parameter = True  # every side it holds is in every step (momentum copies take no gradient)

    def __init__(self, config: BLIPConfig) -> None:
        super().__init__(config)
        vision, text = config.vision, config.text
        # What this instance can do follows the sides it holds (an HF captioner has no ITM head).
        self.capabilities = ((EmbedsImages, EmbedsTexts, MatchesImageText) if config.encoder else ()) + (
            (Generates,) if config.decoder else ())
        self.visual = build_vision_tower(vision, None)  # ln_post'ed tokens; BLIP's projection has a bias
        self.text = self._text_stack(context_dim=vision.width, decoder_attention=config.encoder and config.decoder)
        if config.encoder:
            self.vision_proj = nn.Linear(vision.width, config.embed_dim)
            self.text_proj = nn.Linear(text.width, config.embed_dim)
            self.itm_head = nn.Linear(text.width, 2)
            self.temperature = nn.Parameter(torch.tensor(float(config.init_temperature)))
        if config.decoder:
            self.lm_head = BertLMHead(text.width, text.vocab_size, text.activation, text.norm_eps)
        if config.encoder and config.distill:
            # Momentum copies of the unimodal path only: the ITC features are all they compute.
            self.visual_m = copy.deepcopy(self.visual)
            self.vision_proj_m = copy.deepcopy(self.vision_proj)
            self.text_m = self._text_stack(context_dim=None, decoder_attention=False)
            self.text_proj_m = copy.deepcopy(self.text_proj)
            online, momentum = self._momentum_pairs()
            copy_weights(momentum, online)
            for module in self._momentum_modules():
                module.requires_grad_(False)
            self.register_buffer("image_queue", F.normalize(torch.randn(config.queue_size, config.embed_dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(config.queue_size, config.embed_dim), dim=1))
            self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.generation_config = GenerationConfig(max_new_tokens=20)  # greedy; BLIP evaluates with num_beams=3

    def _text_stack(self, context_dim: int | None, decoder_attention: bool) -> TokenTransformer:
        text = self.config.text
        return TokenTransformer(
            text.vocab_size, text.context_length, text.width, text.depth, text.heads, mlp_ratio=text.mlp_ratio,
            activation=text.activation, prenorm=text.prenorm, norm_eps=text.norm_eps, dropout=text.dropout,
            type_vocab_size=text.type_vocab_size, embed_norm=text.embed_norm, context_dim=context_dim,
            decoder_attention=decoder_attention,
        )

    # ---- momentum encoders -------------------------------------------------------------------
    def _momentum_modules(self) -> list[nn.Module]:
        return [self.visual_m, self.vision_proj_m, self.text_m, self.text_proj_m]

    def _momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(online, momentum) parameters, matched by name (the momentum text stack has no cross-attention)."""
        return paired_parameters(zip((self.visual, self.vision_proj, self.text, self.text_proj), self._momentum_modules()))

    def has_momentum(self) -> bool:
        return self.config.encoder and self.config.distill

    def after_optimizer_step(self) -> None:
        """Clamp the temperature, then move the momentum encoders towards the online ones (EMA)."""
        if not self.config.encoder:
            return
        with torch.no_grad():
            self.temperature.clamp_(self.config.min_temperature, self.config.max_temperature)
            if self.has_momentum():
                online, momentum = self._momentum_pairs()
                update_moving_average(momentum, online, self.config.momentum)

    # ---- the three text modes ----------------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor, visual: nn.Module | None = None) -> torch.Tensor:
        """Every image token after ln_post, what the text side cross-attends to. (B, 1+N, W)"""
        visual = visual or self.visual
        return visual.norm_post(visual(pixels).tokens)

    def _text_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return padding_mask(tokens != self.config.text.pad_token_id)  # (B, 1, 1, L)

    def _with_first(self, tokens: torch.Tensor, token_id: int | None) -> torch.Tensor:
        """`tokens` with position 0 ([CLS]) replaced by `token_id` ([ENC] / [DEC]); unchanged for None."""
        if token_id is None:
            return tokens
        tokens = tokens.clone()
        tokens[:, 0] = token_id
        return tokens

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim): vision_proj of the ln_post'ed class token (not normalised)."""
        self.require(EmbedsImages, task="encode_image")
        return self.vision_proj(self.visual(pixels, pooled_only=True).pooled)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) [CLS] text [SEP] ids -> (B, embed_dim): text_proj of the unimodal [CLS] (not normalised)."""
        self.require(EmbedsTexts, task="encode_text")
        return self.text_proj(self.text(tokens, mask=self._text_mask(tokens), last_layer_queries=1)[:, 0])

    def itm_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) [no match, match] of text row b against image-token row b (B, 1+N, W)."""
        self.require(MatchesImageText, task="image-text matching")
        ids = self._with_first(tokens, self.config.enc_token_id)
        hidden = self.text(ids, mask=self._text_mask(ids), context=image_tokens, last_layer_queries=1)  # (B, 1, D)
        return self.itm_head(hidden[:, 0])

    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) probability that text row b describes image row b (softmax of the ITM head)."""
        return self.itm_logits(self.image_tokens(pixels), tokens).softmax(dim=-1)[:, 1]

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1+N, W): the image tokens `match_scores` cross-attends to."""
        return self.image_tokens(pixels)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the ITM head's "match" logit, what BLIP re-ranks retrieval candidates by."""
        return self.itm_logits(image_features, tokens)[:, 1]

    def caption_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor, cache: KVCache | None = None,
                       mask: torch.Tensor | None = None, position_offset=None) -> torch.Tensor:
        """Next-token logits (B, T, V) of the causal decoder over `tokens` (already starting with [DEC])."""
        self.require(Generates, task="captioning")
        hidden = self.text(tokens, mask=mask, is_causal=True, context=image_tokens, cache=cache,
                           position_offset=position_offset, decoder=True)  # (B, T, D)
        return self.lm_head(hidden, self.text.token_embedding.weight)

    # ---- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pixels, tokens = batch["pixels"], batch["tokens"]  # (B, 3, H, W), (B, L): [CLS] caption [SEP] pad
        options, config = self.training_options, self.config
        image = self.image_tokens(pixels)  # (B, 1+N, W)
        losses, logs, logits = {}, {}, None
        if config.encoder:
            losses["itc"], losses["itm"], logs = self._itc_itm(pixels, image, tokens, batch.get("negative_seed"))
        if config.decoder:
            caption = batch.get("caption_tokens", tokens)  # (B, L): [CLS] prompt caption [SEP] pad
            prompt_length = batch.get("prompt_length")  # (B,) prompt tokens after [CLS], or None
            inputs = self._with_first(caption[:, :-1], config.dec_token_id)  # (B, L-1): [DEC] ...
            logits = self.caption_logits(image, inputs)  # (B, L-1, V)
            targets = caption[:, 1:]
            target_mask = real_tokens_through_end(caption, config.text.eos_token_id)[:, 1:]  # through [SEP]
            if prompt_length is not None:  # the prompt's own words are given, not predicted
                positions = torch.arange(targets.shape[1], device=targets.device)[None, :]
                target_mask = target_mask & (positions >= prompt_length[:, None])
            losses["lm"], lm_logs = lm_loss_and_logs(logits, targets, target_mask, options.label_smoothing)
            logs["token_acc"] = lm_logs["token_acc"]
        weights = {"itc": options.itc_weight, "itm": options.itm_weight, "lm": options.lm_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        return ModelOutput(loss=loss, logs={**detached_logs(loss=loss, **losses), **logs}, logits=logits)

    def _itc_itm(self, pixels: torch.Tensor, image: torch.Tensor, tokens: torch.Tensor, negative_seed: int | None = None):
        """ITC (with momentum distillation when `distill`) and ITM with hard negatives; (itc, itm, logs)."""
        batch = tokens.shape[0]
        if batch < 2:
            raise UserError("BLIP's ITM loss needs at least 2 image-text pairs per batch (hard negatives); raise batch_size")
        image_features = self.vision_proj(image[:, 0])  # (B, E)
        text_features = self.text_proj(self.text(tokens, mask=self._text_mask(tokens), last_layer_queries=1)[:, 0])
        temperature = self.temperature
        if self.has_momentum():
            with torch.no_grad():
                image_m = self.vision_proj_m(self.visual_m(pixels, pooled_only=True).pooled)  # (B, E)
                text_m = self.text_proj_m(self.text_m(tokens, mask=self._text_mask(tokens), last_layer_queries=1)[:, 0])
            itc, sim_i2t, sim_t2i = momentum_contrastive_loss(
                image_features, text_features, image_m, text_m, self.image_queue, self.text_queue,
                temperature, self.training_options.alpha,  # the loss reads copies (torch.cat): enqueueing next is safe
            )
            if self.training:
                enqueue((self.image_queue, self.text_queue), (F.normalize(image_m, dim=-1), F.normalize(text_m, dim=-1)),
                        self.queue_pointer)
        else:  # in-batch ITC: the online features are their own (detached) targets, no queue
            empty = image_features.new_zeros(0, image_features.shape[1])
            itc, sim_i2t, sim_t2i = momentum_contrastive_loss(
                image_features, text_features, image_features.detach(), text_features.detach(), empty, empty, temperature, 0.0)
        # ITM: [pairs ; each text with a hard negative image ; each image with a hard negative text]
        # Drawn from the batch's own seed (CaptionDataset's `negative_seed`), else from the global RNG in
        # training and a fixed seed in evaluation (a validation loss is a function of model and batch).
        seed = negative_seed if negative_seed is not None else (None if self.training else 0)
        generator = None if seed is None else torch.Generator(device=sim_t2i.device).manual_seed(seed)
        # Pairs with the same caption (frequent when a dataset's captions repeat, e.g. "a red circle")
        # are matches of each other, not negatives.
        same_text = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)  # (B, B)
        negative_images = sample_hard_negatives(sim_t2i, generator, same_text)  # (B,) an image for each text
        negative_texts = sample_hard_negatives(sim_i2t, generator, same_text)  # (B,) a text for each image
        itm_images = torch.cat([image, image[negative_images], image], dim=0)  # (3B, 1+N, W)
        itm_texts = torch.cat([tokens, tokens, tokens[negative_texts]], dim=0)  # (3B, L)
        itm_logits = self.itm_logits(itm_images, itm_texts)  # (3B, 2)
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(itm_logits.device)
        itm = F.cross_entropy(itm_logits.float(), labels)
        with torch.no_grad():
            logs = {"itm_acc": (itm_logits.argmax(dim=1) == labels).float().mean(),
                    "i2t_acc": (sim_i2t.argmax(dim=1) == torch.arange(batch, device=sim_i2t.device)).float().mean(),
                    "temperature": temperature.detach().clone()}
        return itc, itm, logs

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        tokens = random_texts(text, batch_size, generator)  # different lengths, padded
        return {"pixels": pixels, "tokens": tokens}

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        base = super().training_dataset(records, transform, tokenizer, seed, caption)  # checks the records
        return CaptionDataset(base.records, transform, tokenizer, self.config.prompt if self.config.decoder else "",
                              seed=seed, caption=caption)

    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """BLIP's tokenizer is BERT's plus [DEC] and [ENC] (added here when missing)."""
        add = getattr(tokenizer, "add_special_tokens", None)
        if add is None:  # a stand-in vocabulary of a known size (`train --dry-run`): its last two ids
            config = super().adapt_config_to_tokenizer(config, tokenizer)
            dec_id, enc_id = tokenizer.vocab_size - 2, tokenizer.vocab_size - 1
        else:
            dec_id, enc_id = add([DEC_TOKEN, ENC_TOKEN])
            config = super().adapt_config_to_tokenizer(config, tokenizer)
        config["dec_token_id"], config["enc_token_id"] = dec_id, enc_id
        return config

    # ---- a pretrained text side (init_text: BERT / MiniLM) ------------------------------------
    @classmethod
    def adapt_pretrained_tower_config(cls, role: str, section: dict) -> dict:
        """A BERT-family text tower becomes BLIP's: pooled at [CLS], no token types (folded into the
        positions, see below), ended by the tokenizer's [SEP] (set from the tokenizer next)."""
        if role == "text":
            section = {**section, "pool": "cls", "causal": False, "type_vocab_size": 0,
                       "eos_token_id": section.get("eos_token_id") or 0}
        return section

    def adapt_pretrained_tower_state(self, role: str, state: dict, expected: dict) -> dict:
        """BERT weights into the three-mode stack: token type 0's embedding (every BLIP text is type 0)
        is added into the position table, exactly; each decoder self-attention starts as a copy of the
        encoder's (BLIP initialises both from BERT); the cross-attention is new (random, as in BLIP)."""
        if role != "text":
            return state
        state = dict(state)
        types = state.pop("type_embedding.weight", None)
        if types is not None:
            state["positional_embedding"] = state["positional_embedding"] + types[0]
        new = []
        for key in expected:
            if key in state:
                continue
            if ".decoder_attn." in key or ".decoder_norm1." in key:
                state[key] = state[key.replace("decoder_attn.", "attn.").replace("decoder_norm1.", "norm1.")]
            elif ".cross_attn." in key or ".norm_cross." in key:
                state[key] = expected[key]
                new.append(key)
        if new:
            import sys

            print(f"vlmkit: init_text: {len(new)} cross-attention tensors are new (randomly initialised); "
                  f"the decoder self-attention starts as a copy of the encoder's", file=sys.stderr)
        return state

    def after_pretrained_towers(self) -> None:
        """The momentum encoders start as copies of the (now pretrained) online ones."""
        if self.has_momentum():
            online, momentum = self._momentum_pairs()
            copy_weights(momentum, online)

    # ---- generation --------------------------------------------------------------------------
    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """[CLS] + prompt (none: [CLS] alone), left-padded, the [CLS] fed to the network as [DEC] (as in
        training and HF's generate); the image keys are computed once."""
        config = self.config
        image = self.image_tokens(pixels)  # (B, 1+N, W)
        prompts = prompts if prompts is not None else [""] * pixels.shape[0]
        bos = getattr(self.tokenizer, "bos_id", None)  # [CLS]; without a tokenizer only empty prompts work
        start = bos if bos is not None else config.dec_token_id
        prompt_tokens, num_pad = left_padded_prompts(self.tokenizer, prompts, start, config.text.pad_token_id, pixels.device)
        first = num_pad  # (B,) the column of each row's start token
        num_pad = num_pad if bool(num_pad.any()) else None

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            start = cache.length if cache is not None else 0
            mask, offset = None, None
            if num_pad is not None:  # hide the left pads; positions start at each row's first real token
                pads = num_pad.index_select(0, rows)  # (N,)
                key_is_real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= pads[:, None]
                mask, offset = padding_mask(key_is_real), start - pads
            new = tokens[:, start:]
            if start == 0:  # the start token enters the network as [DEC]
                new = new.scatter(1, first.index_select(0, rows)[:, None], config.dec_token_id)
            step_image = image if start else image.index_select(0, rows)  # cached cross keys are already per row
            return self.caption_logits(step_image, new, cache=cache, mask=mask, position_offset=offset)[:, -1]

        return step, prompt_tokens

    def generate_output(self, pixels: torch.Tensor, prompt=None, **decoding):
        """Captions for images (B, 3, H, W) continuing `prompt`, by default the model's own ("a picture of "),
        which the texts returned do not repeat."""
        self.require(Generates, task="generate")
        return super().generate_output(pixels, prompt=self.config.prompt or None if prompt is None else prompt, **decoding)


# ---- named configurations ------------------------------------------------------------------
register_config("blip-tiny", "blip", tiny=True, config={
    # 64 px images in 8 px patches -> 1+64 image tokens; a 3-block text stack of width 128.
    # Vocabulary and special ids are set by the trainer's tokenizer (WordPiece + [DEC] + [ENC]).
    "embed_dim": 64, "queue_size": 256,
    "vision": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4, "norm_pre": False, "patch_bias": True},
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 3, "heads": 4, "causal": False, "pool": "cls",
             "eos_token_id": 3, "pad_token_id": 0, "prenorm": False, "embed_norm": True, "type_vocab_size": 0,
             "norm_eps": 1e-12},
    "dec_token_id": 1022, "enc_token_id": 1023,
})
register_config("blip-base", "blip", config={
    # BLIP ViT-B/16 with BERT-base (salesforce/BLIP model_base), 384 px.
    "vision": {"image_size": 384, "patch_size": 16, "width": 768, "depth": 12, "heads": 12, "norm_pre": False, "patch_bias": True},
})
