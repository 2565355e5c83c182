"""Fixtures of the service tests: one tiny model per registered family, saved and loaded as a run.

Models come from each family's first tiny configuration (iterating the registry: a new family is
served and tested for free), made smaller still, fitted to a small tokenizer, saved with
`save_pretrained` and loaded back with `vlmkit.load`, the way `vlmkit serve` loads runs. Untrained
weights are enough: these tests check the service, not the models' answers.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

TEXTS = ["a red circle on the left", "a blue square", "how many objects are there?", "what color is the star?",
         "a green triangle and a yellow star", "there are two objects", "yes", "no", "2", "red", "star"]


def family_models() -> dict[str, str]:
    """{family: its first tiny configuration}, from the registry."""
    from vlmkit.models.registry import list_models, named_config

    out: dict[str, str] = {}
    for name in list_models(tiny=True):
        out.setdefault(named_config(name)[0], name)
    return out


@pytest.fixture(scope="session")
def model_runs(tmp_path_factory) -> dict[str, str]:
    """{family: run folder} with one tiny saved model per family."""
    from vlmkit.config import apply_overrides
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.base import _field_names
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(TEXTS, vocab_size=600, context_length=24)
    root = tmp_path_factory.mktemp("serve-models")
    runs = {}
    for family, name in family_models().items():
        cls = get_family(family)
        _, config = named_config(name)
        config = cls.adapt_config_to_tokenizer(config, tokenizer)
        text = cls.tower_configs.get("text")  # a training-free family (ASIF) holds whole models, no tower section
        # a text tower made smaller where its section has a width and depth (DALL-E's text side is only a vocabulary)
        shrinkable = text in config and {"width", "depth"} <= _field_names(cls.config_class, text)
        smaller = {f"{text}.width": 64, f"{text}.depth": 2} if shrinkable else {}
        config = apply_overrides(config, {**cls.example_config, **smaller})
        torch.manual_seed(0)
        model = cls.from_config_dict(config)
        model.tokenizer = tokenizer
        if "pixels" in model.dummy_batch(1):
            model.transform = ImageTransform(model.dummy_batch(1)["pixels"].shape[-1])
        model.save_pretrained(root / family)
        runs[family] = str(root / family)
    return runs


@pytest.fixture(scope="session")
def models(model_runs) -> dict:
    """{family: loaded model}; the service is served under the family names."""
    import vlmkit

    return {family: vlmkit.load(path) for family, path in model_runs.items()}


def png_b64(width: int = 40, height: int = 30, color=(200, 30, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="session")
def image() -> str:
    return png_b64()


class FakeIndex:
    """The `vlmkit.index.SearchIndex` interface (load / search / dim / model_info), exact inner product."""

    def __init__(self, vectors: np.ndarray, records: list[dict], model: str) -> None:
        self.vectors, self.records = vectors.astype(np.float32), records
        self.dim = int(vectors.shape[1])
        self.model_info = {"model": model}

    def search(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        assert queries.dtype == np.float32 and queries.ndim == 2 and queries.shape[1] == self.dim
        scores = queries @ self.vectors.T  # (Q, N)
        order = np.argsort(-scores, axis=1)[:, :k]
        return [[{"row": int(r), "score": float(s[r]), "record": self.records[r]} for r in row] for s, row in zip(scores, order)]


@pytest.fixture(scope="session")
def make_index():
    """`make_index(model, texts, run)`: a FakeIndex of `model`'s embeddings of `texts`, built 'with' `run`."""

    def build(model, texts: list[str], run: str, image: str | None = None) -> FakeIndex:
        vectors = model.embed_texts(texts).numpy()
        records = [{"text": text, **({"image": image} if image else {})} for text in texts]
        return FakeIndex(vectors, records, run)

    return build
