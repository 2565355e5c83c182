"""ImageTextDataset/collate: reproducible per (seed, epoch, index), bad images skipped and reported."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from vlmkit.data.formats import read_records
from vlmkit.data.loader import ImageTextDataset, SkipCounter, collate
from vlmkit.data.transforms import ImageTransform


class CountingTokenizer:
    """A stand-in tokenizer: list[str] -> (B, 6) LongTensor of character codes; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        rows = [[ord(char) for char in text[:6]] + [0] * (6 - len(text[:6])) for text in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), 6)


@pytest.fixture
def records_with_bad_images(synth_dir, tmp_path):
    """Ten synthetic test records plus a missing and a corrupt image (lines 4 and 8)."""
    lines = (synth_dir / "test.jsonl").read_text().splitlines()[:10]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    lines.insert(3, json.dumps({"image": str(tmp_path / "missing.png"), "text": "gone"}))
    lines.insert(7, json.dumps({"image": str(tmp_path / "corrupt.png"), "texts": ["broken", "bad"]}))
    path = synth_dir / "with_bad.jsonl"  # next to the synthetic images, so relative paths resolve
    path.write_text("\n".join(lines) + "\n")
    return read_records(path)


def test_bad_images_are_skipped_counted_and_named(records_with_bad_images):
    tokenizer = CountingTokenizer()
    dataset = ImageTextDataset(records_with_bad_images, ImageTransform(64, train=True), tokenizer, seed=0)
    assert dataset[3] is None and dataset[7] is None
    dataset._pending_skips.clear()  # the two direct calls above are not part of a batch
    counter = SkipCounter()
    rows = 0
    for batch in DataLoader(dataset, batch_size=4, collate_fn=dataset.collate):
        counter.update(batch)
        rows += len(batch["texts"])
        assert batch["pixels"].shape == (len(batch["texts"]), 3, 64, 64)
        assert batch["tokens"].shape == (len(batch["texts"]), 6) and batch["tokens"].dtype == torch.long
        assert not set(batch["indices"].tolist()) & {3, 7}
    assert rows == 10 and counter.total == 2
    assert counter.examples == [records_with_bad_images[3]["image"], records_with_bad_images[7]["image"]]
    assert tokenizer.calls == 3  # one batched call per batch, not one per sample
    assert "skipped 2 unreadable image(s)" in counter.message()
    assert counter.summary()["skipped"] == 2


def test_skips_reach_the_main_process_from_workers(records_with_bad_images):
    dataset = ImageTextDataset(records_with_bad_images, ImageTransform(64), seed=0)
    counter = SkipCounter()
    for batch in DataLoader(dataset, batch_size=6, num_workers=1, collate_fn=dataset.collate):
        counter.update(batch)
    assert counter.total == 2 and len(counter.examples) == 2


def test_all_bad_batch_has_zero_rows():
    batch = collate([None, None], tokenizer=CountingTokenizer(), image_size=32)
    assert batch["pixels"].shape == (0, 3, 32, 32) and batch["tokens"].shape == (0, 6)
    assert batch["texts"] == [] and batch["indices"].shape == (0,) and batch["num_skipped"] == 2
    assert SkipCounter().message() is None


def test_same_seed_epoch_index_reproduces_caption_and_augmentation(synth_dir):
    records = read_records(synth_dir / "train.jsonl")[:40]
    transform = ImageTransform(64, train=True, crop_scale=(0.5, 1.0), hflip=0.5)
    first, second = ImageTextDataset(records, transform, seed=1), ImageTextDataset(records, transform, seed=1)
    second.set_epoch(2)
    second.set_epoch(0)  # going back to an epoch gives that epoch's samples again (exact resume)
    for index in (0, 5, 39):
        a, b = first[index], second[index]
        assert a["text"] == b["text"] and torch.equal(a["pixels"], b["pixels"]) and a["index"] == index
    # A different epoch (or seed) draws other captions/crops for at least some samples.
    first.set_epoch(1)
    changed = sum(not torch.equal(first[i]["pixels"], second[i]["pixels"]) for i in range(10))
    texts_changed = sum(first[i]["text"] != second[i]["text"] for i in range(40))
    assert changed >= 8 and texts_changed >= 10
    other_seed = ImageTextDataset(records, transform, seed=2)
    assert sum(not torch.equal(other_seed[i]["pixels"], second[i]["pixels"]) for i in range(10)) >= 8


def test_caption_first_and_eval_transform(synth_dir):
    records = read_records(synth_dir / "test.jsonl")[:5]
    dataset = ImageTextDataset(records, ImageTransform(64), caption="first")
    dataset.set_epoch(3)
    assert [dataset[i]["text"] for i in range(5)] == [record["texts"][0] for record in records]
    # Eval transform on a 64 px image is just normalization: no resampling at all.
    pixels = dataset[0]["pixels"]
    assert torch.allclose(pixels, ImageTransform(64)(records[0]["image"]))
    with pytest.raises(ValueError):
        ImageTextDataset(records, ImageTransform(64), caption="longest")


def test_caption_pairs_sees_every_pair_once_an_epoch(synth_dir):
    records = read_records(synth_dir / "test.jsonl")[:5]
    pairs = [(record["image"], text) for record in records for text in record["texts"]]
    assert len({len(record["texts"]) for record in records} - {1}) > 0  # the records hold several captions
    dataset = ImageTextDataset(records, ImageTransform(64), caption="pairs")
    assert len(dataset) == len(pairs)
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = [(dataset.records[i]["image"], dataset[i]["text"]) for i in range(len(dataset))]
        assert seen == pairs  # each (image, caption) pair exactly once, whatever the epoch
    assert torch.equal(dataset[1]["pixels"], ImageTransform(64)(records[0]["image"]))  # the pair's own image


def test_plain_callable_transform_without_rng(synth_dir):
    records = read_records(synth_dir / "test.jsonl")[:2]
    dataset = ImageTextDataset(records, lambda image: torch.zeros(3, 4, 4))
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["pixels"].shape == (2, 3, 4, 4) and batch["skipped"] == []


def test_image_cache_gives_the_same_samples(synth_dir):
    records = read_records(synth_dir / "train.jsonl")[:6]
    transform = ImageTransform(64, train=True, crop_scale=(0.5, 1.0))
    plain, cached = ImageTextDataset(records, transform, seed=4), ImageTextDataset(records, transform, seed=4, cache_images=True)
    for _ in range(2):  # the second pass reads from the cache
        for index in range(6):
            assert torch.equal(plain[index]["pixels"], cached[index]["pixels"])
    assert len(cached._image_cache) == 6 and not plain._image_cache
