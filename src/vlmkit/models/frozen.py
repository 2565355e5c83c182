"""Frozen (Tsimpoukelli et al. 2021): a trainable vision encoder prompts a frozen language model.

image -> vision tower -> pooled vector (B, W) -> Linear -> k visual prefix embeddings (B, k, D)
[prefix ; token embeddings of [bos] caption] -> frozen DecoderLM -> next-token loss on the caption

Only the vision tower and its linear map learn; the LM (embeddings included) is frozen from the
start, as in the paper (which uses k = 2). Start it from a pretrained LM: `init_text: RUN` takes
an `lm` run (or an HF GPT-2 / Llama folder) with its tokenizer. The prefix sits at positions
0..k-1, so the model also reads images *inside* a text: few-shot prompts interleave
[image prefix] "Question: q Answer: a" examples before the query image and its question.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from vlmkit.capabilities import Answers, AnswersInContext, Generates
from vlmkit.data.records import qa_text, record_texts
from vlmkit.encoders.config import LMConfig, VisionConfig, build_vision_tower, lm_config_llama
from vlmkit.encoders.lm import DecoderLM, random_prefixed_batch
from vlmkit.errors import UserError
from vlmkit.generation import Generative, GenerationConfig, embedded_prompt_step, left_pad_embeddings
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


@dataclass
class FrozenConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(type="resnet", width=64, heads=32))
    lm: LMConfig = field(default_factory=LMConfig)
    num_prefix_tokens: int = 2  # k visual prefix embeddings (the paper's choice)

    def __post_init__(self) -> None:
        if self.num_prefix_tokens < 1:
            raise UserError(f"num_prefix_tokens must be at least 1, got {self.num_prefix_tokens}")


@dataclass
class FrozenTraining:
    """The recipe's `training:` options of Frozen."""

    label_smoothing: float = 0.0


@register_family
class Frozen(Generative, VLModel):
    family = "frozen"
    config_class = FrozenConfig
    capabilities = (Generates, Answers, AnswersInContext)
    training_class = FrozenTraining
    towers = {"image": "visual", "text": "lm"}
    tower_configs = {"image": "vision", "text": "lm"}

    def __init__(self, config: FrozenConfig) -> None:
        super().__init__(config)
        self.visual = build_vision_tower(config.vision, None)
        self.visual_prefix = nn.Linear(self.visual.width, config.num_prefix_tokens * config.lm.width)
        self.lm = DecoderLM.from_config(config.lm)
        self.lock("text")  # the defining choice of Frozen: the language model never changes
        self.generation_config = GenerationConfig(max_new_tokens=20)

    def image_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """k prefix embeddings per image, in the LM's input space. (B, k, D)"""
        pooled = self.visual(pixels, pooled_only=True).pooled  # (B, W)
        return self.visual_prefix(pooled).view(pixels.shape[0], self.config.num_prefix_tokens, self.config.lm.width)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, L): [bos] caption [eos] pad...
        prefix = self.image_prefix(batch["pixels"])  # (B, k, D)
        embeds = torch.cat([prefix, self.lm.embed_tokens(tokens[:, :-1])], dim=1)  # (B, k+L-1, D)
        logits = self.lm(inputs_embeds=embeds)[:, prefix.shape[1]:]  # (B, L-1, V): the text positions
        target_mask = real_tokens_through_end(tokens, self.config.lm.eos_token_id)[:, 1:]  # (B, L-1)
        loss, logs = lm_loss_and_logs(logits, tokens[:, 1:], target_mask, self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    # ---- prompts: image prefixes among text ------------------------------------------------
    def _text_embeds(self, text: str, bos: bool) -> torch.Tensor:
        """Token embeddings of `text` (after [bos] when asked), no end token. (T, D)"""
        ids = ([self.tokenizer.bos_id] if bos else []) + (self.tokenizer.encode(text, add_special_tokens=False) if text else [])
        return self.lm.embed_tokens(torch.tensor([ids], device=self.device))[0]

    def _interleaved(self, segments: Sequence[tuple[torch.Tensor, str]]) -> torch.Tensor:
        """One prompt row: [prefix of image 1] text 1 [prefix of image 2] text 2 ... (T, D)."""
        prefixes = self.image_prefix(torch.stack([image for image, _ in segments]).to(self.device))  # (S, k, D)
        parts = []
        for index, (_, text) in enumerate(segments):
            parts += [prefixes[index], self._text_embeds(text, bos=index == 0)]
        return torch.cat(parts, dim=0)

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """Each row's prompt is [image prefix] [bos] prompt text; decoding continues after it."""
        texts = prompts if prompts is not None else [""] * pixels.shape[0]
        rows = [self._interleaved([(image, text)]) for image, text in zip(pixels, texts)]
        return embedded_prompt_step(self.lm, left_pad_embeddings(rows))

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """Answers generated after "Question: q Answer:" (greedy, short, by default)."""
        return self.answer_in_context(pixels, questions, [[] for _ in questions], **decoding)

    def answer_in_context(self, pixels: torch.Tensor, questions: list[str],
                          examples: Sequence[Sequence[tuple[torch.Tensor, str, str]]], **decoding) -> list[str]:
        """Few-shot VQA: each row's examples ([image] "Question: q Answer: a") precede its query."""
        if len(examples) != len(questions) or len(questions) != pixels.shape[0]:
            raise UserError(f"got {pixels.shape[0]} images, {len(questions)} questions and {len(examples)} example lists; give one of each per row")
        decoding.setdefault("max_new_tokens", 5)
        rows = []
        for image, question, shots in zip(pixels, questions, examples):
            segments = [(shot_image, qa_text(q, a) + " ") for shot_image, q, a in shots]
            rows.append(self._interleaved(segments + [(image, qa_text(question))]))
        return self.generate_from_embeddings(left_pad_embeddings(rows), **decoding).texts

    # ---- training hooks ------------------------------------------------------------------------
    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        """Captions plus questions and answers, so prompts tokenize well (unused with init_text)."""
        return record_texts(records, questions=True)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        return random_prefixed_batch(self.config.vision.image_size, self.config.lm, self.config.num_prefix_tokens, batch_size, seed)


register_config("frozen-tiny", "frozen", tiny=True, config={
    # 64 px ViT -> pooled vector -> 2 prefix embeddings for lm-tiny's shape (Llama style, width 128).
    "vision": {"type": "vit", "image_size": 64, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
    "lm": lm_config_llama(vocab_size=1024, context_length=128, width=128, depth=4, heads=4, kv_heads=2, mlp_hidden=344,
                          bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
    "num_prefix_tokens": 2,
})
register_config("frozen-nfrn50-gpt2", "frozen", {
    # Near the paper's shape on an LM users can load: a ResNet-50 and GPT-2 small (init_text: an HF GPT-2 folder).
    "vision": {"type": "resnet", "image_size": 224, "width": 64, "heads": 32, "resnet_layers": [3, 4, 6, 3]},
    "lm": {"vocab_size": 50257, "context_length": 1024, "width": 768, "depth": 12, "heads": 12, "eos_token_id": 50256,
           "bos_token_id": 50256},
    "num_prefix_tokens": 2,
})
