"""The torch Dataset the trainer iterates: records -> (pixels, caption), bad images skipped and counted.

Reproducibility: the caption choice and the augmentation of sample `index` at `epoch` come from
`random.Random(f"{seed}:{epoch}:{index}")` (string seeds hash with SHA-512, identical in every
process and on every machine), so a resumed run sees exactly the batches it would have seen.

Bad samples: a missing or undecodable image makes `__getitem__` return None (never raise), and
`collate` drops the Nones and reports `num_skipped` plus, through `ImageTextDataset.collate`, the
skipped image references. Both run in the same worker process for a given batch, which is how
the references reach the batch without any cross-process state. `SkipCounter` sums them for the
end-of-run report.
"""
from __future__ import annotations

import inspect
import logging
import random
from typing import Any, Callable, Sequence

import torch

from vlmkit.data.formats import CorruptImage, load_image
from vlmkit.data.transforms import ImageTransform

logger = logging.getLogger("vlmkit.data")

Tokenizer = Callable[[list[str]], torch.Tensor]  # list of B strings -> LongTensor (B, L)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random generator of one sample at one epoch (same arguments -> same stream, anywhere)."""
    return random.Random(f"vlmkit-sample:{seed}:{epoch}:{index}")


def task_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A second stream per sample for what a family draws (a question or a caption, a split point),
    separate from the caption/augmentation stream so that adding a draw never moves the crops."""
    return random.Random(f"vlmkit-task:{seed}:{epoch}:{index}")


def batch_seed(seed: int, epoch: int, indices: torch.Tensor) -> int:
    """A seed that is a function of the run seed, the epoch and the batch's samples (a plain int, no
    device sync): random draws inside a training step (BLIP's hard negatives) seeded from it repeat
    exactly in a resumed run, whatever else consumed the global RNG in between."""
    import hashlib

    key = f"{seed}:{epoch}:{indices.tolist()}".encode()
    return int(hashlib.sha256(key).hexdigest()[:15], 16)


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset over `read_records` output, yielding preprocessed pixels and one caption.

    `caption="random"` draws one of the record's `texts` per (seed, epoch, index); `"first"`
    always takes the first; `"pairs"` makes every (image, caption) pair a sample of its own, each seen
    once an epoch (OpenCLIP's sampling of a CSV with a row per pair): the dataset then holds one
    single-caption record per pair, so subclasses and indices work unchanged. Use `dataset.collate`
    as the DataLoader's `collate_fn`: it tokenizes the whole batch at once with `tokenizer` (any
    callable list[str] -> LongTensor (B, L)) and reports skipped images. `cache_images=True` keeps every decoded image in memory after its
    first use (about 12 KB per 64 px image: worth it for the synthetic dataset, where decoding
    the PNG is half the cost of a sample; not for web-scale data).
    """

    def __init__(self, records: Sequence[dict], transform: ImageTransform | Callable, tokenizer: Tokenizer | None = None,
                 caption: str = "random", seed: int = 0, cache_images: bool = False):
        if caption not in ("random", "first", "pairs"):
            raise ValueError(f"caption must be 'random', 'first' or 'pairs', not {caption!r}")
        self.records = caption_pairs(records) if caption == "pairs" else records
        self.transform = transform
        self.tokenizer = tokenizer
        self.caption = caption
        self.seed = int(seed)
        self.epoch = 0
        self.cache_images = cache_images
        self._image_cache: dict[int, Any] = {}
        # Skips seen by __getitem__ in *this* process and not yet reported by collate.
        self._pending_skips: list[dict] = []
        self._transform_takes_rng = isinstance(transform, ImageTransform) or _accepts_rng(transform)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions/augmentations __getitem__ produces (call before each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict | None:
        """{"pixels": (3, H, W), "text": str, "index": int}, or None when the image is missing/corrupt."""
        record = self.records[index]
        rng = sample_rng(self.seed, self.epoch, index)
        texts = record.get("texts") or []
        text = self._choose_text(texts, rng)
        image = self._image_cache.get(index)
        if image is None:
            try:
                image = load_image(record["image"])
            except CorruptImage as error:
                self._pending_skips.append({"index": index, "image": record["image"], "reason": str(error)})
                return None
            if self.cache_images:
                self._image_cache[index] = image  # transforms never modify their input image
        pixels = self.transform(image, rng) if self._transform_takes_rng else self.transform(image)  # (3, H, W)
        return {"pixels": pixels, "text": text, "index": index}

    def _choose_text(self, texts: Sequence[str], rng) -> str:
        return (texts[0] if self.caption == "first" else rng.choice(texts)) if texts else ""

    def transform_rng(self, index: int):
        """The generator in the state the transform of sample `index` starts from (this epoch): lets a
        subclass map annotations (boxes) through the same random crop."""
        rng = sample_rng(self.seed, self.epoch, index)
        self._choose_text(self.records[index].get("texts") or [], rng)
        return rng

    def collate(self, samples: Sequence[dict | None]) -> dict:
        """`collate(samples, tokenizer)` plus `skipped`: the references of this batch's bad images."""
        batch = collate(samples, tokenizer=self.tokenizer, image_size=getattr(self.transform, "image_size", None))
        skipped, self._pending_skips = self._pending_skips, []
        batch["skipped"] = [item["image"] for item in skipped]
        for item in skipped:
            logger.debug("skipped %s: %s", item["image"], item["reason"])
        return batch


def caption_pairs(records: Sequence[dict]) -> list[dict]:
    """One record per (image, caption) pair, in order: a record with texts [a, b] becomes two records
    with texts [a] and [b] (its other fields shared); a record without captions stays one record."""
    pairs = []
    for record in records:
        texts = record.get("texts") or []
        if texts:
            pairs.extend({**record, "texts": [text]} for text in texts)
        else:
            pairs.append(record)
    return pairs


def _accepts_rng(function: Callable) -> bool:
    """Whether a plain callable transform takes the per-sample `rng` (as ImageTransform does)."""
    try:
        return "rng" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def collate(samples: Sequence[dict | None], tokenizer: Tokenizer | None = None, image_size: int | None = None) -> dict:
    """Stack the good samples: `pixels` (B, 3, H, W), `texts`, `indices` (B,), `tokens` (B, L) when a
    tokenizer is given (one batched call), and `num_skipped` (the Nones dropped).

    With only bad samples the batch has zero rows (`pixels` (0, 3, S, S) using `image_size`), so
    the training loop can skip it without special cases.
    """
    good = [sample for sample in samples if sample is not None]
    texts = [sample["text"] for sample in good]
    if good:
        pixels = torch.stack([sample["pixels"] for sample in good])  # (B, 3, H, W)
    else:
        side = image_size or 0
        pixels = torch.empty(0, 3, side, side)  # (0, 3, S, S)
    batch: dict[str, Any] = {
        "pixels": pixels,
        "texts": texts,
        "indices": torch.tensor([sample["index"] for sample in good], dtype=torch.long),  # (B,)
        "num_skipped": len(samples) - len(good),
    }
    if tokenizer is not None:
        if good:
            batch["tokens"] = torch.as_tensor(tokenizer(texts), dtype=torch.long)  # (B, L)
        else:
            batch["tokens"] = torch.as_tensor(tokenizer([""]), dtype=torch.long)[:0]  # (0, L)
    return batch


class SkipCounter:
    """Totals of skipped samples over a run, with the first `keep` image references for the report.

    Batches may also carry `skip_reasons` ({reason: count}) and `num_truncated` (samples cut to
    a maximum length but kept), as `ConversationDataset` batches do; both are summed and reported.
    """

    def __init__(self, keep: int = 10):
        self.keep = keep
        self.total = 0
        self.examples: list[str] = []
        self.reasons: dict[str, int] = {}
        self.truncated = 0
        self.counted = 0  # skips added by update() in this process (a resumed run sets `total` beforehand)
        # Every distinct bad reference seen by this process: an image skipped once per epoch is
        # one file, however many times it was skipped (the report gives both numbers).
        self.files: set[str] = set()

    def update(self, batch: dict) -> int:
        """Add one collated batch's skips (and truncations); returns how many samples it skipped."""
        count = int(batch.get("num_skipped", 0))
        self.total += count
        self.counted += count
        self.truncated += int(batch.get("num_truncated", 0))
        for reason, number in batch.get("skip_reasons", {}).items():
            self.reasons[reason] = self.reasons.get(reason, 0) + int(number)
        for image in batch.get("skipped", []):
            self.files.add(image)
            if len(self.examples) < self.keep and image not in self.examples:
                self.examples.append(image)
        return count

    def summary(self) -> dict:
        """{"skipped": total, "skipped_examples": [first few references]} for the run summary, plus
        "skip_reasons" and "truncated" when batches reported them."""
        summary: dict = {"skipped": self.total, "skipped_files": len(self.files), "skipped_examples": list(self.examples)}
        if self.reasons:
            summary["skip_reasons"] = dict(self.reasons)
        if self.truncated:
            summary["truncated"] = self.truncated
        return summary

    def _files_note(self) -> str:
        """"6 files": how many distinct files the skips came from (occurrences repeat across epochs).

        A resumed run restores `total` from its checkpoint but not the file names, so then the files
        are those seen since the resume."""
        if not self.files:
            return ""
        seen = len(self.files)
        since = " since the resume" if self.total > self.counted else ""
        return f"{seen} file{'s' if seen != 1 else ''}{since}"

    def message(self) -> str | None:
        """One sentence for stderr at the end of a run, or None when nothing was skipped or cut."""
        if not self.total and not self.truncated:
            return None
        truncated = f"{self.truncated} sample(s) truncated to the maximum length" if self.truncated else ""
        if not self.total:
            return f"{truncated} (kept; raise the maximum length to keep them whole)"
        shown = self.examples[:3]
        others = (len(self.files) if self.files else self.total) - len(shown)  # distinct files not named
        more = f" and {others} more" if others > 0 else ""
        shown = ", ".join(shown) or "(paths not recorded)"
        files = self._files_note()
        if not self.reasons:
            files = f" ({files})" if files else ""
            skipped = f"skipped {self.total} unreadable image(s){files}: {shown}{more}; fix or remove them from the dataset"
        else:
            reasons = ", ".join(f"{number} {reason}" for reason, number in sorted(self.reasons.items()))
            files = f"; {files}" if files else ""
            skipped = f"skipped {self.total} sample(s) ({reasons}{files}): {shown}{more}; fix or remove them, or raise the maximum length"
        return f"{skipped}; {truncated}" if truncated else skipped
