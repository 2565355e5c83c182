"""BLIP-2 stage 1 (Li et al. 2023; LAVIS blip2_qformer.py): a frozen image encoder, the Q-Former, three losses.

image -> frozen ViT -> ln_vision (the ViT's norm_post, trainable) -> image features (B, N, W)
[query_tokens (Nq learned) ; text] -> Q-Former (encoders/qformer.py), the queries cross-attending to
the image features every `cross_attention_frequency` blocks; one stack run under three masks
(layers/masks.qformer_mask):
  ITC  unimodal mask, [queries ; [CLS] text]: query outputs -> vision_proj (B, Nq, E), text [CLS] ->
       text_proj (B, E); similarity = max over the queries / temperature; CE with label smoothing 0.1
  ITM  bi-directional mask on [pos ; text + hard-negative image ; image + hard-negative text]:
       itm_head(query outputs).mean over queries -> (3B, 2)
  ITG  multimodal causal mask, [queries ; [DEC] text]: the BERT LM head on the text positions,
       label smoothing 0.1
Total = itc + itm + itg. Start the Q-Former from MiniLM / BERT with `init_text` (the query FFN
starts as a copy of the text FFN, the cross-attention is new, as LAVIS does from bert-base), and the
image encoder from a vlmkit ViT run with `init_image`; it stays frozen (`lock_image`).

`encode_image` returns the mean of the normalised query features (one vector per image, what the
library's retrieval and zero-shot tasks take); BLIP-2's own ITC similarity, the max over queries,
is `itc_similarity`.

Stage 2 (`blip2_lm`, blip2_opt.py) is the second family of this file: the same image side, its query
outputs linearly projected into a frozen decoder-only LM as a soft prompt (captioning, VQA).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Answers, Chats, EmbedsImages, EmbedsTexts, Generates, MatchesImageText
from vlmkit.data.loader import ImageTextDataset, batch_seed
from vlmkit.data.records import check_messages, qa_text, record_texts
from vlmkit.encoders.config import LMConfig, TextConfig, VisionConfig, build_vision_tower, lm_config_llama
from vlmkit.encoders.lm import DecoderLM, random_prefixed_batch, random_texts
from vlmkit.encoders.qformer import ImageKeys, QFormer
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig, embedded_prompt_step, left_pad_embeddings
from vlmkit.layers.masks import qformer_mask, real_tokens_through_end
from vlmkit.layers.mlp import BertLMHead
from vlmkit.losses import lm_loss_and_logs, sample_hard_negatives
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family

DEC_TOKEN = "[DEC]"


def _qformer_text(**overrides) -> TextConfig:
    """bert-base-uncased as the Q-Former's shape: post-LN, embedding LayerNorm, [CLS] pooling, 32 text positions."""
    values = dict(vocab_size=30523, context_length=512, width=768, depth=12, heads=12, causal=False, pool="cls",
                  eos_token_id=102, pad_token_id=0, prenorm=False, embed_norm=True, type_vocab_size=0, norm_eps=1e-12)
    return TextConfig(**{**values, **overrides})


