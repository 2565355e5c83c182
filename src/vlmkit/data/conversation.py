"""Conversations for instruction tuning (LLaVA style): templates, label masking, the dataset.

    turns = [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A red star."}]
    encoded = encode_conversation(turns, "vicuna_v1", tokenizer, max_length=2048)
    encoded.input_ids, encoded.labels  # (T,) each; labels -100 except on the reply and its end token

A template (`TEMPLATES`: `plain`, `vicuna_v1`, `llama_2`, the prompts of haotian-liu/LLaVA's
conversation.py) says how turns become text. The text is tokenized *per segment* - the
instruction part of each round (masked), each reply (supervised), the begin/end tokens and the
image placeholder as literal ids - and the labels are built from the same pieces, so they align
with the ids by construction. LLaVA instead tokenizes the whole prompt and then recomputes each
round's length to mask it; when the two disagree (another tokenizer version, a template change)
it sets the whole sample's labels to -100 with one warning ("tokenization mismatch") and the loss
silently drops it. Tokenizing per segment can give other ids than tokenizing the joined text at a
segment boundary (a SentencePiece prefix space, a BPE merge across the boundary); `encode_prompt`
builds inference prompts from the same segments, so training and generation see the same ids.

Labels follow HF: one per input id, not shifted (the model shifts), `IGNORE_INDEX` (-100) on the
begin token, system prompt, user turns, role markers and image placeholders. The `<image>`
placeholder stays one id here; the model expands it to its image tokens. Truncation is never
silent: a cut sample says so (`truncated=True`), and a cut that would drop an image placeholder
(or leave nothing supervised) raises `SkippedSample` with the reason, which
`ConversationDataset` counts and its batches report.
"""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from vlmkit.data.formats import CorruptImage, load_image
from vlmkit.data.loader import SkipCounter, sample_rng
from vlmkit.data.records import ROLES, check_messages  # noqa: F401 (part of this module's API)
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import UserError

logger = logging.getLogger("vlmkit.data")

IGNORE_INDEX = -100  # labels the loss ignores (PyTorch's cross_entropy default, LLaVA's constant)
DEFAULT_IMAGE_TOKEN = "<image>"

# Reasons a sample is skipped (the keys of `skip_reasons` in a batch and in the end-of-run report).
UNREADABLE_IMAGE = "unreadable image"
IMAGE_CUT = "image placeholder cut by truncation"
NOTHING_SUPERVISED = "no supervised token left"


@dataclass(frozen=True)
class Template:
    """How a conversation template lays turns out as text (one declarative entry per template).

    `first_turn` (with `{system}`) and `turn` wrap the human message of the first and the later
    rounds, ending with the assistant's role marker; `reply` wraps the assistant's message, which
    is supervised, and `end_token` appends the tokenizer's end token to it (also supervised).
    `bos_each_round` puts the begin token before every later round (Llama-2's `</s><s>[INST]`).
    Image placeholders go to the start of their human message followed by `image_suffix`;
    `keep_human_text=False` (plain) reduces the human turn to its placeholder, and `max_rounds`
    limits the number of question-answer rounds.
    """

    name: str
    system: str
    first_turn: str
    turn: str
    reply: str
    end_token: bool = True
    bos_each_round: bool = False
    image_suffix: str = "\n"
    keep_human_text: bool = True
    max_rounds: int | None = None


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

TEMPLATES: dict[str, Template] = {
    # Stage 1 (conv_llava_plain + preprocess_plain): "<image>" + caption + "\n"; the reference
    # supervises the caption and its "\n" (the stop signal of stage 1; there is no end token).
    "plain": Template("plain", system="", first_turn="{message}", turn="{message}", reply="{message}\n",
                      end_token=False, image_suffix="", keep_human_text=False, max_rounds=1),
    # conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 = the end token):
    # "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>".
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, first_turn="{system} USER: {message} ASSISTANT:",
                          turn="USER: {message} ASSISTANT:", reply=" {message}"),
    # conv_llava_llama_2 (SeparatorStyle.LLAMA_2, sep "<s>", sep2 "</s>"):
    # "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>".
    "llama_2": Template("llama_2", system=LLAVA_LLAMA_2_SYSTEM,
                        first_turn="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message} [/INST]",
                        turn="[INST] {message} [/INST]", reply=" {message} ", bos_each_round=True),
}


