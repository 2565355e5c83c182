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
    compile: bool = False
    lock_image: bool = False  # freeze the image tower (LiT-style)
    lock_text: bool = False  # freeze the text tower
    # Pretrained towers (LiT): a checkpoint vlmkit.load reads (sentence-transformers/BERT folder, HF or
    # OpenCLIP CLIP, vlmkit run). init_text also brings its tokenizer (the `tokenizer` key is then unused).
    init_text: str | None = None
    init_image: str | None = None
    # Bookkeeping.
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    log_every: int = 10
    num_workers: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default


def list_recipes() -> list[str]:
    """The names of the recipes shipped with vlmkit (`vlmkit train --recipe NAME`), sorted."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


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
    """`["steps=12", "model.vision.depth=2"]` -> {"steps": 12, "model.vision.depth": 2} (YAML-typed values)."""
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
    data = dict(base)
    model_overrides = dict(data.get("model_overrides") or {})
    for key, value in overrides.items():
        if key.startswith("model."):
            model_overrides[key[len("model."):]] = value
        else:
            data[key] = value
    data["model_overrides"] = model_overrides
    return from_dict(Recipe, data, where=where)


def load_recipe(name_or_path: str, overrides: dict[str, Any]) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        base = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {error}") from None
    return build_recipe(base, overrides, where=f"recipe {path.name}")
