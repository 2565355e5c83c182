"""A text-only encoder: a BERT-family tower (or any text tower) that embeds sentences.

tokens (B, L) -> text tower (bidirectional, padding-masked) -> pool (mean / [CLS] / eos) -> [proj] -> (B, D)

This is what a sentence-transformers model such as all-MiniLM-L6-v2 is: `embed_texts` gives its
normalised embeddings. Trained on its own, it learns sentence embeddings the way
sentence-transformers' MultipleNegativesRankingLoss does: two captions of the same image are a
positive pair, every other caption in the batch a negative, InfoNCE at a fixed scale of 20
(symmetric here). It also serves as a pretrained text tower for LiT-style training (see
`vlmkit.interop.towers`). BERT's pooler (dense + tanh on [CLS]) is part of most BERT checkpoints:
with `pooler=True` it is kept as a real module, loaded like every other weight and exposed by
`pooler_output` (HF BertModel's `pooler_output`), but embeddings never use it, because
sentence-transformers' pooling does not.

Distillation (`training.teacher`: any model with text embeddings, e.g. the real all-MiniLM-L6-v2)
trains the tower on text alone to embed as the teacher does, keeping its own architecture and
tokenizer (a CLIP text tower with CLIP's BPE, say), so a CLIP started from it (`init_text: RUN`) has
exactly the shape of one trained from scratch. The corpus: `training.phrases` phrases of 1-4 words
drawn (seeded) from the whole words of the tower's own vocabulary, each in a caption template, plus
every caption of the training records: every word the tower can spell gets a meaning, whether or not
it occurs in image-text data. The teacher embeds each text once, when the run first visits it
(L2-normalised; `teacher_cache` keeps them on disk). The tower's embedding goes through a linear
head to the teacher's width (`distill_dim`; unused afterwards) and the loss is CLIP's symmetric
cross-entropy between the batch's student and teacher embeddings at temperature
`training.temperature`, plus 1 - their cosine.
"""
from __future__ import annotations

import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmkit.capabilities import EmbedsTexts, require
from vlmkit.encoders.config import TextConfig, build_text_tower
from vlmkit.errors import UserError
from vlmkit.io import atomic_torch_save
from vlmkit.losses import contrastive_loss, matching_accuracy
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


def _bert_text() -> TextConfig:
    return TextConfig(causal=False, pool="mean", prenorm=False, embed_norm=True, type_vocab_size=2,
                      eos_token_id=None, norm_eps=1e-12, context_length=512)


@dataclass
class TextEncoderConfig:
    text: TextConfig = field(default_factory=_bert_text)
    embed_dim: int | None = None  # a projection after pooling; None = the pooled width as it is
    pooler: bool = False  # BERT's pooler (dense + tanh on [CLS]), kept so BERT checkpoints load whole
    # "openclip": OpenCLIP's initialisation of a causal (CLIP) text tower, as a CLIP's `init: openclip`
    # gives it; "torch": PyTorch's module defaults.
    init: str = "torch"
    # The teacher's embedding width when the tower is distilled (`training.teacher`): a linear head from
    # the tower's embedding to it, trained with the tower and used by nothing else. None: no head.
    distill_dim: int | None = None

    def __post_init__(self) -> None:
        if self.init not in ("openclip", "torch"):
            raise UserError(f"unknown text encoder init '{self.init}'; use 'openclip' or 'torch'")
        if self.distill_dim is not None and self.distill_dim < 1:
            raise UserError(f"distill_dim must be at least 1, got {self.distill_dim}")


# Caption templates the vocabulary phrases of a distillation corpus are written in.
PHRASE_TEMPLATES = ("{}", "{}", "a {}.", "an icon of {}.", "a picture of {}.", "a photo of the {}.", "the {}")


