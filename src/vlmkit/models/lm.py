"""A text-only language model: the library's one decoder-only LM (GPT-2 or Llama style) on its own.

tokens (B, L) = [bos] text [eos] pad ... -> DecoderLM (causal) -> logits (B, L-1, V)
-> next-token cross-entropy over the real targets, through the end token.

It trains on the texts of any dataset (captions, question + answer pairs, statements; records
need no image), scores texts (`token_nll`, for perplexity) and continues prompts
(`generate_text`, left-padded prompts decoded with the KV cache). HF `GPT2LMHeadModel` and
`LlamaForCausalLM` folders load into it exactly (`vlmkit.interop.hf_lm`) and it exports back to
them. The LLM-connected families (Frozen, LLaVA, Flamingo, BLIP-2) build on the same `DecoderLM`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlmkit.capabilities import ContinuesText, ScoresText
from vlmkit.data.records import answers_of, qa_text
from vlmkit.encoders.config import LMConfig, lm_config_gpt2, lm_config_llama
from vlmkit.encoders.lm import DecoderLM, random_tokens
from vlmkit.errors import UserError
from vlmkit.generation import GenerationConfig, TextDecoding, generate
from vlmkit.layers.attention import KVCache
from vlmkit.layers.masks import real_tokens_through_end
from vlmkit.losses import lm_loss_and_logs
from vlmkit.models.base import ModelOutput, VLModel
from vlmkit.models.registry import register_config, register_family


@dataclass
class LanguageModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)


@dataclass
class LanguageModelTraining:
    """The recipe's `training:` options of the text-only LM."""

    label_smoothing: float = 0.0
    # "text": every caption / question + answer / statement is its own sample. "record": the texts
    # of one record (one scene) are joined, in a seeded random order, into documents of up to the
    # context length, so the LM learns that later sentences depend on earlier ones; an LM that
    # reads its context is what Frozen and few-shot prompting steer with an image prefix.
    documents: str = "record"

    def __post_init__(self) -> None:
        if self.documents not in ("text", "record"):
            raise UserError(f"training.documents must be 'text' or 'record', got {self.documents!r}")


def record_documents(records: Sequence[dict], tokenizer, budget: int, seed: int) -> list[list[str]]:
    """Each record's texts (`record_lm_texts`) shuffled with a per-record seed and packed greedily
    into documents (lists of texts) of at most `budget` tokens, end tokens included (a text longer
    than that stays alone and is cut later)."""
    import random

    documents = []
    for index, record in enumerate(records):
        texts = record_lm_texts([record])
        random.Random(seed * 1_000_003 + index).shuffle(texts)
        current, used = [], 0
        for text in texts:
            size = len(tokenizer.encode(text, add_special_tokens=False)) + 1  # + its end token
            if current and used + size > budget:
                documents.append(current)
                current, used = [], 0
            current.append(text)
            used += size
        if current:
            documents.append(current)
    return documents


def record_lm_texts(records: Sequence[dict]) -> list[str]:
    """Every text of the records an LM can learn from: captions, questions with their answers (as
    `qa_text` writes them, the form prompt-based VQA asks in), statements."""
    texts = []
    for record in records:
        texts.extend(record.get("texts") or [])
        for item in record.get("qa") or []:
            texts.extend(qa_text(item["question"], answer) for answer in dict.fromkeys(answers_of(item)))
        texts.extend(item["text"] for item in record.get("statements") or [])
    return [text for text in texts if text.strip()]


