"""Evaluation metrics that reproduce the field's reference tools exactly.

- `caption.score_captions`: BLEU-1..4, ROUGE-L, CIDEr-D (pycocoevalcap's numbers, pure numpy)
  and METEOR (pycocoevalcap's jar), after a pure-Python PTB tokenization (`ptb`).
- `vqa.vqa_accuracy`: VQA accuracy with the official normalization ("official" or "lavis").
- `retrieval.recall_at_k`, `classification.zeroshot_scores`: CLIP_benchmark protocols.
"""
from vlmkit.metrics.caption import score_captions
from vlmkit.metrics.classification import zeroshot_scores
from vlmkit.metrics.retrieval import recall_at_k
from vlmkit.metrics.vqa import normalize_answer, vqa_accuracy

__all__ = ["score_captions", "vqa_accuracy", "normalize_answer", "recall_at_k", "zeroshot_scores"]