@dataclass
class TextEncoderTraining:
    """The recipe's `training:` options of a sentence encoder."""

    scale: float = 20.0  # the fixed similarity scale of sentence-transformers' MultipleNegativesRankingLoss
    # Distillation instead of caption pairs: a checkpoint `vlmkit.load` reads whose model embeds texts
    # (`package:NAME/folder` for one installed as a Python package, as `init_text` takes).
    teacher: str | None = None
    phrases: int = 0  # vocabulary phrases in the corpus, besides the records' captions
    templates: list[str] = field(default_factory=lambda: list(PHRASE_TEMPLATES))  # each with one {}
    temperature: float = 0.05  # of the contrastive term between student and teacher embeddings
    teacher_cache: str | None = None  # a file keeping the teacher's embeddings (reused when corpus and teacher match)

    def __post_init__(self) -> None:
        if self.phrases < 0:
            raise UserError(f"training.phrases must be 0 or more, got {self.phrases}")
        if not self.temperature > 0:
            raise UserError(f"training.temperature must be above 0, got {self.temperature}")
        if any(template.count("{}") != 1 for template in self.templates):
            raise UserError("every training.templates entry needs exactly one {} for the phrase")


class CaptionPairs(torch.utils.data.Dataset):
    """Two different captions of one record per sample (records with at least two captions).

    The pair of sample `index` at an epoch is drawn from its own seeded generator, so a resumed
    run sees the same pairs. `collate` gives `tokens` and `pair_tokens`, both (B, L).
    """

    def __init__(self, records, tokenizer, seed: int = 0):
        self.records = [record for record in records if len(record.get("texts") or []) >= 2]
        if not self.records:
            raise UserError("no training record has two or more captions ('texts'), which a text encoder trains on as pairs")
        self.tokenizer, self.seed, self.epoch = tokenizer, seed, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[str, str]:
        rng = random.Random(f"vlmkit-pairs:{self.seed}:{self.epoch}:{index}")
        first, second = rng.sample(self.records[index]["texts"], 2)
        return first, second

    def collate(self, pairs) -> dict:
        return {"tokens": self.tokenizer([a for a, _ in pairs]), "pair_tokens": self.tokenizer([b for _, b in pairs]),
                "num_skipped": 0, "skipped": []}


def vocabulary_words(tokenizer) -> list[str]:
    """The whole words of a tokenizer's vocabulary, sorted: BPE tokens that end a word (`music</w>`) and
    WordPiece tokens that start one (not `##ing`), alphabetic, lower case, 2+ letters."""
    words = set()
    for token in tokenizer.backend.get_vocab():
        if token.endswith("</w>"):
            token = token[: -len("</w>")]
        elif token.startswith("##") or token.startswith("["):
            continue
        if re.fullmatch(r"[a-z]{2,}", token):
            words.add(token)
    return sorted(words)