def get_template(template: str | Template) -> Template:
    """The `Template` of a name in `TEMPLATES` (a `Template` passes through), or a UserError."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise UserError(f"unknown conversation template '{template}'; use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


class SkippedSample(Exception):
    """A conversation that cannot be trained on as it is; `reason` is one of the reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class EncodedConversation:
    """One tokenized conversation: `input_ids` and `labels` (T,) LongTensors, aligned id for id.

    `labels` equals `input_ids` on the supervised tokens (replies and their end tokens) and is
    `IGNORE_INDEX` elsewhere; `truncated` says the conversation was cut to `max_length`;
    `num_images` counts the image placeholders in `input_ids`.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    truncated: bool
    num_images: int


# ----------------------------------------------------------------------------- messages


def _rounds(messages: Any, template: Template, image_token: str, has_image: bool | None, where: str,
            prompt: bool = False) -> tuple[list[tuple[str, str | None]], int]:
    """(human text with its placeholders moved to its start, reply or None) per round, and the image count."""
    turns = check_messages(messages, where, prompt=prompt)
    humans = [text for role, text in turns if role == "human"]
    replies: list[str | None] = [text for role, text in turns if role == "gpt"] + ([None] if prompt else [])
    if any(image_token in reply for reply in replies if reply is not None):
        raise UserError(f"{where} has an {image_token} placeholder in an assistant turn; images belong in human turns")
    counts = [text.count(image_token) for text in humans]
    if has_image is not None:
        if has_image and sum(counts) == 0:
            counts[0] = 1  # an image with no placeholder goes at the start of the first human turn
        elif sum(counts) != int(has_image):
            raise UserError(f"{where} has {sum(counts)} {image_token} placeholder(s) but {int(has_image)} image; "
                            f"give one placeholder per image")
    if template.max_rounds is not None and len(humans) > template.max_rounds:
        raise UserError(f"{where} has {len(humans)} rounds but the '{template.name}' template takes at most "
                        f"{template.max_rounds}; use a chat template such as vicuna_v1")
    if not template.keep_human_text and sum(counts) == 0:
        raise UserError(f"{where} has no image, but the '{template.name}' template captions images; give the record an image")
    rounds = []
    for text, count, reply in zip(humans, counts, replies):
        # LLaVA's preprocess_multimodal: the placeholder leaves the text and leads the turn, then "\n".
        text = text.replace(image_token, "").strip() if template.keep_human_text else ""
        if count:
            text = image_token * count + template.image_suffix + text
        rounds.append((text, reply))
    return rounds, sum(counts)


def _fill(pattern: str, system: str, message: str) -> str:
    # Not str.format: user text may hold braces.
    return message.join(part.replace("{system}", system) for part in pattern.split("{message}"))


def _pieces(rounds: list[tuple[str, str | None]], template: Template, tokenizer, image_token: str,
            image_id: int | None) -> list[tuple[str | int, bool, bool]]:
    """The segments of a conversation in order: (text or literal id, supervised, is image placeholder)."""
    pieces: list[tuple[str | int, bool, bool]] = []
    if tokenizer.bos_id is not None:
        pieces.append((tokenizer.bos_id, False, False))
    if template.end_token and tokenizer.eos_id is None:
        raise UserError(f"the '{template.name}' template ends each reply with the end token, but the tokenizer has none; "
                        f"use a tokenizer with an end token (eos)")
    for number, (human, reply) in enumerate(rounds):
        if number and template.bos_each_round and tokenizer.bos_id is not None:
            pieces.append((tokenizer.bos_id, False, False))
        text = _fill(template.first_turn if number == 0 else template.turn, template.system, human)
        for index, chunk in enumerate(text.split(image_token)):
            if index:
                pieces.append((image_id, False, True))
            if chunk:
                pieces.append((chunk, False, False))
        if reply is not None:
            pieces.append((_fill(template.reply, template.system, reply), True, False))
            if template.end_token:
                pieces.append((tokenizer.eos_id, True, False))
    return pieces


def _image_id(tokenizer, image_token: str, num_images: int) -> int | None:
    if not num_images:
        return None
    image_id = tokenizer.token_to_id(image_token)
    if image_id is None:
        raise UserError(f"the tokenizer has no {image_token} token; add it with tokenizer.add_special_tokens(['{image_token}']) "
                        f"(and grow the model's embeddings) before encoding conversations with images")
    return image_id


def _encode_pieces(pieces: list[tuple[str | int, bool, bool]], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and image-placeholder positions of the segments (texts encoded in one batch)."""
    texts = [piece for piece, _, _ in pieces if isinstance(piece, str)]
    encoded = iter(tokenizer.backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    ids: list[int] = []
    labels: list[int] = []
    images: list[int] = []
    for piece, supervised, is_image in pieces:
        piece_ids = next(encoded).ids if isinstance(piece, str) else [piece]
        if is_image:
            images.append(len(ids))
        ids.extend(piece_ids)
        labels.extend(piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids))
    return ids, labels, images


