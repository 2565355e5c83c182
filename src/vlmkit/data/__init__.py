"""Datasets: readers (JSONL/CSV/COCO/WebDataset), image transforms, the synthetic dataset, the loader.

    records = read_records("data/train.jsonl")            # [{"image": abs path, "texts": [...], ...}]
    transform = ImageTransform(64, train=True)             # no torchvision
    dataset = ImageTextDataset(records, transform, tokenizer, seed=0)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=dataset.collate)

Names are imported lazily so that `vlmkit data synth` starts without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CorruptImage": "formats", "load_image": "formats", "read_records": "formats",
    "ImageTextDataset": "loader", "SkipCounter": "loader", "collate": "loader", "sample_rng": "loader",
    "ConversationDataset": "conversation", "IGNORE_INDEX": "conversation", "TEMPLATES": "conversation",
    "encode_conversation": "conversation", "encode_prompt": "conversation",
    "CLASSES": "synthetic", "COLORS": "synthetic", "SHAPES": "synthetic", "generate": "synthetic",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms", "ImageTransform": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlmkit.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlmkit.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
