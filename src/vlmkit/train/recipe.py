"""Training recipes: a flat, typed set of knobs read from `vlmkit/configs/NAME.yaml` plus CLI overrides.

`vlmkit train --recipe clip-tiny steps=12 save_every=6 model.vision.depth=2`: plain keys set
recipe fields, `model.`-prefixed keys override the model configuration. Unknown keys are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmkit.config import from_dict
from vlmkit.errors import UserError

# The recipes ship inside the package (package data), so an installed wheel and a source
# checkout find the same files in the same place.
RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Recipe:
    model: str = "clip-tiny"  # a registered configuration (vlmkit.list_models())
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys into the model config
    # The family's own training options (data sampling, loss weights): checked against its
    # `training_class`, e.g. `training: {label_smoothing: 0.1}`; CLI: `training.label_smoothing=0.1`.
    training: dict[str, Any] = field(default_factory=dict)
    # Tokenizer: "bpe" or "wordpiece" (trained on the training captions), "clip" (OpenAI's
    # vocabulary), or a path to a tokenizer folder / tokenizer.json.
    tokenizer: str = "bpe"
    vocab_size: int = 1024
    # Images: the model's image size; CLIP mean/std; RandomResizedCrop scale for training.
    crop_scale: tuple[float, float] = (0.9, 1.0)
    hflip: float = 0.0
    caption: str = "random"  # which of a record's captions a step sees: random | first
    # Optimisation (OpenCLIP's ViT defaults, scaled for tiny models by the recipes).
    steps: int = 1000
    batch_size: int = 128  # samples per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False
    # Under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2, per
    # transformer block) instead of replicating them (DDP). One process ignores it.
    fsdp: bool = False
    compile: bool = False
    lock_image: bool = False  # freeze the image tower (LiT-style)
    lock_text: bool = False  # freeze the text tower
    # Pretrained towers (LiT): a checkpoint vlmkit.load reads (sentence-transformers/BERT folder, HF or
    # OpenCLIP CLIP, vlmkit run). init_text also brings its tokenizer (the `tokenizer` key is then unused).
    init_text: str | None = None
    init_image: str | None = None
    # A whole model to start from: a vlmkit run folder of the same family (its config, tokenizer and
    # weights, loaded strictly). Unlike --resume, the run is new: fresh optimizer, step 0, own folder
    # (LLaVA's stage 2 starts from its stage-1 run). Excludes init_text / init_image.
    init: str | None = None
    # Bookkeeping.
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    log_every: int = 10
    num_workers: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        """Ranges and choices, checked before a run writes anything."""
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "save_every": 1, "log_every": 1, "keep_checkpoints": 1,
                    "vocab_size": 1, "warmup_steps": 0, "threads": 0, "num_workers": 0, "seed": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise UserError(f"recipe key {name} must be at least {low}, got {getattr(self, name)}")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0 or not self.eps > 0:
            raise UserError("recipe keys lr and eps must be positive, min_lr and weight_decay 0 or more; "
                            f"got lr={self.lr}, eps={self.eps}, min_lr={self.min_lr}, weight_decay={self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"recipe keys beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"recipe key grad_clip must be positive or null (no clipping), got {self.grad_clip}")
        if not 0 <= self.hflip <= 1:
            raise UserError(f"recipe key hflip is a probability in [0, 1], got {self.hflip}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise UserError(f"recipe key crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")
        choices = {"precision": ("auto", "fp32", "bf16"), "caption": ("random", "first")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"recipe key {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


def list_recipes() -> list[str]:
    """The names of the recipes shipped with vlmkit (`vlmkit train --recipe NAME`), sorted."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_models() -> dict[str, str]:
    """{recipe name: the model configuration it trains} for every shipped recipe."""
    return {name: (yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text()) or {}).get("model", Recipe.model)
            for name in list_recipes()}


def find_recipe(name_or_path: str) -> Path:
    """A shipped recipe's file by name (`clip-tiny`), or a `.yaml`/`.yml` path given as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if path.is_file():
        return path
    raise UserError(f"unknown recipe '{name_or_path}'; known recipes: {', '.join(list_recipes())} (or give a .yaml path)")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["steps=12", "model.vision.depth=2"]` -> {"steps": 12, "model.vision.depth": 2} (YAML-typed values;
    each is checked against its field's type when the recipe is built)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. steps=12)")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            overrides[key.strip()] = value
    return overrides


def build_recipe(base: dict[str, Any], overrides: dict[str, Any], where: str) -> Recipe:
    if not isinstance(base, dict):
        raise UserError(f"{where} must be a mapping of recipe keys to values, got {type(base).__name__}")
    data = dict(base)
    plain = {key: value for key, value in overrides.items() if not key.startswith(("model.", "training."))}
    data.update(plain)
    sections = {}
    for section, prefix in (("model_overrides", "model."), ("training", "training.")):
        given = data.get(section)
        if given is not None and not isinstance(given, dict):
            raise UserError(f"{where}: {section} must be a mapping of keys to values, got {given!r}; "
                            f"on the command line set its keys one by one ({prefix}KEY=VALUE)")
        sections[section] = dict(given or {})
        for key, value in overrides.items():
            if key.startswith(prefix):
                sections[section][key[len(prefix):]] = value
    data.update(sections)
    return from_dict(Recipe, data, where=where)


def load_recipe(name_or_path: str, overrides: dict[str, Any]) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        base = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {error}") from None
    return build_recipe(base, overrides, where=f"recipe {path.name}")
