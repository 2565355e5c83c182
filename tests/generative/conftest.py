import pytest
import torch

from vlmkit.data.synthetic import generate

TEXTS = ["a red circle on the left", "a blue square", "how many objects are there?", "what color is the star?",
         "a green triangle and a yellow star", "there are two objects", "yes", "no", "2", "red", "star"]


@pytest.fixture(scope="session")
def tokenizer():
    from vlmkit.tokenizers import train_clip_bpe

    return train_clip_bpe(TEXTS, vocab_size=600, context_length=24)


@pytest.fixture
def tiny_model():
    """`tiny_model(name, tokenizer, **overrides)`: a registered tiny config made smaller still, fitted to the
    tokenizer; `training.KEY=value` overrides set the family's training options."""
    return _tiny_model


def _tiny_model(name: str, tokenizer, **overrides):
    from vlmkit.config import apply_overrides
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.base import _field_names
    from vlmkit.models.registry import get_family, named_config

    family, config = named_config(name)
    cls = get_family(family)
    config = cls.adapt_config_to_tokenizer(config, tokenizer)
    training = {key[len("training."):]: overrides.pop(key) for key in list(overrides) if key.startswith("training.")}
    text = cls.tower_configs.get("text")  # "text", or "lm" for families on the language model
    # smaller still where the text side is a tower section with a width and depth (LXMERT's and
    # ViLBERT's text stream is the model's own top-level width; their example configs are tiny already)
    shrinkable = text in config and {"width", "depth"} <= _field_names(cls.config_class, text)
    smaller = {f"{text}.width": 64, f"{text}.depth": 2} if shrinkable else {}
    config = apply_overrides(config, {**cls.example_config, **smaller, **overrides})
    torch.manual_seed(0)
    model = cls.from_config_dict(config)
    model.set_training_options(training)
    model.tokenizer, model.transform = tokenizer, ImageTransform(config["vision"]["image_size"])
    return model.eval()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """The built-in dataset, small: generated once per session."""
    out = tmp_path_factory.mktemp("gen-synth")
    generate(out, n=1000, seed=5, progress=False)
    return out