def encode_conversation(messages: Sequence[dict], template: str | Template, tokenizer, max_length: int,
                        image_token: str = DEFAULT_IMAGE_TOKEN, *, has_image: bool | None = None,
                        tokens_per_image: int = 1, where: str = "conversation") -> EncodedConversation:
    """Tokenize one training conversation with its label mask, cut to `max_length` tokens.

    `messages` are LLaVA's turns (see `check_messages`); `template` is a name in `TEMPLATES`.
    Each `image_token` in a human turn becomes one placeholder id (the tokenizer must know the
    token: `Tokenizer.add_special_tokens`) at the start of that turn; with `has_image=True` a
    conversation without a placeholder gets one in its first human turn, and `has_image=False`
    forbids them. `tokens_per_image` is how many positions the model expands each placeholder
    to, so that `max_length` bounds the expanded sequence. A longer conversation is cut (and
    marked `truncated`); a cut through an image placeholder, or one that leaves no supervised
    token, raises `SkippedSample`. Invalid turns raise a UserError naming `where`.
    """
    if max_length < 1 or tokens_per_image < 1:
        raise ValueError(f"max_length and tokens_per_image must be positive, got {max_length} and {tokens_per_image}")
    template = get_template(template)
    rounds, num_images = _rounds(messages, template, image_token, has_image, where)
    pieces = _pieces(rounds, template, tokenizer, image_token, _image_id(tokenizer, image_token, num_images))
    ids, labels, images = _encode_pieces(pieces, tokenizer)
    # Length as the model will see it: each placeholder becomes tokens_per_image positions.
    extra = tokens_per_image - 1
    expanded = len(ids) + extra * len(images)
    truncated = expanded > max_length
    if truncated:
        cut = max_length
        for placed, position in enumerate(images):
            # A placeholder the budget cannot hold whole is cut: the model would see part of an image.
            if position + extra * placed + tokens_per_image > max_length:
                raise SkippedSample(IMAGE_CUT, f"{where} needs {expanded} tokens, max_length is {max_length}")
            cut -= extra
        ids, labels = ids[:cut], labels[:cut]
    if all(label == IGNORE_INDEX for label in labels):
        detail = f"cut to max_length {max_length}" if truncated else "its replies encode to no token"
        raise SkippedSample(NOTHING_SUPERVISED, f"{where} ({detail})")
    return EncodedConversation(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                               truncated, len(images))