class QueryEncoder(nn.Module):
    """The image side both stages share: frozen ViT -> ln_vision -> Q-Former queries. It is each
    stage's `image` tower, so stage 2 starts from a stage-1 run with `init_image: RUN`."""

    def __init__(self, vision: VisionConfig, text: TextConfig, num_query_tokens: int, cross_attention_frequency: int,
                 with_text: bool = True) -> None:
        super().__init__()
        self.visual = build_vision_tower(vision, None)
        self.visual.requires_grad_(False)  # frozen in both stages ...
        self.ln_vision.requires_grad_(True)  # ... but for its norm_post, which is LAVIS's ln_vision (HF's post_layernorm)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, text.width) * 0.02)
        self.qformer = QFormer(text.vocab_size, text.context_length, text.width, text.depth, text.heads,
                               context_dim=vision.width, cross_attention_frequency=cross_attention_frequency,
                               mlp_ratio=text.mlp_ratio, activation=text.activation, norm_eps=text.norm_eps,
                               dropout=text.dropout, text=with_text)

    @property
    def ln_vision(self) -> nn.LayerNorm:
        """The trainable LayerNorm on every image token: the ViT's own `norm_post` (HF's `post_layernorm`)."""
        return self.visual.norm_post

    def train(self, mode: bool = True) -> "QueryEncoder":
        super().train(mode)
        self.visual.eval()  # frozen: no dropout / drop-path in it, ever
        return self

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's last hidden state through ln_vision, what the queries cross-attend to. (B, N, W)"""
        with torch.no_grad():
            tokens = self.visual(pixels).tokens  # (B, 1+N, W)
        return self.ln_vision(tokens)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The query outputs (B, Nq, D) of images (B, 3, H, W), queries alone (no text)."""
        image = self.image_features(pixels)
        return self.qformer(self.query_tokens.expand(pixels.shape[0], -1, -1), context=image)


def query_encoder_state(state: dict, expected: dict) -> dict:
    """`init_image` into a QueryEncoder: a BLIP-2 run's query encoder as it is (a stage-2 one without
    the Q-Former's text side, which stage 2 does not hold); a plain ViT (a CLIP run's image tower)
    becomes `visual.*` (its ln_post then starts ln_vision), and the rest (queries, Q-Former) keeps its own initialisation."""
    if any(key.startswith("qformer.") for key in state):
        text_only = (".token_embedding.", ".positional_embedding", ".mlp.", ".norm2.")
        return {key: value for key, value in state.items()
                if key in expected or not any(part in "." + key for part in text_only)}
    # Every key of the source goes in (a mismatch fails the strict load, loudly); only the parts a ViT lacks are kept.
    own = {key: value for key, value in expected.items() if not key.startswith("visual.")}
    return {**own, **{f"visual.{key}": value for key, value in state.items()}}


@dataclass
class BLIP2Config:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=14, width=1024, depth=24, heads=16))
    text: TextConfig = field(default_factory=_qformer_text)  # the Q-Former's BERT shape and vocabulary
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # cross-attention in blocks 0, f, 2f, ...
    embed_dim: int = 256  # the ITC space (vision_proj / text_proj)
    dec_token_id: int | None = 30522  # [DEC], the first token of ITG texts
    init_temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.vision.type != "vit":
            raise UserError("BLIP-2's frozen image encoder is a ViT; set vision.type 'vit'")
        if self.text.causal or self.text.prenorm or not self.text.embed_norm:
            raise UserError("the Q-Former is BERT-style; set text.causal false, text.prenorm false and text.embed_norm true")
        if self.text.eos_token_id is None:
            raise UserError("the Q-Former needs text.eos_token_id ([SEP], where ITG targets end)")
        if self.num_query_tokens < 1:
            raise UserError(f"num_query_tokens must be at least 1, got {self.num_query_tokens}")
        if self.cross_attention_frequency < 1:
            raise UserError(f"cross_attention_frequency must be at least 1, got {self.cross_attention_frequency}")
        if self.dec_token_id is None or not 0 <= self.dec_token_id < self.text.vocab_size:
            raise UserError(f"dec_token_id {self.dec_token_id} is outside the vocabulary of {self.text.vocab_size} tokens")
        if self.init_temperature <= 0:
            raise UserError(f"init_temperature must be positive, got {self.init_temperature}")


@dataclass
class BLIP2Training:
    """The recipe's `training:` options of BLIP-2 stage 1."""

    label_smoothing: float = 0.1  # ITC and ITG (LAVIS blip2_qformer.py / Qformer.py)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"training.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class SeededPairs(ImageTextDataset):
    """Image-caption pairs whose `collate` adds `negative_seed`, so the ITM hard negatives of a batch
    are drawn from a seed of the batch itself and a resumed run draws what the uninterrupted one drew."""

    def collate(self, samples) -> dict:
        batch = super().collate(samples)
        batch["negative_seed"] = batch_seed(self.seed, self.epoch, batch["indices"])
        return batch


