"""Evaluation metrics that reproduce the field's reference tools exactly.

- `caption.score_captions`: BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap's numbers, pure numpy)
  and METEOR (pycocoevalcap's jar), after a pure-Python PTB tokenization (`ptb`).
- `vqa.vqa_accuracy`: VQA accuracy with the official normalization ("official" or "lavis").
- `retrieval.recall_at_k`, `classification.zeroshot_scores`: CLIP_benchmark protocols.
- `detection.coco_box_ap`: COCO box AP, AP50, AP75, per category, exactly as pycocotools' COCOeval.

Names are imported lazily, so `vlmkit score --help` and `vlmkit score vqa` import neither
numpy nor the PTB tokenizer.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"score_captions": "caption", "vqa_accuracy": "vqa", "normalize_answer": "vqa",
            "recall_at_k": "retrieval", "zeroshot_scores": "classification",
            "coco_box_ap": "detection"}
__all__ = ["score_captions", "vqa_accuracy", "normalize_answer", "recall_at_k", "zeroshot_scores", "coco_box_ap"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlmkit.metrics.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlmkit.metrics' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