def encode_texts(tokenizer, texts: Sequence[str | Sequence[str]], bos_id: int | None, eos_id: int | None, pad_id: int,
                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[bos] text [eos]` per text, right-padded with `pad_id` to the longest row (at most `max_length`),
    and each row's length. (B, L), (B,)

    A text may be a document, a list of texts: `[bos] t1 [eos] t2 [eos] ...`, each text ended as it
    would be alone, so the LM learns to stop after a sentence. Built from the tokenizer's plain ids
    rather than its own template, so every tokenizer (CLIP-style BPE, GPT-2's, which adds no
    specials, Llama's) gives the same layout; an overlong row is cut and still ends in its end token.
    """
    rows = []
    for text in texts:
        ids = []
        for sentence in ([text] if isinstance(text, str) else text):
            ids += tokenizer.encode(sentence, add_special_tokens=False) + ([eos_id] if eos_id is not None else [])
        row = ([bos_id] if bos_id is not None else []) + ids
        if len(row) > max_length:
            row = row[: max_length - 1] + ([eos_id] if eos_id is not None else row[max_length - 1 : max_length])
        rows.append(row)
    width = max(len(row) for row in rows)
    tokens = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    return tokens, torch.tensor([len(row) for row in rows], dtype=torch.long)


class TextDataset(torch.utils.data.Dataset):
    """One text (or document) per sample; `collate` gives `tokens` (B, L): [bos] text [eos] pad..., L =
    the longest row, and `lengths` (B,), which say what is trained on (a document has several end tokens)."""

    def __init__(self, texts: Sequence[str | list[str]], tokenizer, lm: LMConfig) -> None:
        if not texts:
            raise UserError("no training record has texts (captions 'texts', questions 'qa' or 'statements') for the language model")
        self.texts, self.tokenizer, self.lm = list(texts), tokenizer, lm

    def __len__(self) -> int:
        return len(self.texts)

    def set_epoch(self, epoch: int) -> None:
        """Samples do not depend on the epoch (the trainer's permutation does the shuffling)."""

    def __getitem__(self, index: int) -> str | list[str]:
        return self.texts[index]

    def collate(self, texts: Sequence[str]) -> dict:
        lm = self.lm
        tokens, lengths = encode_texts(self.tokenizer, texts, lm.bos_token_id, lm.eos_token_id, lm.pad_token_id, lm.context_length)
        return {"tokens": tokens, "lengths": lengths, "num_skipped": 0, "skipped": []}


@register_family
class LanguageModel(VLModel):
    family = "lm"
    config_class = LanguageModelConfig
    training_class = LanguageModelTraining
    capabilities = (ScoresText, ContinuesText)
    towers = {"text": "lm"}
    tower_configs = {"text": "lm"}
    export_formats = {"hf": "vlmkit.interop.hf_lm:export"}
    needs_images = False
    uses_every_parameter = True

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__(config)
        self.lm = DecoderLM.from_config(config.lm)
        self.generation_config = GenerationConfig(max_new_tokens=32)

    # ---- training ----------------------------------------------------------------------------
    def _targets(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens (B, L-1) and which of them are trained on: the first `lengths - 1` (B,) when
        given (documents hold several end tokens), else real ones through the first end token.

        The end is looked for among the targets, so a tokenizer whose bos is its eos (GPT-2's) works too.
        """
        targets = tokens[:, 1:]  # (B, L-1)
        if lengths is not None:
            positions = torch.arange(targets.shape[1], device=tokens.device)
            return targets, positions[None, :] < (lengths.to(tokens.device) - 1)[:, None]  # (B, L-1)
        eos = self.config.lm.eos_token_id
        mask = real_tokens_through_end(targets, eos) if eos is not None else torch.ones_like(targets, dtype=torch.bool)
        return targets, mask

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        tokens = batch["tokens"]  # (B, L): [bos] text [eos] pad...
        logits = self.lm(tokens[:, :-1])  # (B, L-1, V)
        targets, target_mask = self._targets(tokens, batch.get("lengths"))  # (B, L-1) x 2
        loss, logs = lm_loss_and_logs(logits, targets, target_mask, self.training_options.label_smoothing)
        return ModelOutput(loss=loss, logs=logs, logits=logits)

    def token_nll(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token negative log-likelihood (B,) of each row's real targets, and their count (B,).

        `tokens` (B, L) are laid out as in training; perplexity = exp(nll.sum() / count.sum()).
        """
        logits = self.lm(tokens[:, :-1])  # (B, L-1, V)
        targets, target_mask = self._targets(tokens)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)  # (B, L-1)
        weights = target_mask.to(nll.dtype)
        return (nll * weights).sum(dim=1), weights.sum(dim=1)

    def text_nll(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_nll` of texts laid out as in training ([bos] text [eos], cut to the context)."""
        lm = self.config.lm
        tokens, _ = encode_texts(self.tokenizer, texts, lm.bos_token_id, lm.eos_token_id, lm.pad_token_id, lm.context_length)
        return self.token_nll(tokens.to(self.device))

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        lm = self.config.lm
        end = lm.eos_token_id if lm.eos_token_id is not None else lm.vocab_size - 1
        tokens = random_tokens(lm.vocab_size, min(lm.context_length, 32), end, lm.pad_token_id, batch_size, generator)
        if lm.bos_token_id is not None:
            tokens[:, 0] = lm.bos_token_id
        return {"tokens": tokens}

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        return record_lm_texts(records)

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        if self.training_options.documents == "record":
            texts = record_documents(records, tokenizer, self.config.lm.context_length - 1, seed)  # - [bos]
        else:
            texts = record_lm_texts(records)
        return TextDataset(texts, tokenizer, self.config.lm)

    # ---- generation ----------------------------------------------------------------------------
    def prompt_tokens(self, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`[bos] prompt` rows (no end token), left-padded: tokens (B, T0) and each row's pad count (B,)."""
        if self.tokenizer is None:
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(folder)")
        lm = self.config.lm
        bos = [lm.bos_token_id] if lm.bos_token_id is not None else []
        rows = [bos + (self.tokenizer.encode(prompt, add_special_tokens=False) if prompt else []) for prompt in prompts]
        if any(not row for row in rows):
            raise UserError("an empty prompt needs a start token, and this LM has none (lm.bos_token_id); give some text")
        width = max(len(row) for row in rows)
        tokens = torch.tensor([[lm.pad_token_id] * (width - len(row)) + row for row in rows], dtype=torch.long, device=device)
        num_pad = torch.tensor([width - len(row) for row in rows], dtype=torch.long, device=device)
        return tokens, num_pad

    def decoding_step(self, num_pad: torch.Tensor, with_hidden: bool = False):
        """The step function of `vlmkit.generation.generate` for prompts with `num_pad` (B,) left pads.

        `with_hidden=True`: the step also returns the final-norm hidden states of the positions it
        fed, (logits (N, V), hidden (N, T', D)), which contrastive search reads.
        """
        padded = bool(num_pad.any())

        def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
            start = cache.length if cache is not None else 0
            new = tokens[:, start:]  # (N, T'): the whole sequence without a cache, the new token with one
            if padded:  # hide the pads and start every row's positions at its first real token
                pads = num_pad.index_select(0, rows)  # (N,)
                key_is_real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= pads[:, None]  # (N, K)
                hidden = self.lm(new, cache=cache, attention_mask=key_is_real, position_offset=start - pads, return_hidden=True)
            else:
                hidden = self.lm(new, cache=cache, return_hidden=True)  # (N, T', D)
            logits = self.lm.logits(hidden[:, -1])  # (N, V)
            return (logits, hidden) if with_hidden else logits

        return step

    def text_decoding(self, prompts: Sequence[str]) -> TextDecoding:
        """What `generate` needs to continue `prompts`: the step (with hidden states), the left-padded
        prompt tokens, which of them are real, the end and pad ids and the room left in the context."""
        lm = self.config.lm
        if lm.eos_token_id is None:
            raise UserError("this LM has no end token (lm.eos_token_id), so generation could never stop; set it in the config")
        tokens, num_pad = self.prompt_tokens(prompts, self.device)
        prompt_mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= num_pad[:, None]  # (B, T0)
        return TextDecoding(step=self.decoding_step(num_pad, with_hidden=True), prompt_tokens=tokens, prompt_mask=prompt_mask,
                            eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id, tokenizer=self.tokenizer,
                            room=lm.context_length - tokens.shape[1])

    @torch.no_grad()
    def generate_text(self, prompts: str | Sequence[str], **decoding) -> list[str]:
        """Continuations of `prompts` (one text or a list), without the prompts themselves.

        `decoding` takes any `GenerationConfig` field (max_new_tokens, num_beams, do_sample, top_p,
        use_cache...); defaults come from `self.generation_config`.
        """
        lm = self.config.lm
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return []
        if lm.eos_token_id is None:
            raise UserError("this LM has no end token (lm.eos_token_id), so generation could never stop; set it in the config")
        config = GenerationConfig.from_kwargs(self.generation_config, **decoding)
        was_training = self.training
        self.eval()
        try:
            tokens, num_pad = self.prompt_tokens(prompts, self.device)
            room = lm.context_length - tokens.shape[1]
            if room < 1:
                raise UserError(f"the prompt of {tokens.shape[1]} tokens leaves no room within the context of {lm.context_length}; shorten it")
            settings = {"max_new_tokens": min(config.max_new_tokens, room), "min_new_tokens": min(config.min_new_tokens, room)}
            # Contrastive search (penalty_alpha, top_k) reads the hidden states; the other decodings only the logits.
            step = self.decoding_step(num_pad, with_hidden=config.is_contrastive)
            prompt_mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= num_pad[:, None]  # (B, T0)
            output = generate(step, tokens, config, eos_token_id=lm.eos_token_id, pad_token_id=lm.pad_token_id,
                              tokenizer=self.tokenizer, prompt_mask=prompt_mask, **settings)
        finally:
            self.train(was_training)
        return output.texts


register_config("lm-tiny", "lm", tiny=True, config={
    # Llama style, grouped-query attention (4 heads, 2 kv heads); the tokenizer sets vocab and ids in training.
    # 128 positions: documents of several sentences, and Frozen's 4-shot prompts (5 images + 4 examples).
    "lm": lm_config_llama(vocab_size=1024, context_length=128, width=128, depth=4, heads=4, kv_heads=2, mlp_hidden=344,
                          bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
})
register_config("gpt2-tiny", "lm", tiny=True, config={
    "lm": lm_config_gpt2(vocab_size=1024, context_length=64, width=64, depth=2, heads=4,
                         bos_token_id=1022, eos_token_id=1023, pad_token_id=0),
})
register_config("gpt2", "lm", {
    # GPT-2 small (124M): HF's `gpt2`; the end token is also its start token.
    "lm": lm_config_gpt2(vocab_size=50257, context_length=1024, width=768, depth=12, heads=12,
                         bos_token_id=50256, eos_token_id=50256, pad_token_id=50256),
})
register_config("tinyllama-1.1b", "lm", {
    # TinyLlama-1.1B: Llama 2 architecture, 22 layers, 32 heads with 4 kv heads.
    "lm": lm_config_llama(vocab_size=32000, context_length=2048, width=2048, depth=22, heads=32, kv_heads=4,
                          mlp_hidden=5632, norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0),
})
