"""Shared helpers of the index (and serve) tests (a uniquely named module: every test folder has a conftest.py)."""

TEXTS = ["a red circle", "a blue square on the left", "a green triangle and a yellow star", "two objects"]


def save_tiny_clip(out, seed: int = 0, embed_dim: int = 32):
    """A clip-tiny made smaller (one block per tower, width 64), with tokenizer and transform, saved at `out`."""
    import torch

    from vlmkit.config import apply_overrides
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(TEXTS, vocab_size=600, context_length=16)
    family, config = named_config("clip-tiny")
    cls = get_family(family)
    config = cls.adapt_config_to_tokenizer(config, tokenizer)
    config = apply_overrides(config, {"embed_dim": embed_dim, "vision.width": 64, "vision.depth": 1, "text.width": 64,
                                      "text.depth": 1, "vision.image_size": 32})
    torch.manual_seed(seed)
    model = cls.from_config_dict(config)
    model.tokenizer, model.transform = tokenizer, ImageTransform(config["vision"]["image_size"])
    model.save_pretrained(out)
    return out