@register_family
class BLIP2(VLModel):
    family = "blip2"
    config_class = BLIP2Config
    capabilities = (EmbedsImages, EmbedsTexts, MatchesImageText)
    training_class = BLIP2Training
    towers = {"image": "query_encoder", "text": "qformer"}
    uses_every_parameter = True  # ITC, ITM and ITG together reach every trainable tensor

    def __init__(self, config: BLIP2Config) -> None:
        super().__init__(config)
        text = config.text
        self.query_encoder = QueryEncoder(config.vision, text, config.num_query_tokens, config.cross_attention_frequency)
        self.vision_proj = nn.Linear(text.width, config.embed_dim)
        self.text_proj = nn.Linear(text.width, config.embed_dim)
        self.itm_head = nn.Linear(text.width, 2)
        self.lm_head = BertLMHead(text.width, text.vocab_size, text.activation, text.norm_eps)
        self.temperature = nn.Parameter(torch.tensor(float(config.init_temperature)))

    @property
    def qformer(self) -> QFormer:
        """The Q-Former (the `text` tower: `init_text` starts it from BERT / MiniLM)."""
        return self.query_encoder.qformer

    # ---- features ----------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's last hidden state through ln_vision. (B, N, W)"""
        return self.query_encoder.image_features(pixels)

    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_encoder.query_tokens.expand(batch, -1, -1)  # (B, Nq, D)

    def query_outputs(self, image: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query outputs (B, Nq, D) for image features (B, N, W), queries alone."""
        return self.qformer(self._queries(image.shape[0]), context=image)

    def _text_is_real(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens != self.config.text.pad_token_id  # (B, T)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim): the mean of the normalised per-query ITC features."""
        self.require(EmbedsImages, task="encode_image")
        features = F.normalize(self.vision_proj(self.query_outputs(self.image_features(pixels))), dim=-1)  # (B, Nq, E)
        return features.mean(dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) [CLS] text [SEP] ids -> (B, embed_dim): text_proj of the text-only [CLS] (not normalised)."""
        self.require(EmbedsTexts, task="encode_text")
        mask = qformer_mask("itc", 0, self._text_is_real(tokens))
        return self.text_proj(self.qformer(tokens=tokens, mask=mask)[:, 0])

    def itc_similarity(self, query_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """BLIP-2's image-text similarity (Bi, Bt): max over the queries of normalised (B, Nq, E) . (B, E)."""
        query_features, text_features = F.normalize(query_features, dim=-1), F.normalize(text_features, dim=-1)
        return torch.einsum("iqe,te->itq", query_features, text_features).amax(dim=-1)  # (Bi, Bt)

    def itm_logits(self, image: torch.Tensor | ImageKeys, tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) [no match, match] of text row b against image-feature row b (B, N, W)
        (or its `ImageKeys`)."""
        num_queries = self.config.num_query_tokens
        mask = qformer_mask("itm", num_queries, self._text_is_real(tokens))
        hidden = self.qformer(self._queries(tokens.shape[0]), tokens, mask=mask, context=image, queries_only=True)
        return self.itm_head(hidden).mean(dim=1)  # (B, 2): averaged over the (B, Nq, D) query outputs

    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) probability that text row b describes image row b (softmax of the ITM head)."""
        return self.itm_logits(self.image_features(pixels), tokens).softmax(dim=-1)[:, 1]

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, W): the image features `match_scores` cross-attends to."""
        return self.image_features(pixels)

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the ITM head's "match" logit."""
        return self.itm_logits(image_features, tokens)[:, 1]

    # ---- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pixels, tokens = batch["pixels"], batch["tokens"]  # (B, 3, H, W), (B, T): [CLS] caption [SEP] pad
        options, config = self.training_options, self.config
        size, num_queries = tokens.shape[0], config.num_query_tokens
        if size < 2:
            raise UserError("BLIP-2's ITM loss needs at least 2 image-text pairs per batch (hard negatives); raise batch_size")
        image = self.image_features(pixels)  # (B, N, W)
        # The three passes attend to the same images: project them into each cross-attention once.
        image_keys = self.qformer.image_keys(image)
        text_is_real = self._text_is_real(tokens)  # (B, T)
        queries = self._queries(size)  # (B, Nq, D)

        # ITC: one pass under the unimodal mask is the two separate passes of LAVIS (queries / text alone).
        hidden = self.qformer(queries, tokens, mask=qformer_mask("itc", num_queries, text_is_real), context=image_keys)
        query_features = self.vision_proj(hidden[:, :num_queries])  # (B, Nq, E)
        text_features = self.text_proj(hidden[:, num_queries])  # (B, E): the text's [CLS]
        sim_i2t = self.itc_similarity(query_features, text_features) / self.temperature  # (B, B)
        sim_t2i = sim_i2t.T
        labels = torch.arange(size, device=tokens.device)
        itc = (F.cross_entropy(sim_i2t.float(), labels, label_smoothing=options.label_smoothing)
               + F.cross_entropy(sim_t2i.float(), labels, label_smoothing=options.label_smoothing)) / 2

        # ITM: [pairs ; each text with a hard negative image ; each image with a hard negative text]
        seed = batch.get("negative_seed", None if self.training else 0)
        generator = None if seed is None else torch.Generator(device=sim_t2i.device).manual_seed(int(seed))
        negative_images = sample_hard_negatives(sim_t2i.detach(), generator)  # (B,)
        negative_texts = sample_hard_negatives(sim_i2t.detach(), generator)  # (B,)
        pairs = torch.arange(size, device=tokens.device)
        itm_images = image_keys.rows(torch.cat([pairs, negative_images, pairs]))  # 3B images' keys and values
        itm_texts = torch.cat([tokens, tokens, tokens[negative_texts]], dim=0)  # (3B, T)
        itm_logits = self.itm_logits(itm_images, itm_texts)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(size), torch.zeros(2 * size)]).long().to(itm_logits.device)
        itm = F.cross_entropy(itm_logits.float(), itm_labels)

        # ITG: [queries ; [DEC] caption] under the multimodal causal mask; the text predicts its next token.
        inputs = tokens[:, :-1].clone()
        inputs[:, 0] = config.dec_token_id  # (B, T-1)
        mask = qformer_mask("itg", num_queries, self._text_is_real(inputs))
        hidden = self.qformer(queries, inputs, mask=mask, context=image_keys)[:, num_queries:]  # (B, T-1, D)
        logits = self.lm_head(hidden, self.qformer.token_embedding.weight)  # (B, T-1, V)
        target_mask = real_tokens_through_end(tokens, config.text.eos_token_id)[:, 1:]  # through [SEP]
        itg, lm_logs = lm_loss_and_logs(logits, tokens[:, 1:], target_mask, options.label_smoothing)

        loss = options.itc_weight * itc + options.itm_weight * itm + options.itg_weight * itg
        with torch.no_grad():
            logs = {"itm_acc": (itm_logits.argmax(dim=1) == itm_labels).float().mean(),
                    "i2t_acc": (sim_i2t.argmax(dim=1) == labels).float().mean(),
                    "token_acc": lm_logs["token_acc"], "temperature": self.temperature.detach().clone()}
        return ModelOutput(loss=loss, logs={**detached_logs(loss=loss, itc=itc, itm=itm, itg=itg), **logs}, logits=logits)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, text = self.config.vision, self.config.text
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        return {"pixels": pixels, "tokens": random_texts(text, batch_size, generator)}

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        base = super().training_dataset(records, transform, tokenizer, seed, caption)  # checks the records
        return SeededPairs(base.records, transform, tokenizer=tokenizer, caption=caption, seed=seed)

    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict, tokenizer) -> dict:
        """The Q-Former's tokenizer is BERT's plus [DEC] (added here when missing)."""
        add = getattr(tokenizer, "add_special_tokens", None)
        if add is None:  # a stand-in vocabulary of a known size (`train --dry-run`): its last id
            config = super().adapt_config_to_tokenizer(config, tokenizer)
            dec_id = tokenizer.vocab_size - 1
        else:
            (dec_id,) = add([DEC_TOKEN])
            config = super().adapt_config_to_tokenizer(config, tokenizer)
        config["dec_token_id"] = dec_id
        return config

    # ---- a pretrained Q-Former (init_text: BERT / MiniLM) --------------------------------------
    @classmethod
    def adapt_pretrained_tower_config(cls, role: str, section: dict) -> dict:
        """A BERT-family text tower becomes the Q-Former's shape: [CLS] pooled, no token types."""
        if role == "text":
            section = {**section, "pool": "cls", "causal": False, "type_vocab_size": 0,
                       "eos_token_id": section.get("eos_token_id") or 0}
        return section

    def adapt_pretrained_tower_state(self, role: str, state: dict, expected: dict) -> dict:
        """BERT weights into the Q-Former: token type 0 folded into the positions (exact), each query
        FFN a copy of the text FFN (LAVIS copies `*_query` from the text layers), cross-attention new."""
        if role == "image":
            return query_encoder_state(state, expected)
        state = dict(state)
        types = state.pop("type_embedding.weight", None)
        if types is not None:
            state["positional_embedding"] = state["positional_embedding"] + types[0]
        state.pop("final_norm.weight", None), state.pop("final_norm.bias", None)
        for key in expected:
            if key in state:
                continue
            if ".mlp_query." in key or ".norm2_query." in key:
                state[key] = state[key.replace("mlp_query.", "mlp.").replace("norm2_query.", "norm2.")]
            elif ".cross_attn." in key or ".norm_cross." in key:
                state[key] = expected[key]
        return state


