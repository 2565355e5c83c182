"""Text tokenizers: one thin layer over the HF `tokenizers` library for every model family.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the "backend") and adds what models need: fixed-length
`(B, L)` id tensors whose truncation keeps the end token, the special ids a model pools or masks
at, and a folder format. Three pipelines are built here from the library's own components:

- "clip": OpenAI CLIP's byte-level BPE with the `</w>` end-of-word suffix, text cleaned as HF's
  CLIPTokenizerFast does (NFC, whitespace collapsed, lowercase; no ftfy or HTML unescaping).
  `clip_tokenizer()` gives the real 49,408-token vocabulary from the packaged OpenAI merges;
  `train_clip_bpe()` trains a small one on a corpus.
- "bert": WordPiece with [CLS] ... [SEP] and [PAD] (`train_wordpiece()`, or a BERT `vocab.txt`).
- "generic": any other `tokenizer.json`, used as it is.

`Tokenizer.load()` reads a vlmkit folder, an HF folder with `tokenizer.json`, an HF CLIP folder with
`vocab.json` + `merges.txt`, or a BERT folder with `vocab.txt`.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The `tokenizers` library batch-encodes on its own thread pool, whose threads keep spinning
# after each call and starve PyTorch's intra-op threads: measured here, a training step of the
# demo CLIP ran 3.5x slower on 2 cores (22 vs 78 samples/s). Batches of captions are tiny, so
# vlmkit turns that pool off unless the user has chosen otherwise.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tokenizers  # noqa: E402  (after the environment variable above)
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlmkit.errors import UserError

__all__ = ["Tokenizer", "clip_tokenizer", "train_clip_bpe", "train_wordpiece"]

CLIP_BPE_ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word split (OpenAI's SimpleTokenizer and HF's CLIPTokenizerFast): the special tokens,
# common English contractions, runs of letters, single digits, and runs of anything else.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# OpenAI CLIP uses this many merges of its merges file (49,408 tokens = 512 bytes + merges + 2).
CLIP_NUM_MERGES = 49152 - 256 - 2
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
KINDS = ("clip", "bert", "generic")
DEFAULT_CONTEXT = {"clip": 77, "bert": 512, "generic": 512}
CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """Text to fixed-length id tensors, for every model family.

    Wraps a `tokenizers.Tokenizer` (available as `.backend`, with its own padding and truncation
    turned off because this class does both) and records the ids models depend on: `bos_id`
    (<|startoftext|> or [CLS]), `eos_id` (<|endoftext|> or [SEP]; CLIP pools there), `pad_id` and
    an optional `mask_id`. Calling it returns a `(B, context_length)` LongTensor: sequences are
    padded with `pad_id` on the right, and a sequence that overflows is cut and its last slot set
    back to `eos_id`, so the end token is always present (the CLIP and BERT rule alike).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        kind: str = "generic",
        context_length: int = 77,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int = 0,
        mask_id: int | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind '{kind}'; expected one of {KINDS}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.kind = kind
        self.context_length = int(context_length)
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos_id, eos_id, int(pad_id), mask_id
        # CLIP's BPE marks word ends with "</w>"; decoding turns it back into a space (as HF does).
        model = backend.model
        self._word_suffix = model.end_of_word_suffix if isinstance(model, models.BPE) else None

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, mask_id={self.mask_id})"
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the size of a model's embedding table)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, or None when it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Register `tokens` (e.g. "<image>") as special tokens and return their ids, in order.

        A special token is matched in text before normalization and splitting, so it always
        encodes as its one id and is dropped by `decode(skip_special_tokens=True)`. Tokens already in
        the vocabulary keep their id; new ones get the next ids, so `vocab_size` grows and a model's
        embedding table must grow with it. The tokens are saved with the tokenizer.
        """
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    # ----------------------------------------------------------------------------- encoding
    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Encode one text or a batch into a `(B, L)` LongTensor with special tokens, padded to L.

        L is `context_length` if given, else the tokenizer's own. Encoding runs in the backend's
        parallel `encode_batch`; the tensor is assembled with numpy in one scatter, not per token.
        """
        from vlmkit.data.limits import current_limits

        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        # Cut before encoding: an 11 MB caption would take half a minute to encode only for all
        # but the first `length` tokens to be dropped below (see vlmkit.data.limits).
        limit = current_limits().max_text_chars
        texts = [text if len(text) <= limit else text[:limit] for text in texts]
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        return torch.from_numpy(self._pad([encoding.ids for encoding in encodings], length))

    def _pad(self, sequences: list[list[int]], length: int) -> np.ndarray:
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(sequences)), lengths)
        columns = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = columns < length
        out = np.full((len(sequences), length), self.pad_id, dtype=np.int64)
        out[rows[keep], columns[keep]] = flat[keep]
        if self.eos_id is not None:
            # An overflowing sequence keeps its end token: [sot] + first L-2 tokens + [eot]. Only
            # sequences that did end with it get it back (a generic tokenizer may add none).
            overflow = np.flatnonzero(lengths > length)
            overflow = overflow[flat[np.cumsum(lengths)[overflow] - 1] == self.eos_id]
            out[overflow, length - 1] = self.eos_id
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text, with the special tokens unless told otherwise; no padding, no truncation
        (beyond the cut of every text to `max_text_chars` characters, see vlmkit.data.limits)."""
        from vlmkit.data.limits import cut_text

        return self.backend.encode(cut_text(text), add_special_tokens=add_special_tokens).ids

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where `tokens` (B, L) hold text or special tokens, False on the trailing padding.

        Works from the right, not by comparing with `pad_id` everywhere, because CLIP's pad id 0 is
        also the token "!" and HF's openai tokenizer pads with <|endoftext|>, which must stay
        visible once: when `pad_id == eos_id` the first padding slot is that end token.
        """
        not_pad = tokens != self.pad_id  # (B, L)
        positions = torch.arange(tokens.shape[-1], device=tokens.device)
        last = torch.where(not_pad, positions, -1).amax(dim=-1, keepdim=True)  # (B, 1)
        if self.pad_id == self.eos_id:
            last = last + 1
        return positions <= last  # (B, L)

    # ----------------------------------------------------------------------------- decoding
    def _strip_padding(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        end = len(ids)
        while end and ids[end - 1] == self.pad_id:
            end -= 1
        # The first padding slot is the end token when both share an id (HF's openai convention).
        if end < len(ids) and self.pad_id == self.eos_id:
            end += 1
        return ids[:end]

    def _clean(self, text: str) -> str:
        return text.replace(self._word_suffix, " ").strip() if self._word_suffix else text

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence; trailing padding is dropped, special tokens too unless told otherwise."""
        return self._clean(
            self.backend.decode(self._strip_padding(ids), skip_special_tokens=skip_special_tokens)
        )

    def batch_decode(
        self, sequences: Iterable[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """Texts of a batch of id sequences (a `(B, L)` tensor or lists), as `decode` does each."""
        rows = [self._strip_padding(row) for row in sequences]
        return [
            self._clean(t) for t in self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        ]

    # ----------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory` and return it.

        The config holds vlmkit's fields (kind, context length, special ids) under "vlmkit" and the
        usual HF keys (model_max_length and special token strings), so HF transformers can read the
        folder too.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        names = {"bos_id": "bos_token", "eos_id": "eos_token", "pad_id": "pad_token", "mask_id": "mask_token"}
        if self.kind == "bert":
            names.update(bos_id="cls_token", eos_id="sep_token")
        config: dict[str, Any] = {"model_max_length": self.context_length}
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        for field, key in names.items():
            token = None if getattr(self, field) is None else self.backend.id_to_token(getattr(self, field))
            # Only special tokens: HF registers these as special, so naming CLIP's pad id 0 ("!")
            # would make it split every "!" out of the text.
            if token in special:
                config[key] = token
        if self.kind == "bert" and self.token_to_id("[UNK]") is not None:
            config["unk_token"] = "[UNK]"
        config["vlmkit"] = {
            "kind": self.kind,
            "context_length": self.context_length,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    def save_vocab(self, directory: str | Path) -> list[Path]:
        """Write the model's plain vocabulary files: `vocab.json` + `merges.txt` (BPE) or `vocab.txt`.

        These are the files HF's slow/fast tokenizer classes accept directly (e.g. CLIPTokenizerFast
        from `vocab.json` + `merges.txt`); returns the written paths.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [Path(p) for p in self.backend.model.save(str(directory))]

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer folder (or the path of its `tokenizer.json`).

        Reads, in this order: a folder written by `save`; an HF folder with `tokenizer.json` (special
        tokens and `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json`); an
        HF CLIP folder with `vocab.json` + `merges.txt`; a BERT folder with `vocab.txt`. The kind
        (clip, bert, generic) is inferred from the model when the folder does not state it.
        """
        path = Path(path)
        directory = path.parent if path.is_file() else path
        if not directory.is_dir():
            raise UserError(
                f"tokenizer folder {path} does not exist; "
                f"give the folder that holds tokenizer.json or the vocabulary files"
            )
        config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / CONFIG_FILE)}
        saved = config.get("vlmkit")
        tokenizer_json = path if path.is_file() else directory / "tokenizer.json"

        if tokenizer_json.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
            except Exception as error:  # the Rust parser raises plain Exceptions
                raise UserError(
                    f"{tokenizer_json} is not a valid tokenizer.json ({str(error).splitlines()[0]}); "
                    f"re-export it with tokenizers or transformers' save_pretrained"
                ) from None
            if isinstance(saved, dict):
                try:
                    return cls(backend, **saved)
                except (TypeError, ValueError) as error:
                    raise UserError(
                        f"the 'vlmkit' entry of {directory / CONFIG_FILE} is invalid ({error}); "
                        f"re-save the tokenizer with Tokenizer.save"
                    ) from None
            kind = _infer_kind(backend)
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab = _read_json(directory / "vocab.json")
            if SOT not in vocab or EOT not in vocab:
                raise UserError(
                    f"{directory / 'vocab.json'} has no {SOT} / {EOT} entries, so it is not a CLIP "
                    f"vocabulary; give a CLIP tokenizer folder or one with tokenizer.json"
                )
            backend = _build(directory, _clip_backend, vocab, _read_merges(directory / "merges.txt"))
            kind = "clip"
        elif (directory / "vocab.txt").is_file():
            vocab = _read_vocab_txt(directory / "vocab.txt")
            backend = _build(
                directory,
                _bert_backend,
                vocab,
                lowercase=config.get("do_lower_case", True),
                strip_accents=config.get("strip_accents"),
                handle_chinese_chars=config.get("tokenize_chinese_chars", True),
            )
            kind = "bert"
        else:
            raise UserError(
                f"no tokenizer files in {directory}; "
                f"it needs tokenizer.json, vocab.json + merges.txt, or vocab.txt"
            )
        return cls(backend, kind=kind, **_special_ids(backend, kind, config))


# --------------------------------------------------------------------------------- CLIP
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (and GPT-2's) byte -> printable character map, in CLIP's vocabulary order.

    Printable Latin-1 bytes map to themselves and the rest to characters from U+0100 on; the
    dict's order is the order of CLIP's first 256 ids, which the library's unordered
    `ByteLevel.alphabet()` cannot give.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    characters = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, characters, strict=True)}


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: 256 bytes, their 256 `</w>` forms, one token per merge, then SOT, EOT.

    EOT gets the highest id, which CLIP models rely on: they pool text at the argmax token id.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = (
        byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(pair) for pair in merges] + [SOT, EOT]
    )
    # dict.fromkeys keeps the first id of a repeated string (a trained BPE can merge two ways into one).
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _clip_backend(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> tokenizers.Tokenizer:
    """The CLIP pipeline of HF's CLIPTokenizerFast, built from the library's components."""
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=list(merges),
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
        )
    )
    _set_clip_pipeline(backend)
    # Registered as special so a literal "<|endoftext|>" in a text maps to its id, as in HF.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    return backend


def _set_clip_pipeline(backend: tokenizers.Tokenizer) -> None:
    # HF's cleaning, which stands in for OpenAI's ftfy + HTML unescape + whitespace_clean + lower.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()


def _clip_merges_from_asset(path: Path = CLIP_BPE_ASSET) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    # Line 0 is the "#version" header; CLIP keeps the first 48,894 merges.
    return [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]


def clip_tokenizer(context_length: int = 77, pad_id: int = 0) -> Tokenizer:
    """OpenAI CLIP's tokenizer: the real 49,408-token byte-level BPE, from the packaged merges.

    Ids match OpenAI's SimpleTokenizer / HF's `vocab.json` (<|startoftext|> 49406, <|endoftext|>
    49407) and encodings match HF's CLIPTokenizerFast. Pads with 0 as OpenCLIP does; pass
    `pad_id=49407` for HF's openai convention. `Tokenizer.save_vocab` exports `vocab.json` +
    `merges.txt` for use with HF.
    """
    merges = _clip_merges_from_asset()
    backend = _clip_backend(_clip_vocab(merges), merges)
    return Tokenizer(
        backend, kind="clip", context_length=context_length, bos_id=49406, eos_id=49407, pad_id=pad_id
    )


# The `tokenizers` BPE / WordPiece trainers (0.23) create the word-final ("x</w>") and continuing
# ("##x") symbols lazily, in the iteration order of a hash map with a random seed, and break ties
# between equally frequent merges by symbol id: the same corpus gave a different vocabulary on each
# run (huggingface/tokenizers#1794; measured here: every vlmkit run of a WordPiece recipe differed).
# Naming those symbols up front, sorted, as the trainer's leading "special" tokens fixes their ids,
# so training is deterministic; the vocabularies are then rebuilt without them as added tokens.
def _continuing_symbols(backend: tokenizers.Tokenizer, texts: Sequence[str], prefix: str) -> list[str]:
    """Sorted `prefix + c` for every character c the trainer will see after the first of a word
    (the symbols WordPieceTrainer would otherwise create in a random order)."""
    characters: set[str] = set()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            characters.update(word[1:])
    return sorted(prefix + character for character in characters)


def _cut_texts(texts: Iterable[str]) -> Iterable[str]:
    """The training texts, each cut to `max_text_chars` (an 11 MB caption must not stall training)."""
    from vlmkit.data.limits import current_limits

    limit = current_limits().max_text_chars
    return (text if len(text) <= limit else text[:limit] for text in texts)


def train_clip_bpe(
    texts: Iterable[str], vocab_size: int, context_length: int = 77, pad_id: int = 0
) -> Tokenizer:
    """Train a CLIP-style byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`.

    Same pipeline and id layout as `clip_tokenizer()`: the 512 byte tokens (with and without
    `</w>`, so any text encodes without unknowns), the learned merges in order, then
    <|startoftext|> and <|endoftext|>, which is the highest id. A small corpus can give fewer merges
    than asked for, hence "at most".
    """
    num_merges = vocab_size - 2 * 256 - 2
    if num_merges < 1:
        raise UserError(
            f"a CLIP BPE vocabulary needs more than 514 tokens (512 bytes + 2 special), "
            f"got vocab_size={vocab_size}; raise it"
        )
    backend = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    _set_clip_pipeline(backend)
    # The trainer counts the alphabet it sees (up to 512 symbols) in its vocab size; ask for room
    # for all merges, then keep exactly the first ones (a prefix of BPE merges is a valid BPE).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=num_merges + 2 * 256,
        special_tokens=[character + END_OF_WORD for character in alphabet],  # fixed ids: see _continuing_symbols
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    backend.train_from_iterator(_cut_texts(texts), trainer)
    merges = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"][:num_merges]]
    vocab = _clip_vocab(merges)
    return Tokenizer(
        _clip_backend(vocab, merges),
        kind="clip",
        context_length=context_length,
        bos_id=vocab[SOT],
        eos_id=vocab[EOT],
        pad_id=pad_id,
    )


# --------------------------------------------------------------------------------- BERT
def _bert_backend(
    vocab: dict[str, int],
    lowercase: bool = True,
    strip_accents: bool | None = None,
    handle_chinese_chars: bool = True,
) -> tokenizers.Tokenizer:
    """BERT's WordPiece pipeline (as HF's BertTokenizerFast builds it) over a given vocabulary."""
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    _set_bert_pipeline(backend, lowercase, strip_accents, handle_chinese_chars)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS if t in vocab]
    )
    _set_bert_template(backend)
    return backend


def _set_bert_pipeline(
    backend: tokenizers.Tokenizer, lowercase: bool, strip_accents: bool | None, handle_chinese_chars: bool
) -> None:
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=handle_chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")


def _set_bert_template(backend: tokenizers.Tokenizer) -> None:
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise UserError("a BERT vocabulary needs [CLS] and [SEP] entries; add them to vocab.txt")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def train_wordpiece(texts: Iterable[str], vocab_size: int, context_length: int = 77) -> Tokenizer:
    """Train a BERT-style lowercase WordPiece tokenizer of at most `vocab_size` tokens on `texts`.

    Special tokens come first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; text is cleaned,
    lowercased and accent-stripped by BertNormalizer and split by BertPreTokenizer. Encodings are
    [CLS] ... [SEP] padded with [PAD].
    """
    if vocab_size <= len(BERT_SPECIALS):
        raise UserError(
            f"a WordPiece vocabulary needs more than {len(BERT_SPECIALS)} tokens, "
            f"got vocab_size={vocab_size}; raise it"
        )
    texts = list(_cut_texts(texts))
    trained = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    _set_bert_pipeline(trained, lowercase=True, strip_accents=None, handle_chinese_chars=True)
    continuing = _continuing_symbols(trained, texts, "##")  # fixed ids: see _continuing_symbols
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS) + continuing, show_progress=False
    )
    trained.train_from_iterator(texts, trainer)
    # the same pipeline over the learned vocabulary, with only BERT's specials as added tokens
    backend = _bert_backend(json.loads(trained.to_str())["model"]["vocab"], lowercase=True, strip_accents=None)
    ids = {t: backend.token_to_id(t) for t in BERT_SPECIALS}
    return Tokenizer(
        backend,
        kind="bert",
        context_length=context_length,
        bos_id=ids["[CLS]"],
        eos_id=ids["[SEP]"],
        pad_id=ids["[PAD]"],
        mask_id=ids["[MASK]"],
    )


# --------------------------------------------------------------------------------- loading helpers
def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or re-export the file") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise UserError(
                f"{path} line {number} is not a merge ('left right'); fix or re-export merges.txt"
            )
        merges.append((pair[0], pair[1]))
    return merges


def _read_vocab_txt(path: Path) -> dict[str, int]:
    # One token per line, the id is the line number (BERT's format; tokens may contain spaces).
    return {token: i for i, token in enumerate(path.read_text(encoding="utf-8").rstrip("\n").split("\n"))}


def _build(directory: Path, builder, *args, **kwargs) -> tokenizers.Tokenizer:
    try:
        return builder(*args, **kwargs)
    except UserError:
        raise
    except Exception as error:  # the library rejects e.g. merges of tokens missing from the vocab
        raise UserError(
            f"the vocabulary files in {directory} do not form a tokenizer ({error}); fix or re-export them"
        ) from None


def _infer_kind(backend: tokenizers.Tokenizer) -> str:
    model, vocab = backend.model, backend.get_vocab()
    if isinstance(model, models.WordPiece) and "[CLS]" in vocab and "[SEP]" in vocab:
        return "bert"
    if isinstance(model, models.BPE) and model.end_of_word_suffix == END_OF_WORD and EOT in vocab:
        return "clip"
    return "generic"


def _token_string(value: Any) -> str | None:
    # HF configs store special tokens as strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _special_ids(backend: tokenizers.Tokenizer, kind: str, config: dict) -> dict[str, Any]:
    """Special ids and context length from HF config keys, with each kind's conventional defaults."""
    keys = {"bos_id": "bos_token", "eos_id": "eos_token", "pad_id": "pad_token", "mask_id": "mask_token"}
    defaults: dict[str, str | None] = {"bos_id": None, "eos_id": None, "pad_id": None, "mask_id": None}
    if kind == "clip":
        defaults.update(bos_id=SOT, eos_id=EOT)
    elif kind == "bert":
        keys.update(bos_id="cls_token", eos_id="sep_token")
        defaults.update(bos_id="[CLS]", eos_id="[SEP]", pad_id="[PAD]", mask_id="[MASK]")
    ids: dict[str, Any] = {}
    for field, key in keys.items():
        token = _token_string(config.get(key)) or defaults[field]
        ids[field] = backend.token_to_id(token) if token is not None else None
    if ids["pad_id"] is None:
        ids["pad_id"] = 0  # OpenCLIP's convention, and a harmless id for other kinds
    max_length = config.get("model_max_length")
    # HF writes a huge sentinel (1e30) when a tokenizer has no length limit.
    ok = isinstance(max_length, (int, float)) and 2 <= max_length <= 1_000_000
    ids["context_length"] = int(max_length) if ok else DEFAULT_CONTEXT[kind]
    return ids