def vocabulary_phrases(words: list[str], count: int, seed: int, templates=PHRASE_TEMPLATES) -> list[str]:
    """`count` phrases of 1-4 words drawn (seeded) from `words`, each written in one of `templates`."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        phrase = " ".join(rng.choice(words) for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))
        texts.append(rng.choice(templates).format(phrase))
    return texts


def load_teacher(source: str):
    """The model at `source` (a path or `package:NAME/folder`), checked to embed texts, in eval mode."""
    from vlmkit.hub import load
    from vlmkit.interop.towers import resolve

    teacher = load(resolve(source)).eval()
    require(teacher, EmbedsTexts, f"distilling from teacher {source}")
    return teacher


class DistillationTexts(torch.utils.data.Dataset):
    """The distillation corpus: sample `index` is text `index`; `collate` gives `tokens` (B, L) and
    `targets` (B, D_teacher), the teacher's L2-normalised embeddings.

    The teacher embeds the corpus in fixed chunks of `CHUNK` consecutive texts, each the first time a
    batch needs one of its texts: a short run embeds only what it visits, a long one the whole corpus
    once (mostly in its first steps), and a text's target never depends on which batch asked for it,
    so a resumed run sees the same targets. With `cache`, the finished targets are kept on disk with
    their texts and teacher, and reused by a run over exactly that corpus and teacher.
    """

    CHUNK = 64

    def __init__(self, texts: list[str], tokens: torch.Tensor, teacher: str, cache: str | None = None):
        if not texts:
            raise UserError("the distillation corpus is empty: the records have no captions and training.phrases is 0")
        self.texts, self.tokens, self.source, self.cache = texts, tokens, teacher, cache
        self.chunks_done = torch.zeros(math.ceil(len(texts) / self.CHUNK), dtype=torch.bool)
        self.targets: torch.Tensor | None = None  # (N, D_teacher) once the first chunk is embedded
        self.teacher = None
        if cache and Path(cache).exists():
            saved = torch.load(cache, weights_only=True)
            if saved.get("teacher") == teacher and saved.get("texts") == texts:
                self.targets, self.chunks_done[:] = saved["targets"], True
            else:
                print(f"vlmkit: {cache} holds another corpus or teacher; the teacher embeds this one", file=sys.stderr)
        if self.targets is None:
            self.teacher = load_teacher(teacher)  # loaded now, so a bad teacher fails before the run starts
            print(f"vlmkit: the teacher embeds the {len(texts):,} texts of the corpus as the run first visits them, "
                  f"so the first steps are slow", file=sys.stderr)
            self.teacher_targets(torch.zeros(1, dtype=torch.long))  # the first chunk now: it gives the teacher's width

    @property
    def width(self) -> int:
        """The teacher's embedding width."""
        return self.targets.shape[-1]

    def __len__(self) -> int:
        return len(self.texts)

    def set_epoch(self, epoch: int) -> None:
        pass  # a sample is a fixed text: nothing is drawn per epoch

    def __getitem__(self, index: int) -> int:
        return index

    def teacher_targets(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, D_teacher) targets of corpus rows `rows` (B,), embedding the chunks not embedded yet."""
        for chunk in torch.unique(rows // self.CHUNK).tolist():
            if self.chunks_done[chunk]:
                continue
            start = chunk * self.CHUNK
            with torch.no_grad():
                embedded = self.teacher.embed_texts(self.texts[start:start + self.CHUNK], batch_size=self.CHUNK)
            if self.targets is None:
                self.targets = torch.zeros(len(self.texts), embedded.shape[-1])
            self.targets[start:start + len(embedded)] = embedded
            self.chunks_done[chunk] = True
            if self.cache and bool(self.chunks_done.all()):
                atomic_torch_save(self.cache, {"teacher": self.source, "texts": self.texts, "targets": self.targets})
        return self.targets[rows]

    def collate(self, indices) -> dict:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {"tokens": self.tokens[rows], "targets": self.teacher_targets(rows), "num_skipped": 0, "skipped": []}


@register_family
class TextEncoder(VLModel):
    family = "text_encoder"
    config_class = TextEncoderConfig
    capabilities = (EmbedsTexts,)
    training_class = TextEncoderTraining
    towers = {"text": "text"}
    export_formats = {"hf": "vlmkit.interop.bert:export"}

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config)
        self.text = build_text_tower(config.text, config.embed_dim)
        if config.init == "openclip" and config.text.causal:
            self.text.init_openclip()
        self.pooler = nn.Linear(config.text.width, config.text.width) if config.pooler else None
        embed_dim = config.embed_dim or config.text.width
        # (D -> D_teacher), only for distillation training (see the module docstring)
        self.distill_head = nn.Linear(embed_dim, config.distill_dim, bias=False) if config.distill_dim else None

    def _trim(self, tokens: torch.Tensor) -> torch.Tensor:
        # A bidirectional tower masks padding out of attention and pooling, so trailing columns
        # that are padding in every row change nothing: drop them (texts are padded to 256-512).
        if self.text.causal:
            return tokens
        real = self.text.real_tokens(tokens).any(dim=0)  # (L,)
        length = int(real.nonzero().max()) + 1 if real.any() else 1
        return tokens[:, :length]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) sentence embeddings (not L2-normalised)."""
        return self.text(self._trim(tokens)).pooled

    def pooler_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """HF BertModel's `pooler_output`: tanh(dense(hidden state at [CLS])). (B, W)"""
        if self.pooler is None:
            raise UserError("this text encoder has no pooler weights; load a BERT checkpoint that has 'pooler.dense'")
        return torch.tanh(self.pooler(self.text(self._trim(tokens)).tokens[:, 0]))

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        if "targets" in batch:
            return self._distillation_loss(batch["tokens"], batch["targets"])
        first = self.encode_text(batch["tokens"])  # (B, D)
        second = self.encode_text(batch["pair_tokens"])  # (B, D)
        scale = torch.tensor(math.log(self.training_options.scale), device=first.device)
        loss, logits = contrastive_loss(first, second, scale, local_loss=True)
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, pair_acc=matching_accuracy(logits)))

    def _distillation_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """Contrastive (student vs teacher over the batch) + 1 - cosine, through the distillation head."""
        self._check_teacher_width(targets.shape[-1])
        predicted = nn.functional.normalize(self.distill_head(self.encode_text(tokens)), dim=-1)  # (B, D_teacher)
        scale = torch.tensor(math.log(1 / self.training_options.temperature), device=predicted.device)
        contrastive, logits = contrastive_loss(predicted, targets, scale, local_loss=True)
        cosine = (predicted * targets).sum(dim=-1).mean()
        loss = contrastive + (1 - cosine)
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, cosine=cosine, match_acc=matching_accuracy(logits)))

    def _check_teacher_width(self, width: int) -> None:
        if self.distill_head is None or self.distill_head.out_features != width:
            raise UserError(f"distilling from a teacher of width {width} needs model.distill_dim={width} "
                            f"(the model has {self.config.distill_dim})")

    def training_dataset(self, records, transform, tokenizer, seed: int, caption: str = "random"):
        options = self.training_options
        if options.teacher is None:
            return CaptionPairs(records, tokenizer, seed=seed)
        if self.distill_head is None:
            raise UserError("training.teacher distils into the tower through a head: set model.distill_dim to the "
                            "teacher's embedding width (384 for all-MiniLM-L6-v2)")
        texts = vocabulary_phrases(vocabulary_words(tokenizer), options.phrases, seed, tuple(options.templates))
        texts += [text for record in records for text in record.get("texts") or []]
        tokens = torch.cat([tokenizer(texts[start:start + 4096]) for start in range(0, len(texts), 4096)])  # (N, L)
        dataset = DistillationTexts(texts, tokens, options.teacher, options.teacher_cache)
        self._check_teacher_width(dataset.width)  # before the run folder is written
        return dataset

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        text = self.config.text
        tokens = torch.randint(1, text.vocab_size, (2 * batch_size, min(text.context_length, 16)), generator=generator)
        tokens[1::2, 10:] = text.pad_token_id  # some padded rows
        return {"tokens": tokens[:batch_size], "pair_tokens": tokens[batch_size:]}