# ---- stage 2: the query outputs prompt a frozen language model --------------------------------
@dataclass
class BLIP2LMConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=224, patch_size=14, width=1024, depth=24, heads=16))
    qformer: TextConfig = field(default_factory=_qformer_text)  # the stage-1 Q-Former's shape (no text side is built)
    lm: LMConfig = field(default_factory=LMConfig)
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    answer_prompt: str = "Question: {} Short answer:"  # LAVIS zero-shot VQA (vqav2_zeroshot_opt_eval.yaml)
    image_token_id: int | None = None  # HF's <image> id (kept from an HF folder for export; vlmkit never reads it)

    def __post_init__(self) -> None:
        if self.num_query_tokens < 1:
            raise UserError(f"num_query_tokens must be at least 1, got {self.num_query_tokens}")
        if self.cross_attention_frequency < 1:
            raise UserError(f"cross_attention_frequency must be at least 1, got {self.cross_attention_frequency}")
        if self.answer_prompt.count("{}") != 1:
            raise UserError(f"answer_prompt must hold one '{{}}' where the question goes, got {self.answer_prompt!r}")


@dataclass
class BLIP2LMTraining:
    """The recipe's `training:` options of BLIP-2 stage 2."""

    label_smoothing: float = 0.0  # blip2_opt.py: plain cross-entropy


