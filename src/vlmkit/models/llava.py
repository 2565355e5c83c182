"""LLaVA (Liu et al. 2023; LLaVA-1.5): a frozen CLIP vision tower, a projector, and the library's LM.

image -> ViT -> hidden_states[vision_feature_layer] (B, 1+P, W) -> drop CLS ("default") -> (B, K, W)
      -> projector (linear | Linear-GELU-Linear) -> K image tokens (B, K, D)
text  -> conversation template -> ids with one <image> placeholder, expanded to K copies (the collate,
         as HF's processor does) -> lm.embed_tokens -> image tokens masked_scatter'ed at the placeholders
      -> DecoderLM -> next-token loss on the replies (labels -100 on prompts, image tokens and pads)

Two stages (haotian-liu/LLaVA scripts/v1_5): `training: {stage: 1}` trains the projector alone on
captions laid out by the `plain` template (vision tower and LM locked); `stage: 2` trains projector
+ LM on conversations (`vicuna_v1` by default), in full or with LoRA adapters on the LM
(`training.lora_rank > 0`, targets `training.lora_targets`). Stage 2 starts from the stage-1 run with
the recipe key `init: RUN`. With LoRA the adapter layout is recorded in the config (`lora`), so the
run folder loads strictly with its adapters, and each checkpoint also writes `RUN/adapter/` in
PEFT's layout for the LM's HF Llama twin (`peft.PeftModel.from_pretrained(llama, RUN/adapter)`).

Parameter names stay close to HF `LlavaForConditionalGeneration`: `visual` (the CLIP vision tower,
vlmkit layout) ~ `vision_tower`, `projector.linear_1` / `projector.linear_2` ~
`multi_modal_projector.linear_1/2`, `lm` ~ `language_model`. The image placeholder id
(`image_token_id`, HF's `image_token_index`) is fitted to the tokenizer, which gets `<image>` as
a special token. Inference speaks the template the model was trained with (`template`, saved):
`generate` captions, `answer` gives short answers (LLaVA-1.5's "Answer the question using a single
word or phrase."), `chat` answers a multi-turn conversation, optionally streaming its text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vlmkit.capabilities import Answers, Chats, Generates
from vlmkit.config import to_dict
from vlmkit.data.conversation import (DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, ConversationDataset, encode_prompt,
                                      get_template)
from vlmkit.encoders.config import LMConfig, VisionConfig, build_vision_tower, lm_config_llama
from vlmkit.encoders.lm import DecoderLM
from vlmkit.errors import UserError
from vlmkit.generation import EmbeddedPrompts, Generative, GenerationConfig, embedded_prompt_step, left_pad_embeddings
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA-1.5's caption instruction
PROJECTORS = ("linear", "mlp2x_gelu")
# Every linear layer of the LM, as LLaVA's LoRA scripts adapt (q, k, v, o, gate, up, down).
ALL_LM_LINEARS = ("attn.qkv:q,k,v", "attn.out", "mlp.fc1:gate,up", "mlp.fc2")
ADAPTER_FOLDER = "adapter"


@dataclass
class LoRASettings:
    """LoRA adapters on the LM (set from the `training.lora_*` options; saved so the run loads with them)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LM_LINEARS  # layers.lora target specs, over the LM's module paths


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=336, patch_size=14, width=1024, depth=24,
                                                                      heads=16, activation="quick_gelu"))
    lm: LMConfig = field(default_factory=lambda: LMConfig(**lm_config_llama()))
    projector: str = "mlp2x_gelu"  # linear (LLaVA v1) | mlp2x_gelu (v1.5)
    projector_bias: bool = True  # HF's multimodal_projector_bias
    vision_feature_layer: int = -2  # index into the tower's hidden states (HF: 0 = embeddings after pre-LN, -1 = last)
    vision_feature_select_strategy: str = "default"  # default: drop the CLS token | full: keep it
    image_token: str = DEFAULT_IMAGE_TOKEN
    image_token_id: int | None = None  # fitted to the tokenizer (adapt_config_to_tokenizer)
    template: str = "vicuna_v1"  # the conversation template the model speaks (set by the training stage)
    lora: LoRASettings | None = None

    def __post_init__(self) -> None:
        if self.vision.type != "vit":
            raise UserError("LLaVA reads a ViT's hidden states; set vision.type to 'vit' (a CLIP ViT run as init_image)")
        if self.projector not in PROJECTORS:
            raise UserError(f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise UserError(f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}")
        states = self.vision.depth + 1  # the embeddings, then every block's output
        if not -states <= self.vision_feature_layer < states:
            raise UserError(f"vision_feature_layer {self.vision_feature_layer} is outside the {states} hidden states of a "
                            f"{self.vision.depth}-layer tower (use -{states}..{states - 1})")
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.lm.vocab_size:
            raise UserError(f"image_token_id {self.image_token_id} is outside the LM's vocabulary of {self.lm.vocab_size}")
        get_template(self.template)

    @property
    def num_image_tokens(self) -> int:
        """K: positions one image takes in the LM's sequence (patches, plus CLS for "full")."""
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        return patches + (self.vision_feature_select_strategy == "full")


@dataclass
class LlavaTraining:
    """The recipe's `training:` options of LLaVA (see the module docstring)."""

    stage: int = 2  # 1: projector on captions (plain template); 2: projector + LM on conversations
    template: str | None = None  # default: plain for stage 1, vicuna_v1 for stage 2 (saved as the model's template)
    max_length: int = 2048  # tokens per sample, image tokens included (longer samples are cut, and counted)
    # Stage 2 data: the records' conversations / dialogues, plus (as LLaVA-1.5's mix does with VQA and
    # caption sets) each record's `qa` as short-answer turns and its captions after CAPTION_PROMPT.
    conversation_types: tuple[str, ...] = ()  # dialogue types to keep (empty: all)
    include_qa: bool = True
    # Copies of each `qa` question of these types (e.g. {relation: 3}); other types once. A tiny LM
    # sees the rarer, harder types too seldom in a few hundred steps to learn them (see README).
    qa_repeats: dict[str, int] = field(default_factory=dict)
    include_captions: bool = True
    train_vision: bool = False  # the vision tower is frozen in both stages unless this is true
    lora_rank: int = 0  # stage 2: 0 = full fine-tuning of the LM, >0 = LoRA adapters of this rank instead
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_LM_LINEARS
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise UserError(f"training.stage must be 1 (projector on captions) or 2 (instruction tuning), got {self.stage}")
        if self.template is not None:
            get_template(self.template)
        if self.max_length < 1 or self.lora_rank < 0:
            raise UserError(f"training.max_length must be positive and lora_rank 0 or more; got {self.max_length}, {self.lora_rank}")
        for kind, copies in self.qa_repeats.items():
            if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
                raise UserError(f"training.qa_repeats.{kind} must be a whole number of copies (0 or more), got {copies!r}")
        if self.lora_rank and self.stage == 1:
            raise UserError("training.lora_rank applies to stage 2 (stage 1 trains the projector alone); drop it or set stage: 2")


def _fill_template(template) -> str:
    """A template's fixed text (system prompt and role markers) with empty messages."""
    return " ".join(part.replace("{system}", template.system).replace("{message}", "") for part in
                    (template.first_turn, template.turn))


class Projector(nn.Module):
    """Vision features (.., W) -> LM embeddings (.., D): `linear_1` [-> GELU -> `linear_2`] (HF's names)."""

    def __init__(self, kind: str, vision_width: int, lm_width: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, lm_width, bias=bias)
        self.act = nn.GELU() if kind == "mlp2x_gelu" else nn.Identity()
        self.linear_2 = nn.Linear(lm_width, lm_width, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.linear_1(features))
        return self.linear_2(x) if self.linear_2 is not None else x


def expand_image_placeholders(batch: dict, image_token_id: int, num_image_tokens: int, pad_id: int) -> dict:
    """The batch with each placeholder id in `input_ids` repeated `num_image_tokens` times (labels
    -100 there), rows re-padded on the right: what the model's forward reads. (B, L) -> (B, L')"""
    rows = []
    for ids, labels, real in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[real], labels[real]
        repeats = torch.where(ids == image_token_id, num_image_tokens, 1)  # (T,)
        expanded = labels.repeat_interleave(repeats)
        expanded[ids.repeat_interleave(repeats) == image_token_id] = IGNORE_INDEX
        rows.append((ids.repeat_interleave(repeats), expanded))
    length = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, L')
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, L')
    attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L')
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, row_labels, True
    return {**batch, "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class LlavaDataset(ConversationDataset):
    """`ConversationDataset` whose batches carry each image placeholder expanded to the model's K image tokens."""

    def __init__(self, *args, image_token_id: int, num_image_tokens: int, **kwargs) -> None:
        super().__init__(*args, tokens_per_image=num_image_tokens, **kwargs)
        self.image_token_id = image_token_id

    def collate(self, samples):
        return expand_image_placeholders(super().collate(samples), self.image_token_id, self.tokens_per_image,
                                         self.tokenizer.pad_id)


def caption_conversations(records: Sequence[dict], instruction: str | None) -> list[dict]:
    """One conversation record per (image, caption): `<image>` (+ the instruction) -> the caption."""
    human = DEFAULT_IMAGE_TOKEN + ("\n" + instruction if instruction else "")
    return [{"image": record["image"], "id": f"{record.get('id', record['image'])}#caption{k}",
             "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}]}
            for record in records if "image" in record for k, caption in enumerate(record.get("texts") or [])]


def short_answer_question(question: str) -> str:
    """A question as LLaVA-1.5 asks for a short answer (capitalised, then the single-word instruction)."""
    question = question.strip()
    return f"{question[:1].upper()}{question[1:]}\n{SHORT_ANSWER_PROMPT}"


def qa_conversations(records: Sequence[dict], repeats: dict[str, int] | None = None) -> list[dict]:
    """One short-answer conversation per question of each record's `qa` (its most common answer),
    `repeats[type]` copies of a question of that type (default one)."""
    from vlmkit.data.records import answers_of

    repeats = repeats or {}
    out = []
    for record in records:
        for k, item in enumerate(record.get("qa") or []):
            answers = answers_of(item)
            if "image" in record and answers:
                best = max(dict.fromkeys(answers), key=answers.count)
                conversation = {"image": record["image"], "id": f"{record.get('id', record['image'])}#qa{k}",
                                "conversations": [{"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{short_answer_question(item['question'])}"},
                                                  {"from": "gpt", "value": best}]}
                out += [conversation] * repeats.get(item.get("type"), 1)
    return out


@register_family
class Llava(Generative, VLModel):
    family = "llava"
    config_class = LlavaConfig
    capabilities = (Generates, Answers, Chats)
    training_class = LlavaTraining
    towers = {"image": "visual", "text": "lm"}
    tower_configs = {"image": "vision", "text": "lm"}
    export_formats = {"hf": "vlmkit.interop.hf_llava:export"}  # LlavaForConditionalGeneration
    example_config = {}

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self.visual = build_vision_tower(config.vision, None)
        self.projector = Projector(config.projector, config.vision.width, config.lm.width, config.projector_bias)
        self.lm = DecoderLM.from_config(config.lm)
        self.lock("image")  # LLaVA never trains its CLIP tower (training.train_vision unlocks it)
        if config.lora is not None:
            self._adapt(config.lora)
        self.generation_config = GenerationConfig(max_new_tokens=64)

    # ---- the model -------------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """K projected image tokens per image, in the LM's input space. (N, 3, H, W) -> (N, K, D)"""
        # HF's hidden_states indexing; the tower runs only the blocks up to the chosen layer.
        chosen = self.visual.hidden_state(pixels, self.config.vision_feature_layer)  # (N, 1+P, W)
        if self.config.vision_feature_select_strategy == "default":
            chosen = chosen[:, 1:]  # (N, P, W): the patches, CLS dropped
        return self.projector(chosen)  # (N, K, D)

    def embed_with_images(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image tokens of `pixels` (N, 3, H, W) at the placeholder positions
        of `input_ids` (B, L), in order (image n fills the n-th run of K placeholders). (B, L, D)"""
        embeds = self.lm.embed_tokens(input_ids)  # (B, L, D)
        is_image = input_ids == self.config.image_token_id  # (B, L)
        num_images, per_image = pixels.shape[0], self.config.num_image_tokens
        # (A meta tensor, as in `vlmkit train --dry-run`, has no values to count.)
        placeholders = int(is_image.sum()) if not is_image.is_meta else num_images * per_image
        if placeholders != num_images * per_image:
            raise UserError(f"the batch has {placeholders} image placeholders but {num_images} images x {per_image} tokens; "
                            f"expand each {self.config.image_token} to {per_image} placeholder ids, one per image")
        if num_images == 0:
            return embeds
        features = self.image_features(pixels).to(embeds.dtype)  # (N, K, D)
        return embeds.masked_scatter(is_image[..., None], features)  # (B, L, D)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, L) each, placeholders expanded, right-padded
        pixels = batch["pixels"]  # (B, 3, H, W)
        if "has_image" in batch:
            pixels = pixels[batch["has_image"]]  # (N, 3, H, W): text-only rows carry blank pixels
        embeds = self.embed_with_images(input_ids, pixels)  # (B, L, D)
        # Right padding needs no attention mask: causality keeps every real token from seeing the pads after it.
        logits = self.lm(inputs_embeds=embeds[:, :-1])  # (B, L-1, V)
        targets = labels[:, 1:]  # (B, L-1): the next token of each position
        is_target = targets != IGNORE_INDEX
        loss, logs = lm_loss_and_logs(logits, targets.masked_fill(~is_target, 0), is_target,
                                      self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    # ---- training stages and LoRA ---------------------------------------------------------------------
    def set_training_options(self, options: dict[str, Any]) -> None:
        """Apply the stage: what is locked, the template the model will speak, LoRA adapters on the LM."""
        super().set_training_options(options)
        training = self.training_options
        self.config.template = training.template or ("plain" if training.stage == 1 else "vicuna_v1")
        if training.train_vision:
            self.visual.requires_grad_(True)
            self._locked.discard("image")
        if training.stage == 1:
            self.lock("text")
        if training.lora_rank:
            settings = LoRASettings(training.lora_rank, training.lora_alpha, training.lora_dropout, tuple(training.lora_targets))
            if self.config.lora is None:
                self._adapt(settings)
                self.config.lora = settings  # saved in config.json: the run folder loads with its adapters
            elif self.config.lora != settings:  # a resumed run whose recipe changed the adapters
                raise UserError(f"the model already has LoRA adapters {self.config.lora}; the recipe asks for {settings}")

    def _adapt(self, settings: LoRASettings) -> None:
        from vlmkit.layers.lora import apply_lora

        # On the LM alone: the vision tower's blocks have layers of the same names. The projector,
        # outside the LM, keeps training in full.
        apply_lora(self.lm, list(settings.targets), rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout)

    def save_training_artifacts(self, directory: Path, weights: dict[str, torch.Tensor]) -> None:
        """After each checkpoint (the trainer calls it on rank 0 with the gathered weights): the LM's
        LoRA adapters as a PEFT folder, `directory/adapter`, for the LM's HF Llama twin."""
        if self.config.lora is None:
            return
        from vlmkit.interop.hf_lm import llama_peft_translator
        from vlmkit.interop.peft import save_peft_adapter

        with torch.device("meta"):  # a twin holding the gathered (unsharded) tensors, without copying them
            twin = type(self).from_config_dict(to_dict(self.config))
        twin.load_state_dict(weights, strict=True, assign=True)
        save_peft_adapter(twin, Path(directory) / ADAPTER_FOLDER, llama_peft_translator("lm.", "model."))

    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict[str, Any], tokenizer) -> dict[str, Any]:
        """Add the image placeholder to the tokenizer (a special token) and fit the `lm` section
        (vocabulary, bos / eos / pad ids) and `image_token_id` to it."""
        image_token = config.get("image_token", DEFAULT_IMAGE_TOKEN)
        if hasattr(tokenizer, "add_special_tokens"):  # the dry run's vocabulary-only stand-in keeps the config's id
            config["image_token_id"] = tokenizer.add_special_tokens([image_token])[0]
        config.setdefault("lm", {})
        return super().adapt_config_to_tokenizer(config, tokenizer)  # after the new token: the vocabulary grew

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        """Captions, questions, answers, conversation turns and the templates' own words (system
        prompts, role markers), so prompts tokenize compactly (unused with init_text / init)."""
        from vlmkit.data.conversation import TEMPLATES, conversation_texts
        from vlmkit.data.records import record_texts

        template_texts = [_fill_template(t) for t in TEMPLATES.values()] + [SHORT_ANSWER_PROMPT, CAPTION_PROMPT]
        return record_texts(records, questions=True) + conversation_texts(records) + template_texts * 20

    def training_records(self, records: Sequence[dict]) -> list[dict]:
        """The conversation records of the stage: captions for stage 1; conversations (+ qa, captions) for stage 2."""
        from vlmkit.data.conversation import conversation_records

        training = self.training_options
        if training.stage == 1:
            return caption_conversations(records, None)
        flat = conversation_records(records, list(training.conversation_types) or None)
        if training.include_qa:
            flat += qa_conversations(records, training.qa_repeats)
        if training.include_captions:
            flat += caption_conversations(records, CAPTION_PROMPT)
        return flat

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        flat = self.training_records(records)
        if not flat:
            wanted = "captions ('text' / 'texts')" if self.training_options.stage == 1 else "conversations, questions or captions"
            raise UserError(f"no training record has {wanted}, which LLaVA stage {self.training_options.stage} trains on")
        return LlavaDataset(flat, transform, tokenizer, template=self.config.template, max_length=self.training_options.max_length,
                            seed=seed, image_token=self.config.image_token, image_token_id=self.config.image_token_id,
                            num_image_tokens=self.config.num_image_tokens)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        vision, lm, k = self.config.vision, self.config.lm, self.config.num_image_tokens
        pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=generator)
        specials = {lm.pad_token_id, lm.bos_token_id, lm.eos_token_id, self.config.image_token_id}
        length = min(lm.context_length, k + 24)
        input_ids = torch.full((batch_size, length), lm.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        for row in range(batch_size):
            text = [t for t in torch.randint(0, lm.vocab_size, (length,), generator=generator).tolist() if t not in specials]
            size = min(length - k - 2, 6 + 5 * row)
            prompt, reply = text[:3], text[3:size] + ([lm.eos_token_id] if lm.eos_token_id is not None else [])
            ids = ([lm.bos_token_id] if lm.bos_token_id is not None else []) + [self.config.image_token_id] * k + prompt + reply
            ids = ids[:length]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, len(ids) - len(reply) : len(ids)] = torch.tensor(ids[len(ids) - len(reply):])
        return {"pixels": pixels, "input_ids": input_ids, "labels": labels, "attention_mask": input_ids != lm.pad_token_id}

    # ---- inference ---------------------------------------------------------------------------------
    def _prompt_ids(self, messages: Sequence[dict], has_image: bool) -> torch.Tensor:
        """One prompt row: the conversation through the template's assistant marker, placeholders expanded. (T',)"""
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
        ids = encode_prompt(list(messages), self.config.template, self.tokenizer, self.config.image_token,
                            has_image=has_image)  # (T,): one placeholder per image
        repeats = torch.where(ids == self.config.image_token_id, self.config.num_image_tokens, 1)
        return ids.repeat_interleave(repeats).to(self.device)  # (T',)

    def _prompt_embeds(self, messages: Sequence[dict], pixels: torch.Tensor | None) -> torch.Tensor:
        """One prompt row with its image tokens in place. (T', D)"""
        ids = self._prompt_ids(messages, has_image=pixels is not None)  # (T',)
        images = pixels[None].to(self.device) if pixels is not None else torch.empty(0, device=self.device)
        return self.embed_with_images(ids[None], images)[0]  # (T', D)

    def _prompts(self, pixels: torch.Tensor, conversations: Sequence[Sequence[dict]]) -> EmbeddedPrompts:
        """Left-padded prompts, one image each; the images go through the vision tower as one batch."""
        if len(conversations) != pixels.shape[0]:
            raise UserError(f"got {pixels.shape[0]} images and {len(conversations)} prompts; give one prompt per image")
        rows = [self._prompt_ids(turns, has_image=True) for turns in conversations]
        lengths = torch.tensor([len(row) for row in rows], device=self.device)  # (B,)
        width = int(lengths.max())
        ids = torch.full((len(rows), width), self.config.lm.pad_token_id, dtype=torch.long, device=self.device)  # (B, T0)
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = row
        key_is_real = torch.arange(width, device=self.device)[None] >= (width - lengths)[:, None]  # (B, T0)
        # Image n fills the n-th run of placeholders, which is row n's; the pads are masked keys.
        embeds = self.embed_with_images(ids, pixels.to(self.device))  # (B, T0, D)
        return EmbeddedPrompts(embeds, key_is_real, (key_is_real.long().cumsum(dim=1) - 1).clamp(min=0))

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Each row: the template's prompt with the image and the instruction (CAPTION_PROMPT by default)."""
        instructions = prompts if prompts is not None else [CAPTION_PROMPT] * pixels.shape[0]
        return embedded_prompt_step(self.lm, self._prompts(pixels, [[{"from": "human", "value": text}] for text in instructions]))

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """Short answers (greedy, at most 10 tokens by default) after LLaVA-1.5's single-word instruction."""
        decoding.setdefault("max_new_tokens", 10)
        prompts = self._prompts(pixels, [[{"from": "human", "value": short_answer_question(q)}] for q in questions])
        return self.generate_from_embeddings(prompts, **decoding).texts

    def chat(self, pixels: torch.Tensor | None, messages: list[dict], stream: Callable[[str], None] | None = None,
             **decoding) -> str:
        """The assistant's reply to a conversation about one image, `pixels` (1, 3, H, W) or (3, H, W).

        `messages` are `{"role": "user" | "assistant", "content": str}` turns ending with a user turn;
        the whole history goes through the template (the image leads the first user turn unless a
        turn places `<image>` itself). `stream`, if given, is called with each new piece of text as
        it is generated (greedy or sampling). `decoding` takes GenerationConfig fields. `pixels=None`
        chats about text alone.
        """
        if not isinstance(messages, list) or not messages:
            raise UserError("chat needs at least one message: [{\"role\": \"user\", \"content\": \"...\"}]")
        if pixels is not None:
            if pixels.ndim == 4 and pixels.shape[0] == 1:
                pixels = pixels[0]  # (3, H, W)
            if pixels.ndim != 3:
                raise UserError(f"chat takes one image, pixels (1, 3, H, W) or (3, H, W); got {tuple(pixels.shape)}")
        prompt = left_pad_embeddings([self._prompt_embeds(messages, pixels)])
        return self.generate_from_embeddings(prompt, stream=stream, **decoding).texts[0]


register_config("llava-tiny", "llava", tiny=True, config={
    # 32 px ViT (patch 8: 16 image tokens) -> MLP projector -> a 2-layer Llama-style LM. The
    # trainer fits vocabulary and ids to the tokenizer; init_image / init_text set the towers' shapes.
    "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
    "lm": lm_config_llama(vocab_size=256, context_length=384, width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=128,
                          bos_token_id=253, eos_token_id=254, pad_token_id=0),
    "image_token_id": 255,
})
register_config("llava-1.5-7b", "llava", config={
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (hidden state -2, no CLS: 576 tokens), mlp2x_gelu, Vicuna-7B
    # (Llama-7B shape, vocabulary grown to 32064 by <image> and <pad> as in the HF conversion).
    "vision": {"type": "vit", "image_size": 336, "patch_size": 14, "width": 1024, "depth": 24, "heads": 16,
               "activation": "quick_gelu"},
    "lm": lm_config_llama(vocab_size=32064, context_length=4096, width=4096, depth=32, heads=32, mlp_hidden=11008,
                          norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=32001),
    "image_token_id": 32000,
    "projector": "mlp2x_gelu",
})
