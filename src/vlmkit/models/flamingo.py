"""Flamingo (Alayrac et al. 2022; OpenFlamingo; HF IDEFICS): a frozen LM reads images through
gated cross-attention to a Perceiver Resampler's visual tokens, in interleaved documents.

document: [bos] <image> text <|endofchunk|> <image> text <|endofchunk|> ...   (B, T) token ids
images  : (B, M, 3, H, W) -> frozen vision tower -> tokens (B*M, P, W) -> Perceiver Resampler
          -> L visual tokens per image -> media (B, M*L, W)
LM      : before every N-th frozen block, a GatedCrossAttentionBlock: the text attends to the media
          of the most recent preceding image only (layers.masks.media_mask), scaled by tanh(gate),
          gates initialised at 0 (so at init the model IS the frozen LM) -> next-token loss on the texts

Trained: the resampler, the gated blocks and the two new token rows (`<image>`, `<|endofchunk|>`,
ids vocab_size and vocab_size + 1: IDEFICS's decoupled embedding, so the LM's own table stays
untouched); the LM and the vision tower are locked. Start it with `init_text: RUN` (an `lm` run or
an HF GPT-2 / Llama folder) and, optionally, `init_image: RUN` (a CLIP ViT run).

Training data: plain records (an image and its captions / `qa`) and interleaved records
(`segments`, data.interleaved). `training.images_per_document` packs plain records, drawn with a
seeded stream per sample, into documents of up to that many images, so the model learns to read
in-context examples. Inference: `generate` (captions), `answer` / `answer_in_context` (few-shot
VQA, "Question: q Answer: a"), `caption_in_context` (few-shot captioning) and `chat` (several images,
placed with `<image>` markers), all with the visual keys/values computed once per generation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vlmkit.capabilities import Answers, AnswersInContext, CaptionsInContext, Chats, Generates
from vlmkit.config import bounded
from vlmkit.data.interleaved import split_at_images
from vlmkit.data.records import answers_of, check_messages, qa_text, record_texts
from vlmkit.encoders.config import LMConfig, VisionConfig, build_vision_tower, lm_config_llama
from vlmkit.encoders.lm import DecoderLM, random_prefixed_batch
from vlmkit.encoders.resampler import PerceiverResampler
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig, TextStreamer, generate
from vlmkit.layers.attention import KVCache
from vlmkit.layers.gated_cross_attention import GatedCrossAttentionBlock
from vlmkit.layers.masks import media_mask, padding_mask, real_tokens_through_end
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family

IGNORE = -100
MEDIA_TOKEN, END_OF_CHUNK = "<image>", "<|endofchunk|>"


@dataclass
class ResamplerConfig:
    depth: int = bounded(6, low=1)
    heads: int = bounded(8, low=1)
    head_dim: int = bounded(64, low=1)
    num_latents: int = bounded(64, low=1)
    ff_mult: int = bounded(4, low=1)
    activation: str = "gelu"  # OpenFlamingo; IDEFICS: relu


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=224, patch_size=14, width=1024, depth=24,
                                                                      heads=16, activation="quick_gelu"))
    lm: LMConfig = field(default_factory=lambda: LMConfig(**lm_config_llama()))
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attention_every: int = bounded(1, low=1)  # a gated block before every N-th LM block
    # Which blocks, as index % every: None = every - 1 (OpenFlamingo: after N-1 plain blocks), 0 = IDEFICS.
    cross_attention_offset: int | None = None
    cross_attention_heads: int = bounded(8, low=1)
    cross_attention_mlp_hidden: int | None = bounded(None, low=1)  # None = 4 * lm.width
    cross_attention_norm: str = "layernorm"  # OpenFlamingo: layernorm + GELU MLP; IDEFICS: rmsnorm + SwiGLU
    cross_attention_activation: str = "gelu"
    cross_attention_gated_mlp: bool = False
    cross_attention_norm_eps: float = bounded(1e-5, low=0, low_open=True)
    vision_tokens: str = "patches"  # patches: drop CLS (OpenFlamingo) | all: CLS too (IDEFICS's last_hidden_state)
    # The two tokens after the LM's vocabulary, in id order; one must be <image>, the other ends a
    # chunk (a stop token). IDEFICS checkpoints: ("<fake_token_around_image>", "<image>").
    extra_tokens: tuple[str, ...] = (MEDIA_TOKEN, END_OF_CHUNK)

    def __post_init__(self) -> None:
        if self.vision.type != "vit":
            raise UserError("Flamingo resamples a ViT's tokens; set vision.type to 'vit'")
        if self.vision_tokens not in ("patches", "all"):
            raise UserError(f"vision_tokens must be 'patches' or 'all', got {self.vision_tokens!r}")
        offset = self.cross_attention_offset
        if offset is not None and not 0 <= offset < self.cross_attention_every:
            raise UserError(f"cross_attention_offset {offset} must be in 0..{self.cross_attention_every - 1} "
                            f"(cross_attention_every - 1)")
        if len(self.extra_tokens) != 2 or MEDIA_TOKEN not in self.extra_tokens:
            raise UserError(f"extra_tokens must be two tokens, one of them {MEDIA_TOKEN}; got {list(self.extra_tokens)}")
        if self.lm.width % self.cross_attention_heads:
            raise UserError(f"lm.width {self.lm.width} is not divisible by cross_attention_heads {self.cross_attention_heads}")

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the LM blocks that get a gated cross-attention block before them."""
        every = self.cross_attention_every
        offset = every - 1 if self.cross_attention_offset is None else self.cross_attention_offset
        return [index for index in range(self.lm.depth) if index % every == offset]

    @property
    def media_token_id(self) -> int:
        return self.lm.vocab_size + list(self.extra_tokens).index(MEDIA_TOKEN)

    @property
    def end_of_chunk_id(self) -> int:
        """The other new token: it ends a chunk (decoding stops there)."""
        return self.lm.vocab_size + 1 - list(self.extra_tokens).index(MEDIA_TOKEN)


