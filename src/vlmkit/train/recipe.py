"""Training recipes: a flat, typed set of knobs read from `vlmkit/configs/NAME.yaml` plus CLI overrides.

`vlmkit train --recipe clip-tiny steps=12 save_every=6 model.vision.depth=2`: plain keys set
recipe fields, `model.`-prefixed keys override the model configuration. Unknown keys are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlmkit.config import bounded, check_fields, from_dict
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
    vocab_size: int = bounded(1024, low=1)
    # Images: the model's image size; CLIP mean/std; RandomResizedCrop scale for training.
    crop_scale: tuple[float, float] = (0.9, 1.0)
    hflip: float = bounded(0.0, low=0, high=1)  # a probability
    # Which of a record's captions a step sees: "random" (one per visit), "first", or "pairs" (one sample per
    # image-caption pair, each once an epoch: OpenCLIP's CSV sampling).
    caption: Literal["random", "first", "pairs"] = "random"
    # Optimisation (OpenCLIP's ViT defaults, scaled for tiny models by the recipes).
    steps: int = bounded(1000, low=1)
    batch_size: int = bounded(128, low=1)  # samples per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = bounded(1, low=1)
    lr: float = bounded(5e-4, low=0, low_open=True)
    min_lr: float = bounded(0.0, low=0)
    warmup_steps: int = bounded(100, low=0)
    weight_decay: float = bounded(0.2, low=0)
    beta1: float = bounded(0.9, low=0, high=1, high_open=True)
    beta2: float = bounded(0.98, low=0, high=1, high_open=True)
    eps: float = bounded(1e-6, low=0, low_open=True)
    grad_clip: float | None = bounded(1.0, low=0, low_open=True)  # null: no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
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
    # The task a run trains, for families with several (fusion encoders: pretrain, then fine-tune with
    # `--init PRETRAINED task=vqa|reasoning|retrieval`); None = the family's default. Passed to the
    # family as its training option `task`.
    task: str | None = None
    # Bookkeeping.
    seed: int = bounded(0, low=0)
    save_every: int = bounded(500, low=1)
    keep_checkpoints: int = bounded(2, low=1)  # the newest N checkpoints are kept
    log_every: int = bounded(10, low=1)
    num_workers: int = bounded(0, low=0)
    threads: int = bounded(0, low=0)  # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        """Ranges and choices (declared on the fields above), checked before a run writes anything."""
        check_fields(self, "recipe key")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise UserError(f"recipe key crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}")


def family_training_options(recipe: Recipe, family) -> dict[str, Any]:
    """The recipe's `training:` section for `family` (a VLModel class), with the recipe's `task` added as the
    family's training option `task`; a family without tasks given one is a UserError naming the fix."""
    import dataclasses

    options = dict(recipe.training)
    if recipe.task is not None:
        fields = {item.name for item in dataclasses.fields(family.training_class)} \
            if dataclasses.is_dataclass(family.training_class) else set()
        if "task" not in fields:
            raise UserError(f"the '{family.family}' family trains one thing and has no tasks to choose; "
                            f"drop task={recipe.task}")
        if "task" in options and options["task"] != recipe.task:
            raise UserError(f"the recipe sets task={recipe.task} and training.task={options['task']}; keep one of them")
        options["task"] = recipe.task
    return options


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