# all-MiniLM-L6-v2 / nreimers/MiniLM-L6-H384-uncased, the shape sentence-transformers popularised.
register_config("minilm-l6-h384", "text_encoder", {
    "text": {"vocab_size": 30522, "context_length": 512, "width": 384, "depth": 6, "heads": 12, "causal": False,
             "pool": "mean", "prenorm": False, "embed_norm": True, "type_vocab_size": 2, "eos_token_id": None,
             "norm_eps": 1e-12},
    "pooler": True,
})
# The shape of a tiny CLIP's text tower (causal, pooled at the first end token, projected to 128), for
# distilling a teacher into it on text alone before a CLIP starts from it (`init_text`).
register_config("clip-text-tiny", "text_encoder", tiny=True, config={
    "embed_dim": 128, "init": "openclip",
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 3, "heads": 4, "causal": True,
             "pool": "eos", "prenorm": True, "embed_norm": False, "type_vocab_size": 0, "eos_token_id": 1023,
             "norm_eps": 1e-5},
})
register_config("text-encoder-tiny", "text_encoder", tiny=True, config={
    "text": {"vocab_size": 1024, "context_length": 32, "width": 128, "depth": 2, "heads": 4, "causal": False,
             "pool": "mean", "prenorm": False, "embed_norm": True, "type_vocab_size": 2, "eos_token_id": None},
})