def encode_prompt(messages: Sequence[dict], template: str | Template, tokenizer,
                  image_token: str = DEFAULT_IMAGE_TOKEN, *, has_image: bool | None = None,
                  where: str = "prompt") -> torch.Tensor:
    """The ids (T,) of an inference prompt: the conversation so far, ending with the human turn to
    answer and the assistant's role marker ("... ASSISTANT:"), built from the same segments as
    `encode_conversation` so that generation starts from exactly what training saw."""
    template = get_template(template)
    rounds, num_images = _rounds(messages, template, image_token, has_image, where, prompt=True)
    pieces = _pieces(rounds, template, tokenizer, image_token, _image_id(tokenizer, image_token, num_images))
    ids, _, _ = _encode_pieces(pieces, tokenizer)
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- records


def conversation_records(records: Sequence[dict], types: Sequence[str] | None = None) -> list[dict]:
    """Flat LLaVA records (one conversation each) from `read_records` output.

    A record with `conversations` (LLaVA's format) is kept as it is; a record with `dialogues`
    (the synthetic dataset: `[{type, conversations}]`, several per image) gives one record per
    dialogue, whose `type` is in `types` when given, with the id `"<image or index>#<k>"`.
    Records with neither are left out.
    """
    flat = []
    for number, record in enumerate(records):
        if "conversations" in record:
            flat.append(record)
            continue
        for k, dialogue in enumerate(record.get("dialogues") or []):
            if types is None or dialogue.get("type") in types:
                base = {key: value for key, value in record.items() if key != "dialogues"}
                flat.append({**base, "id": f"{record.get('id', record.get('image', number))}#{k}",
                             "type": dialogue.get("type"), "conversations": dialogue["conversations"]})
    return flat