@dataclass
class FlamingoTraining:
    """The recipe's `training:` options of Flamingo."""

    images_per_document: int = 4  # plain records packed into documents of up to this many images
    qa_fraction: float = 0.5  # the chance a packed document's chunks are question-answer pairs rather than captions
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.images_per_document < 1 or not 0.0 <= self.qa_fraction <= 1.0:
            raise UserError(f"training.images_per_document must be at least 1 and qa_fraction in [0, 1]; got "
                            f"{self.images_per_document}, {self.qa_fraction}")


def chunk_texts(record: dict, rng: random.Random, qa: bool) -> list[str]:
    """The chunk of a plain record: "Question: q Answer: a" when `qa` (and it has questions), else a caption."""
    pairs = [qa_text(item["question"], answers_of(item)[0]) for item in record.get("qa") or []]
    captions = record.get("texts") or []
    if pairs and (qa or not captions):
        return [rng.choice(pairs)]
    return [rng.choice(captions)] if captions else []


class InterleavedDataset(torch.utils.data.Dataset):
    """Documents of images and texts; `collate` gives `tokens` (B, T), `labels` (B, T) (-100 where not
    trained: bos, `<image>`, pads) and `pixels` (B, M, 3, H, W) (zeros past a row's images)."""

    def __init__(self, records: Sequence[dict], transform, tokenizer, config: FlamingoConfig, options: FlamingoTraining,
                 seed: int) -> None:
        self.documents = [r for r in records if r.get("segments")]
        self.plain = [r for r in records if "image" in r and not r.get("segments") and (r.get("texts") or r.get("qa"))]
        if not self.documents and not self.plain:
            raise UserError("no training record has an image with captions / qa, or interleaved \"segments\"; Flamingo trains on those")
        self.transform, self.tokenizer, self.config, self.options, self.seed = transform, tokenizer, config, options, seed
        self.epoch = 0
        self._skipped: list[str] = []  # images of this process's skipped samples, until collate reports them

    def __len__(self) -> int:
        return len(self.documents) + len(self.plain)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def segments(self, index: int) -> list[dict]:
        """Sample `index` as segments: a document as written, or a plain record packed with others."""
        from vlmkit.data.loader import task_rng

        if index < len(self.documents):
            return self.documents[index]["segments"]
        rng = task_rng(self.seed, self.epoch, index)
        chosen = [self.plain[index - len(self.documents)]]
        extra = rng.randrange(self.options.images_per_document)  # 0..N-1 more records, the sample's own one last
        chosen = [rng.choice(self.plain) for _ in range(extra)] + chosen
        # One format per document, as in a few-shot prompt: the examples' format then predicts the
        # query's, which is what in-context examples can teach (a per-chunk coin flip would not).
        qa = rng.random() < self.options.qa_fraction
        out = []
        for record in chosen:
            out += [{"image": record["image"]}] + [{"text": t} for t in chunk_texts(record, rng, qa)]
        return out

    def __getitem__(self, index: int) -> dict | None:
        from vlmkit.data.formats import CorruptImage, load_image

        segments = self.segments(index)
        images = []
        for item in (item for item in segments if "image" in item):
            try:
                images.append(self.transform(load_image(item["image"])))
            except CorruptImage:  # the sample is skipped and its image reported by collate, never raised mid-training
                self._skipped.append(item["image"])
                return None
        ids, labels, kept = document_ids(segments, self.tokenizer, self.config)
        side = self.config.vision.image_size
        pixels = torch.stack(images[:kept]) if kept else torch.zeros(0, 3, side, side)  # (kept, 3, H, W)
        return {"ids": ids, "labels": labels, "pixels": pixels}

    def collate(self, samples: Sequence[dict | None]) -> dict:
        good = [s for s in samples if s is not None]
        skipped, self._skipped = self._skipped, []
        side = self.config.vision.image_size
        if not good:  # a batch of unreadable images: zero rows, counted
            return {"tokens": torch.zeros(0, 2, dtype=torch.long), "labels": torch.zeros(0, 2, dtype=torch.long),
                    "pixels": torch.zeros(0, 1, 3, side, side), "num_skipped": len(samples), "skipped": skipped}
        length = max(len(s["ids"]) for s in good)
        images = max(s["pixels"].shape[0] for s in good)
        pad = self.config.lm.pad_token_id
        tokens = torch.full((len(good), length), pad, dtype=torch.long)
        labels = torch.full((len(good), length), IGNORE, dtype=torch.long)
        pixels = torch.zeros(len(good), images, *good[0]["pixels"].shape[1:])
        for row, sample in enumerate(good):
            tokens[row, : len(sample["ids"])] = torch.tensor(sample["ids"])
            labels[row, : len(sample["labels"])] = torch.tensor(sample["labels"])
            pixels[row, : sample["pixels"].shape[0]] = sample["pixels"]
        return {"tokens": tokens, "labels": labels, "pixels": pixels, "num_skipped": len(samples) - len(good), "skipped": skipped}