@register_family
class BLIP2LM(Generative, VLModel):
    """BLIP-2 stage 2 (blip2_opt.py): query outputs -> language_projection -> a soft prompt of Nq
    embeddings in front of the frozen decoder-only LM; LM loss on the caption. The ViT and the LM are
    frozen; the Q-Former's query path and the projection learn. `init_image: RUN` takes a stage-1
    run's query encoder, `init_text: RUN` an lm run (or HF GPT-2 / Llama folder) and its tokenizer.

    [language_projection(queries) (B, Nq, D) ; embed([bos] caption)] -> LM -> next-token loss on the caption
    """

    family = "blip2_lm"
    config_class = BLIP2LMConfig
    export_formats = {"hf": "vlmkit.interop.hf_blip2:export"}
    capabilities = (Generates, Answers, Chats)
    training_class = BLIP2LMTraining
    towers = {"image": "query_encoder", "text": "lm"}
    tower_configs = {"image": "vision", "text": "lm"}
    uses_every_parameter = True  # the query path and the projection are in every step (the rest is frozen)

    def __init__(self, config: BLIP2LMConfig) -> None:
        super().__init__(config)
        # Query-only: the Q-Former's text side (embeddings, text FFN) is not part of stage 2 (as in LAVIS and HF).
        self.query_encoder = QueryEncoder(config.vision, config.qformer, config.num_query_tokens,
                                          config.cross_attention_frequency, with_text=False)
        self.language_projection = nn.Linear(config.qformer.width, config.lm.width)
        self.lm = DecoderLM.from_config(config.lm)
        self.lock("text")  # the LM never changes
        self.generation_config = GenerationConfig(max_new_tokens=20)

    def soft_prompt(self, pixels: torch.Tensor) -> torch.Tensor:
        """The Nq query outputs projected into the LM's input space. (B, Nq, D)"""
        return self.language_projection(self.query_encoder(pixels))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, L): [bos] caption [eos] pad...
        prompt = self.soft_prompt(batch["pixels"])  # (B, Nq, D)
        embeds = torch.cat([prompt, self.lm.embed_tokens(tokens[:, :-1])], dim=1)  # (B, Nq+L-1, D)
        logits = self.lm(inputs_embeds=embeds)[:, prompt.shape[1]:]  # (B, L-1, V): the text positions
        target_mask = real_tokens_through_end(tokens, self.config.lm.eos_token_id)[:, 1:]  # (B, L-1)
        loss, logs = lm_loss_and_logs(logits, tokens[:, 1:], target_mask, self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    def _prompt_rows(self, pixels: torch.Tensor, texts: list[str]) -> list[torch.Tensor]:
        """Each row: [soft prompt] [bos] text, (Nq + T, D)."""
        prompts = self.soft_prompt(pixels)  # (B, Nq, D)
        rows = []
        for prompt, text in zip(prompts, texts):
            ids = [self.tokenizer.bos_id] + (self.tokenizer.encode(text, add_special_tokens=False) if text else [])
            rows.append(torch.cat([prompt, self.lm.embed_tokens(torch.tensor([ids], device=prompt.device))[0]], dim=0))
        return rows

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Decoding continues after [soft prompt] [bos] prompt text (left-padded rows)."""
        texts = prompts if prompts is not None else [""] * pixels.shape[0]
        return embedded_prompt_step(self.lm, left_pad_embeddings(self._prompt_rows(pixels, texts)))

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """Answers generated after `answer_prompt` ("Question: q Short answer:"), short and greedy by default."""
        if len(questions) != pixels.shape[0]:
            raise UserError(f"got {pixels.shape[0]} images and {len(questions)} questions; give one question per image")
        decoding.setdefault("max_new_tokens", 5)
        rows = self._prompt_rows(pixels, [self.config.answer_prompt.format(q.strip()) for q in questions])
        return self.generate_from_embeddings(left_pad_embeddings(rows), **decoding).texts

    def chat(self, pixels: torch.Tensor | None, messages: list[dict], stream=None, **decoding) -> str:
        """The reply to a conversation about one image, `pixels` (1, 3, H, W) or (3, H, W).

        BLIP-2 has no chat template: as in the paper's prompted generation (its figure 4 dialogues),
        the turns are written as "Question: q Answer: a Question: q Answer:" after the soft prompt,
        and the LM continues. `stream` gets each new piece of text; `decoding` takes GenerationConfig fields.
        """
        turns = check_messages(messages, "the chat", prompt=True)
        if pixels is None:
            raise UserError("BLIP-2 chats about an image; give one (its LM is prompted by the image's queries)")
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[0] != 1:
            raise UserError(f"chat takes one image, pixels (1, 3, H, W) or (3, H, W); got {tuple(pixels.shape)}")
        dialogue = " ".join(qa_text(turns[number][1], turns[number + 1][1] if number + 1 < len(turns) else None)
                            for number in range(0, len(turns), 2))
        rows = self._prompt_rows(pixels, [dialogue])
        return self.generate_from_embeddings(left_pad_embeddings(rows), stream=stream, **decoding).texts[0]

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        """Captions plus questions and answers (unused with init_text, which brings the LM's tokenizer)."""
        return record_texts(records, questions=True)

    def adapt_pretrained_tower_state(self, role: str, state: dict, expected: dict) -> dict:
        """`init_image`: a stage-1 run's query encoder as it is, or a plain ViT into it (see query_encoder_state)."""
        return query_encoder_state(state, expected) if role == "image" else state

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        return random_prefixed_batch(self.config.vision.image_size, self.config.lm, self.config.num_query_tokens, batch_size, seed)


# ---- named configurations ------------------------------------------------------------------
register_config("blip2-tiny", "blip2", tiny=True, config={
    # 64 px images in 8 px patches -> 1+64 image features; 8 queries; a 4-block Q-Former of width 128
    # (cross-attention in blocks 0 and 2). Vocabulary and special ids come from the trainer's tokenizer.
    "embed_dim": 64, "num_query_tokens": 8, "cross_attention_frequency": 2,
    "vision": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4},
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 4, "heads": 4, "causal": False, "pool": "cls",
             "eos_token_id": 3, "pad_token_id": 0, "prenorm": False, "embed_norm": True, "type_vocab_size": 0,
             "norm_eps": 1e-12},
    "dec_token_id": 1023,
})
register_config("blip2-vit-l", "blip2", config={
    # BLIP-2 stage 1 on a CLIP ViT-L/14 (LAVIS clip_L) with a bert-base Q-Former and 32 queries.
    "vision": {"image_size": 224, "patch_size": 14, "width": 1024, "depth": 24, "heads": 16},
})
register_config("blip2-tiny-stage2", "blip2_lm", tiny=True, config={
    # blip2-tiny's image side (8 queries, a 4-block Q-Former of width 128) prompting lm-tiny's shape.
    "num_query_tokens": 8, "cross_attention_frequency": 2,
    "vision": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4},
    "qformer": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 4, "heads": 4, "causal": False,
                "pool": "cls", "eos_token_id": 3, "pad_token_id": 0, "prenorm": False, "embed_norm": True,
                "type_vocab_size": 0, "norm_eps": 1e-12},
    "lm": lm_config_llama(vocab_size=1024, context_length=128, width=128, depth=4, heads=4, kv_heads=2, mlp_hidden=344,
                          bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
})