def conversation_texts(records: Sequence[dict]) -> list[str]:
    """Every turn's text of the records (placeholders removed): a corpus to train a tokenizer on."""
    return [turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            for record in conversation_records(records) for turn in record["conversations"]]


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of instruction-tuning conversations: pixels, `input_ids` and `labels`.

    `records` are `read_records` output with `conversations` (LLaVA's JSON) or `dialogues` (the
    synthetic dataset; flattened by `conversation_records`); records may lack an image
    (text-only conversations). Every conversation is checked when the dataset is built, so a bad
    record fails before training. A sample whose image is unreadable, or that truncation would
    cut through an image or leave unsupervised, is skipped (`__getitem__` returns None) and
    counted with its reason; use `dataset.collate` as the DataLoader's `collate_fn`. Each batch
    reports `num_skipped`, `skip_reasons` and `num_truncated`, which `SkipCounter.update` sums
    (the trainer prints the totals at the end); `counts` is the same summary for the batches
    collated in this process (with DataLoader workers, sum the batches instead).
    """

    def __init__(self, records: Sequence[dict], transform: ImageTransform | Callable | None, tokenizer,
                 template: str | Template = "vicuna_v1", max_length: int = 2048, seed: int = 0, *,
                 image_token: str = DEFAULT_IMAGE_TOKEN, tokens_per_image: int = 1):
        self.records = conversation_records(records)
        if not self.records:
            raise UserError("no record has a conversation (\"conversations\" or \"dialogues\"); give LLaVA-style records")
        self.template = get_template(template)
        self.transform, self.tokenizer = transform, tokenizer
        self.max_length, self.seed, self.epoch = int(max_length), int(seed), 0
        self.image_token, self.tokens_per_image = image_token, int(tokens_per_image)
        for index in range(len(self.records)):
            _rounds(self.records[index]["conversations"], self.template, image_token,
                    "image" in self.records[index], self._where(index))
        if any("image" in record for record in self.records):
            if transform is None:
                raise UserError("the conversations have images but no image transform was given")
            _image_id(tokenizer, image_token, 1)
        self._transform_takes_rng = isinstance(transform, ImageTransform) or _accepts_rng(transform)
        self._pending: list[dict] = []  # skips and truncations of this process not yet collated
        self.counter = SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose image augmentations __getitem__ produces (call before each epoch)."""
        self.epoch = int(epoch)

    def _where(self, index: int) -> str:
        record = self.records[index]
        return f"record {index}" + (f" (id {record['id']})" if "id" in record else "")

    def __getitem__(self, index: int) -> dict | None:
        """{"pixels": (3, H, W) or None, "input_ids": (T,), "labels": (T,), "index"}, or None when skipped."""
        record = self.records[index]
        try:
            encoded = encode_conversation(record["conversations"], self.template, self.tokenizer, self.max_length,
                                          self.image_token, has_image="image" in record,
                                          tokens_per_image=self.tokens_per_image, where=self._where(index))
        except SkippedSample as skip:
            self._pending.append({"reason": skip.reason, "ref": record.get("id", record.get("image", f"record {index}")),
                                  "detail": str(skip)})
            return None
        pixels = None
        if "image" in record:
            try:
                image = load_image(record["image"])
            except CorruptImage as error:
                self._pending.append({"reason": UNREADABLE_IMAGE, "ref": record["image"], "detail": str(error)})
                return None
            rng = sample_rng(self.seed, self.epoch, index)
            pixels = self.transform(image, rng) if self._transform_takes_rng else self.transform(image)  # (3, H, W)
        if encoded.truncated:
            self._pending.append({"reason": None, "ref": record.get("id", f"record {index}")})
        return {"pixels": pixels, "input_ids": encoded.input_ids, "labels": encoded.labels, "index": index}

    def collate(self, samples: Sequence[dict | None]) -> dict:
        """Right-padded batch: `pixels` (B, 3, H, W) (zeros for text-only samples, `has_image` (B,)
        says which), `input_ids` (B, L) padded with the pad id, `labels` (B, L) with -100 on the
        padding, `attention_mask` (B, L) bool, `indices` (B,), and this batch's skip and
        truncation counts (`num_skipped`, `skipped`, `skip_reasons`, `num_truncated`)."""
        good = [sample for sample in samples if sample is not None]
        batch: dict[str, Any] = {}
        with_pixels = [sample["pixels"] for sample in good if sample["pixels"] is not None]
        side = getattr(self.transform, "image_size", None)
        if with_pixels or side is not None:
            blank = torch.zeros_like(with_pixels[0]) if with_pixels else torch.zeros(3, side, side)
            pixels = [blank if sample["pixels"] is None else sample["pixels"] for sample in good]
            batch["pixels"] = torch.stack(pixels) if pixels else blank.new_empty(0, *blank.shape)  # (B, 3, H, W)
        length = max((len(sample["input_ids"]) for sample in good), default=0)
        input_ids = torch.full((len(good), length), self.tokenizer.pad_id, dtype=torch.long)  # (B, L)
        labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros(len(good), length, dtype=torch.bool)  # (B, L)
        for row, sample in enumerate(good):
            size = len(sample["input_ids"])
            input_ids[row, :size], labels[row, :size], attention_mask[row, :size] = sample["input_ids"], sample["labels"], True
        pending, self._pending = self._pending, []
        skips = [item for item in pending if item["reason"] is not None]
        for item in skips:
            logger.debug("skipped %s: %s", item["ref"], item["detail"])
        batch.update({
            "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "has_image": torch.tensor([sample["pixels"] is not None for sample in good], dtype=torch.bool),  # (B,)
            "indices": torch.tensor([sample["index"] for sample in good], dtype=torch.long),  # (B,)
            "num_skipped": len(samples) - len(good),
            "skipped": [str(item["ref"]) for item in skips],
            "skip_reasons": dict(Counter(item["reason"] for item in skips)),
            "num_truncated": len(pending) - len(skips),
        })
        self.counter.update(batch)
        return batch

    @property
    def counts(self) -> dict:
        """{"skipped", "skipped_examples", "skip_reasons", "truncated"} over the batches collated here."""
        return {"skip_reasons": {}, "truncated": 0, **self.counter.summary()}


def _accepts_rng(function: Callable | None) -> bool:
    try:
        return function is not None and "rng" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