def document_ids(segments: Sequence[dict], tokenizer, config: FlamingoConfig, close_last: bool = True
                 ) -> tuple[list[int], list[int], int]:
    """Token ids of a document, its labels, and how many of its images survived the context cut.

    [bos] then per segment: an image -> `<image>`; a text -> its tokens and `<|endofchunk|>` (the
    last text without it when `close_last` is False: a prompt the model continues). Labels copy the
    ids except bos, `<image>` and anything before the first image (-100), as OpenFlamingo masks MMC4.
    """
    lm = config.lm
    ids = [lm.bos_token_id] if lm.bos_token_id is not None else []
    labels = [IGNORE] * len(ids)
    seen_image = False
    texts = [index for index, item in enumerate(segments) if "text" in item]
    for index, item in enumerate(segments):
        if "image" in item:
            ids.append(config.media_token_id)
            labels.append(IGNORE)
            seen_image = True
            continue
        text = item["text"]
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        if close_last or index != texts[-1]:
            piece = piece + [config.end_of_chunk_id]
        ids += piece
        labels += piece if seen_image else [IGNORE] * len(piece)
    ids, labels = ids[: lm.context_length], labels[: lm.context_length]
    return ids, labels, sum(token == config.media_token_id for token in ids)


@register_family
class Flamingo(Generative, VLModel):
    family = "flamingo"
    config_class = FlamingoConfig
    export_formats = {"hf": "vlmkit.interop.hf_idefics:export"}  # IdeficsForVisionText2Text (IDEFICS-shaped configs)
    capabilities = (Generates, Answers, AnswersInContext, CaptionsInContext, Chats)
    training_class = FlamingoTraining
    towers = {"image": "visual", "text": "lm"}
    tower_configs = {"image": "vision", "text": "lm"}

    def __init__(self, config: FlamingoConfig) -> None:
        super().__init__(config)
        lm, vision = config.lm, config.vision
        self.visual = build_vision_tower(vision, None)
        r = config.resampler
        self.resampler = PerceiverResampler(vision.width, r.depth, r.heads, r.head_dim, r.num_latents, r.ff_mult, r.activation)
        self.lm = DecoderLM.from_config(lm)
        # The two new tokens' input rows and output rows (IDEFICS's decoupled embedding / linear).
        self.extra_embedding = nn.Embedding(2, lm.width)
        self.extra_head = nn.Linear(lm.width, 2, bias=False)
        nn.init.normal_(self.extra_embedding.weight, std=0.02)
        self.gated = nn.ModuleDict({
            str(index): GatedCrossAttentionBlock(
                lm.width, vision.width, config.cross_attention_heads, config.cross_attention_mlp_hidden or 4 * lm.width,
                config.cross_attention_norm, config.cross_attention_norm_eps, config.cross_attention_activation,
                config.cross_attention_gated_mlp)
            for index in config.cross_attention_layers
        })
        self.lock("text")  # Flamingo's defining choice: the LM and the vision encoder never change
        self.lock("image")
        self.generation_config = GenerationConfig(max_new_tokens=20)
        self.cache_media_kv = True  # False recomputes the visual keys/values every decoding step (benchmarks)

    def after_pretrained_towers(self) -> None:
        """New token rows start at the mean of the pretrained LM's rows (as HF's resize_token_embeddings)."""
        with torch.no_grad():
            self.extra_embedding.weight.copy_(self.lm.token_embedding.weight.mean(dim=0).expand(2, -1))
            head = self.lm.lm_head.weight if self.lm.lm_head is not None else self.lm.token_embedding.weight
            self.extra_head.weight.copy_(head.mean(dim=0).expand(2, -1))

    # ---- the model -------------------------------------------------------------------------------
    def media(self, pixels: torch.Tensor) -> torch.Tensor:
        """Resampled visual tokens of each row's images. (B, M, 3, H, W) -> (B, M * L, W)"""
        batch, count = pixels.shape[:2]
        if count == 0:
            return pixels.new_zeros(batch, 0, self.config.vision.width)
        tokens = self.visual(pixels.flatten(0, 1)).tokens  # (B*M, 1+P, W)
        if self.config.vision_tokens == "patches":
            tokens = tokens[:, 1:]  # (B*M, P, W)
        latents = self.resampler(tokens)  # (B*M, L, W)
        return latents.reshape(batch, count * latents.shape[1], latents.shape[2])  # (B, M*L, W)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, the two new tokens from `extra_embedding`. (B, T) -> (B, T, D)"""
        vocab = self.config.lm.vocab_size
        is_extra = tokens >= vocab
        base = self.lm.embed_tokens(tokens.masked_fill(is_extra, 0))  # (B, T, D)
        extra = self.extra_embedding((tokens - vocab).clamp(min=0, max=1)).to(base.dtype)  # (B, T, D)
        return torch.where(is_extra[..., None], extra, base)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the LM's vocabulary and the two new tokens. (B, T, V + 2)"""
        return torch.cat([self.lm.logits(hidden), self.extra_head(hidden)], dim=-1)

    def hidden(self, tokens: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
               cache: KVCache | None = None, **lm_options) -> torch.Tensor:
        """The LM's final hidden states with the gated blocks in (B, T, D).

        `media_locations` (B, T_all) marks `<image>` over the whole sequence (default: `tokens`
        itself); with a cache, `tokens` are its last T positions and their media mask rows are kept.
        """
        locations = tokens == self.config.media_token_id if media_locations is None else media_locations
        per_image = self.config.resampler.num_latents
        mask, attends_any = media_mask(locations, media.shape[1] // per_image, per_image)  # (B,1,T_all,M*L), (B,T_all)
        mask, attends_any = mask[:, :, -tokens.shape[1]:], attends_any[:, -tokens.shape[1]:]

        def before_block(index: int, x: torch.Tensor) -> torch.Tensor:
            block = self.gated[str(index)] if str(index) in self.gated else None
            if block is None:
                return x
            layer = cache.layer(f"gated{index}.cross") if cache is not None and self.cache_media_kv else None
            return block(x, media, mask, attends_any, layer)

        return self.lm(inputs_embeds=self.embed(tokens), cache=cache, before_block=before_block, return_hidden=True,
                       **lm_options)  # (B, T, D)

    def caption_layout(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A caption batch `[bos] caption [eos] pad...` (B, L) as a one-chunk document: `<image>` after
        [bos] (B, L+1), and its labels (B, L+1): the caption through its end token."""
        media = torch.full_like(tokens[:, :1], self.config.media_token_id)
        document = torch.cat([tokens[:, :1], media, tokens[:, 1:]], dim=1)  # (B, L+1)
        eos = self.config.lm.eos_token_id
        trained = real_tokens_through_end(tokens, eos) if eos is not None else torch.ones_like(tokens, dtype=torch.bool)
        labels = document.masked_fill(~torch.cat([torch.zeros_like(trained[:, :2]), trained[:, 1:]], dim=1), IGNORE)
        return document, labels

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens, pixels = batch["tokens"], batch["pixels"]  # documents (B, T) and (B, M, 3, H, W)
        caption_batch = pixels.ndim == 4  # one image per row (B, 3, H, W), tokens a plain caption
        if caption_batch:
            tokens, labels = self.caption_layout(tokens)  # (B, L+1) x 2
            pixels = pixels[:, None]  # (B, 1, 3, H, W)
        else:
            labels = batch["labels"]  # (B, T): -100 on bos, <image>, pads
        media = self.media(pixels)  # (B, M*L, W)
        # Right padding needs no attention mask: causality keeps every real token from the pads after it.
        logits = self.logits(self.hidden(tokens[:, :-1], media))  # (B, T-1, V+2)
        targets = labels[:, 1:]  # (B, T-1)
        if caption_batch:  # from the <image> position on: the caption's logits (B, L-1), as a captioner's
            logits, targets = logits[:, 1:], targets[:, 1:]
        is_target = targets != IGNORE
        loss, logs = lm_loss_and_logs(logits, targets.masked_fill(~is_target, 0), is_target,
                                      self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    # ---- prompts and decoding ------------------------------------------------------------------------
    def _rows(self, documents: Sequence[Sequence[dict]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt documents (segments with pixels (3, H, W) as images, the last text left open) ->
        left-padded ids (B, T0), each row's pad count (B,), media (B, M*L, W)."""
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
        rows = []
        for segments in documents:
            ids, _, kept = document_ids(segments, self.tokenizer, self.config, close_last=False)
            images = [item["image"] for item in segments if "image" in item]
            if len(ids) >= self.config.lm.context_length or kept != len(images):
                raise UserError(f"the prompt of {len(ids)} tokens does not fit the model's context of "
                                f"{self.config.lm.context_length}; use fewer or shorter examples")
            rows.append((ids, images))
        width = max(len(ids) for ids, _ in rows)
        count = max(len(images) for _, images in rows)
        tokens = torch.full((len(rows), width), self.config.lm.pad_token_id, dtype=torch.long)
        pixels = torch.zeros(len(rows), count, 3, self.config.vision.image_size, self.config.vision.image_size)
        for row, (ids, images) in enumerate(rows):
            tokens[row, width - len(ids):] = torch.tensor(ids)
            if images:
                pixels[row, : len(images)] = torch.stack([image.cpu() for image in images])
        num_pad = torch.tensor([width - len(ids) for ids, _ in rows])
        return tokens.to(self.device), num_pad.to(self.device), self.media(pixels.to(self.device))

    def decoding_step(self, num_pad: torch.Tensor, media: torch.Tensor):
        """The step function of `generation.generate` after left-padded prompts with `media` (B, M*L, W)."""
        media_id = self.config.media_token_id

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            start = cache.length if cache is not None else 0
            pads = num_pad.index_select(0, rows)  # (N,)
            key_is_real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= pads[:, None]  # (N, K)
            positions = (torch.arange(start, tokens.shape[1], device=tokens.device)[None, :] - pads[:, None]).clamp(min=0)
            hidden = self.hidden(tokens[:, start:], media.index_select(0, rows), tokens == media_id, cache=cache,
                                 mask=padding_mask(key_is_real), position_ids=positions)  # (N, T', D)
            return self.logits(hidden[:, -1])  # (N, V+2)

        return step

    @torch.no_grad()
    def generate_documents(self, documents: Sequence[Sequence[dict]], stream: Callable[[str], None] | None = None,
                           **decoding) -> list[str]:
        """Continuations of prompt documents (segments: {"image": pixels (3, H, W)} / {"text": str}).

        Decoding stops at `<|endofchunk|>` or the LM's end token; `decoding` takes GenerationConfig fields.
        """
        was_training = self.training
        self.eval()
        try:
            tokens, num_pad, media = self._rows(documents)
            config = GenerationConfig.from_kwargs(self.generation_config, **decoding)
            room = self.config.lm.context_length - tokens.shape[1]
            config = GenerationConfig.from_kwargs(config, max_new_tokens=min(config.max_new_tokens, room),
                                                  min_new_tokens=min(config.min_new_tokens, room),
                                                  stop_token_ids=(*config.stop_token_ids, self.config.end_of_chunk_id,
                                                                  self.config.media_token_id))  # an image is never text
            eos = self.config.lm.eos_token_id
            on_token = TextStreamer(self.tokenizer, {eos, *config.stop_token_ids}, stream) if stream is not None else None
            output = generate(self.decoding_step(num_pad, media), tokens, config, eos_token_id=eos,
                              pad_token_id=self.config.lm.pad_token_id, tokenizer=self.tokenizer, on_token=on_token)
            if on_token is not None:
                on_token.finish()
            return [text.strip() for text in output.texts]
        finally:
            self.train(was_training)

    @staticmethod
    def prompt_segments(images: Sequence[torch.Tensor], text: str) -> list[dict]:
        """A prompt about `images`: where its `<image>` markers say (one per image), else the images first."""
        parts = split_at_images(text, len(images))
        segments = []
        for index, part in enumerate(parts):
            if part:
                segments.append({"text": part})
            if index < len(images):
                segments.append({"image": images[index]})
        return segments + [{"text": ""}] if not segments or "image" in segments[-1] else segments

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Each row: `<image>` then its prompt (nothing: a caption)."""
        texts = prompts if prompts is not None else [""] * pixels.shape[0]
        tokens, num_pad, media = self._rows([self.prompt_segments([image], text) for image, text in zip(pixels, texts)])
        return self.decoding_step(num_pad, media), tokens

    def generate(self, pixels: torch.Tensor, prompt: str | Sequence[str] | None = None, **decoding) -> list[str]:
        """Captions of `pixels` (B, 3, H, W), each continuing its prompt; stops at the end of the chunk."""
        prompts = [prompt] * pixels.shape[0] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if prompts is not None and len(prompts) != pixels.shape[0]:
            raise UserError(f"got {len(prompts)} prompts for {pixels.shape[0]} images; give one prompt, or one per image")
        texts = prompts or [""] * pixels.shape[0]
        return self.generate_documents([self.prompt_segments([image], text) for image, text in zip(pixels, texts)], **decoding)

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """Short answers after "Question: q Answer:" (greedy, at most 5 tokens by default)."""
        return self.answer_in_context(pixels, questions, [[] for _ in questions], **decoding)

    def answer_in_context(self, pixels: torch.Tensor, questions: list[str],
                          examples: Sequence[Sequence[tuple[torch.Tensor, str, str]]], **decoding) -> list[str]:
        """Few-shot VQA: each row's examples (<image> Question: q Answer: a <|endofchunk|>) precede its query."""
        if len(examples) != len(questions) or len(questions) != pixels.shape[0]:
            raise UserError(f"got {pixels.shape[0]} images, {len(questions)} questions and {len(examples)} example lists; "
                            f"give one of each per row")
        decoding.setdefault("max_new_tokens", 5)
        documents = []
        for image, question, shots in zip(pixels, questions, examples):
            segments = [part for shot_image, q, a in shots for part in ({"image": shot_image}, {"text": qa_text(q, a)})]
            documents.append(segments + self.prompt_segments([image], qa_text(question)))
        return self.generate_documents(documents, **decoding)

    def caption_in_context(self, pixels: torch.Tensor, examples: Sequence[Sequence[tuple[torch.Tensor, str]]],
                           **decoding) -> list[str]:
        """Few-shot captioning: each row's (image, caption) examples precede its image."""
        if len(examples) != pixels.shape[0]:
            raise UserError(f"got {pixels.shape[0]} images and {len(examples)} example lists; give one list per image")
        documents = [[part for shot_image, caption in shots for part in ({"image": shot_image}, {"text": caption})]
                     + [{"image": image}, {"text": ""}] for image, shots in zip(pixels, examples)]
        return self.generate_documents(documents, **decoding)

    def chat(self, pixels: torch.Tensor | None, messages: list[dict], stream: Callable[[str], None] | None = None,
             **decoding) -> str:
        """The reply to a conversation about images `pixels` (N, 3, H, W) (or (3, H, W), or None).

        Turns are {"role": "user" | "assistant", "content"}; a user turn reads as "Question: ...
        Answer:", as the model was trained. `<image>` markers in the turns place the images, one
        marker per image (without markers every image leads the first turn).
        """
        turns = check_messages(messages, "the chat", prompt=True)
        images = [] if pixels is None else list(pixels[None] if pixels.ndim == 3 else pixels)
        asked = [text for role, text in turns if role == "human"]
        split_at_images("".join(asked), len(images), "the chat")  # one marker per image, or none
        markers = sum(text.count(MEDIA_TOKEN) for text in asked)
        pending = iter(images)
        segments: list[dict] = []
        for number in range(0, len(turns), 2):
            question = turns[number][1]
            count = question.count(MEDIA_TOKEN) if markers else (len(images) if number == 0 else 0)
            segments += [{"image": next(pending)} for _ in range(count)]  # a turn's images lead its question
            reply = turns[number + 1][1] if number + 1 < len(turns) else None
            segments.append({"text": qa_text(question.replace(MEDIA_TOKEN, " ").strip(), reply)})
        return self.generate_documents([segments], stream=stream, **decoding)[0]

    # ---- training hooks ---------------------------------------------------------------------------
    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        """Captions, questions and answers, and the documents' texts (unused with init_text)."""
        texts = record_texts(records, questions=True)
        texts += [item["text"] for record in records for item in record.get("segments") or [] if "text" in item]
        return texts

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        return InterleavedDataset(records, transform, tokenizer, self.config, self.training_options, seed)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """A caption batch (pixels (B, 3, S, S), tokens [bos] text [eos] pad...); `forward` reads it as
        one-image documents (the interleaved layout is what the training dataset gives)."""
        batch = random_prefixed_batch(self.config.vision.image_size, self.config.lm, 1, batch_size, seed)
        if self.config.lm.bos_token_id is not None:
            batch["tokens"][:, 0] = self.config.lm.bos_token_id
        return batch


register_config("flamingo-tiny", "flamingo", tiny=True, config={
    # 64 px ViT (patch 8: 64 patches) -> a 1-layer resampler with 8 latents -> gated blocks before
    # LM blocks 1 and 3 of lm-tiny's shape (Llama style, width 128). init_text sets the LM.
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
    "lm": lm_config_llama(vocab_size=1024, context_length=128, width=128, depth=4, heads=4, kv_heads=2, mlp_hidden=344,
                          bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
    "resampler": {"depth": 1, "heads": 4, "head_dim": 16, "num_latents": 8, "ff_mult": 2},
    "cross_attention_every": 2,
    "cross_attention_heads": 4,
    "cross_attention_mlp_hidden": 256,
})
register_config("openflamingo-3b", "flamingo", config={
    # OpenFlamingo-3B's shape: CLIP ViT-L/14 (patch tokens), 6-layer resampler with 64 latents, a
    # gated block before every block of a 24-layer LM (MPT-1B there; here the library's Llama style).
    "vision": {"type": "vit", "image_size": 224, "patch_size": 14, "width": 1024, "depth": 24, "heads": 16,
               "activation": "quick_gelu"},
    "lm": lm_config_llama(vocab_size=50277, context_length=2048, width=2048, depth=24, heads=16, mlp_hidden=8192,
                          bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "cross_attention_every": 1,
})
