"""What every model family shares: the plug-in contract, outputs, save/load and the convenience API.

A family is one file in `models/` that subclasses `VLModel` and sets:
- `family` (its name in config.json) and `config_class` (a dataclass of the architecture only);
- `capabilities`: the protocols of `vlmkit.capabilities` it implements (checked at import);
- `training_class`: a dataclass of its training options (data sampling, loss weights), filled
  from the recipe's `training:` section and read by `forward` as `self.training_options`;
- `towers`: the sub-modules a recipe may lock (`lock_image`, `lock_text`), by role;
- the training hooks the trainer calls without knowing the family: `tokenizer_texts`,
  `adapt_config_to_tokenizer`, `adapt_config_to_data`, `training_dataset`, `dummy_batch`.
Generative families also get `generation_config` (decoding defaults), saved as
`generation_config.json` next to the weights. Families are found by `models.registry` without a
hand-kept list; nothing outside a family's file names it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, missing_methods, require
from vlmkit.config import from_dict, to_dict
from vlmkit.errors import UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"


@dataclass
class ModelOutput:
    """`loss` to train on; `logs`: detached 0-d tensors (the trainer reduces them every `log_every` steps,
    so a forward never forces a host-device sync with `.item()`)."""

    loss: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def detached_logs(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Log values as detached tensors (what `ModelOutput.logs` holds)."""
    return {key: value.detach() for key, value in values.items()}


@dataclass
class NoTrainingOptions:
    """A family with no training options of its own."""


class VLModel(nn.Module):
    """Base class of every family: config, capabilities, tokenizer/transform, save and load."""

    family: ClassVar[str] = "base"
    config_class: ClassVar[type] = object
    capabilities: ClassVar[tuple[type, ...]] = ()
    training_class: ClassVar[type] = NoTrainingOptions
    towers: ClassVar[dict[str, str]] = {}  # role ("image" / "text") -> attribute of a tower a recipe may lock
    # role -> the config section describing that tower (what init_text / init_image copy between families).
    tower_configs: ClassVar[dict[str, str]] = {"image": "vision", "text": "text"}
    # DDP needs to know whether a step can leave parameters without a gradient (a head skipped when a
    # micro-batch has none of its samples); True lets it skip the search for unused parameters.
    uses_every_parameter: ClassVar[bool] = False
    # False: a training-free family (built from trained models, e.g. ASIF): no loss, `vlmkit train` refuses it,
    # and the registry-wide tests check its save/load and embeddings instead of forward/backward.
    trainable: ClassVar[bool] = True
    # False: the family trains on texts alone, so the trainer also reads dataset records without an `image`.
    needs_images: ClassVar[bool] = True
    # Config values a registered tiny configuration needs to build without training data (tests, examples).
    example_config: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for capability in cls.capabilities:
            missing = missing_methods(cls, capability)
            if missing:
                raise TypeError(
                    f"{cls.__name__} declares the capability {capability.__name__} but does not implement "
                    f"{', '.join(missing)}"
                )

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = None  # a vlmkit.tokenizers.Tokenizer, attached by load() or the trainer
        # Why there is none, when a loader knows (an OpenCLIP file with a vocabulary not CLIP's).
        self.missing_tokenizer_reason: str | None = None
        self.transform = None  # a vlmkit.data.transforms.ImageTransform
        self.training_options = self.training_class()
        self._locked: set[str] = set()

    # ---- capabilities -------------------------------------------------------------------
    def require(self, capability: type, task: str) -> None:
        """Raise a clear UserError unless this model provides `capability` (a vlmkit.capabilities protocol)."""
        require(self, capability, task)

    def after_optimizer_step(self) -> None:
        """Hook for constraints applied after each update (CLIP clamps its temperature)."""

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        """A random batch of the shape `forward` takes; the registry-wide tests run every family on it."""
        raise NotImplementedError(f"{type(self).__name__} must implement dummy_batch for the model tests")

    # ---- towers a recipe can lock ---------------------------------------------------------
    def tower(self, role: str) -> nn.Module:
        """The sub-module playing `role` ("image" or "text"), or a UserError naming the roles this family has."""
        if role not in self.towers:
            have = ", ".join(sorted(self.towers)) or "none"
            raise UserError(f"the '{self.family}' family has no separate {role} tower (its towers: {have}); "
                            f"drop lock_{role} / init_{role} from the recipe")
        return getattr(self, self.towers[role])

    def lock(self, role: str) -> None:
        """Freeze the `role` tower: no gradients, and eval mode (BatchNorm statistics, dropout) kept through train()."""
        tower = self.tower(role)
        tower.requires_grad_(False)
        tower.eval()
        self._locked.add(role)

    def train(self, mode: bool = True) -> "VLModel":
        super().train(mode)
        for role in self._locked:
            self.tower(role).eval()
        return self

    # ---- training hooks (the trainer is family-agnostic) ----------------------------------
    def set_training_options(self, options: dict[str, Any]) -> None:
        """The recipe's `training:` section, checked against `training_class` (unknown keys are errors)."""
        self.training_options = self.parse_training_options(options)

    @classmethod
    def parse_training_options(cls, options: dict[str, Any]):
        return from_dict(cls.training_class, dict(options or {}), where=f"recipe 'training' section ({cls.family})")

    @classmethod
    def adapt_config_to_tokenizer(cls, config: dict[str, Any], tokenizer) -> dict[str, Any]:
        """Fit a config dict's text side (its `tower_configs["text"]` section) to the tokenizer it is
        trained with: vocabulary size and special ids (a section without a bos field keeps none)."""
        section = cls.tower_configs.get("text")
        if section in config:
            text = config[section]
            text["vocab_size"] = tokenizer.vocab_size
            text["eos_token_id"] = tokenizer.eos_id if text.get("eos_token_id", 0) is not None else None
            text["pad_token_id"] = tokenizer.pad_id
            if "bos_token_id" in text or "bos_token_id" in _field_names(cls.config_class, section):
                text["bos_token_id"] = tokenizer.bos_id
            tokenizer.context_length = text.get("context_length", tokenizer.context_length)
        return config

    @classmethod
    def adapt_pretrained_tower_config(cls, role: str, section: dict[str, Any]) -> dict[str, Any]:
        """Fit the config section of a pretrained `role` tower (`init_text` / `init_image`) to this
        family before the model is built (default: unchanged)."""
        return section

    def adapt_pretrained_tower_state(self, role: str, state: dict[str, torch.Tensor],
                                     expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit a pretrained `role` tower's weights to this model's tower (`expected`: its own state)
        before the strict copy (default: unchanged)."""
        return state

    def adapt_init_state(self, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit the weights of a recipe's `init` run to this model (`expected`: its own state) before the
        strict load (default: unchanged). A fusion encoder fine-tuned on new data keeps its freshly
        initialised answer head where the answer vocabulary changed."""
        return state

    def after_pretrained_towers(self) -> None:
        """Called once the `init_text` / `init_image` weights are in (default: nothing)."""

    @classmethod
    def adapt_config_to_data(cls, config: dict[str, Any], records: list[dict]) -> dict[str, Any]:
        """Fit a config dict to the training records before the model is built (default: unchanged).

        Families whose shape depends on the data (a VQA answer vocabulary) override it.
        """
        return config

    @classmethod
    def tokenizer_texts(cls, records: list[dict]) -> list[str]:
        """The texts a tokenizer trained for this family learns from: the captions by default."""
        return [text for record in records for text in record.get("texts", [])]

    def training_dataset(self, records: list[dict], transform, tokenizer, seed: int, caption: str = "random"):
        """The dataset the trainer iterates: needs `set_epoch(epoch)`, `__getitem__`, `collate(samples)`.

        The default pairs each image with one of its captions; families trained on other record
        fields (questions, statements) return their own dataset, defined in their own file.
        """
        from vlmkit.data.loader import ImageTextDataset

        records = [record for record in records if record.get("texts")]
        if not records:
            raise UserError(f"no training record has captions ('text' or 'texts'), which the '{self.family}' family trains on")
        imageless = sum("image" not in record for record in records)
        if imageless:
            raise UserError(f"{imageless} of {len(records)} training records have no image (a text-only dataset?), but the "
                            f"'{self.family}' family trains on image-caption pairs; give a dataset with images")
        return ImageTextDataset(records, transform, tokenizer=tokenizer, caption=caption, seed=seed)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- save / load --------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"family": self.family, "config": to_dict(self.config)}

    def save_pretrained(self, directory: str | Path, format: str = "vlmkit") -> None:
        """Write config.json, model.safetensors, the tokenizer and preprocessor config (atomically).

        `format="hf"` writes an HF transformers folder instead (CLIPModel's config and key names),
        which `transformers.CLIPModel.from_pretrained` loads; see `vlmkit.interop`.
        """
        from vlmkit.io import atomic_write_json, save_safetensors

        if format == "hf":
            from vlmkit.interop import export_hf

            export_hf(self, Path(directory))
            return
        if format != "vlmkit":
            raise UserError(f"unknown save format '{format}'; use 'vlmkit' or 'hf'")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt", "family": self.family})
        if self.tokenizer is not None:
            self.tokenizer.save(directory)
        if self.transform is not None:
            self.transform.save(directory)
        generation = getattr(self, "generation_config", None)
        if generation is not None:
            atomic_write_json(directory / GENERATION_FILE, to_dict(generation))
        atomic_write_json(directory / CONFIG_FILE, self.config_dict())

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], where: str | None = None) -> "VLModel":
        """The model a config dict describes, every value checked (`where` names its source in errors)."""
        return cls(from_dict(cls.config_class, config, where=where or f"{cls.family} config"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VLModel":
        """Load a folder written by `save_pretrained` (no network, no pickle)."""
        from vlmkit.io import load_safetensors, load_state_dict_strict

        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        where = f"{directory / CONFIG_FILE} config"
        try:
            with torch.device("meta"):  # skip random init: every tensor comes from the file
                model = cls.from_config_dict(meta.get("config"), where=where)
        except UserError as error:  # a range check inside a tower config does not know the file: name it
            if str(directory / CONFIG_FILE) in str(error):
                raise
            raise UserError(f"{where}: {error}") from None
        load_state_dict_strict(model, load_safetensors(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE), "vlmkit")
        _in_default_precision(model, directory / WEIGHTS_FILE)  # an fp16 file loads as float32, not fails at inference
        model.attach_preprocessing(directory)
        if (directory / GENERATION_FILE).exists() and getattr(model, "generation_config", None) is not None:
            model.generation_config = from_dict(type(model.generation_config), json.loads((directory / GENERATION_FILE).read_text()),
                                                where=str(directory / GENERATION_FILE))
        return model.eval()

    def attach_preprocessing(self, directory: Path) -> None:
        """Attach the tokenizer and image transform saved next to the weights, when present."""
        from vlmkit.data.transforms import ImageTransform
        from vlmkit.tokenizers import Tokenizer

        if (directory / "tokenizer.json").exists() or (directory / "vocab.json").exists():
            self.tokenizer = Tokenizer.load(directory)
        if (directory / "preprocessor_config.json").exists():
            self.transform = ImageTransform.load(directory)

    # ---- convenience API over the raw tensors ------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            if self.missing_tokenizer_reason:
                raise UserError(self.missing_tokenizer_reason)
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
        return self.tokenizer(texts)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Paths, PIL images or uint8 arrays -> (B, 3, H, W) pixels with the model's transform."""
        if self.transform is None:
            raise UserError("this model has no image transform attached; load it with vlmkit.load(run_folder)")
        return torch.stack([self.transform(image) for image in images])

    @torch.no_grad()
    def _embed_in_batches(self, items: Sequence[Any], batch_size: int, to_inputs, encode) -> torch.Tensor:
        """Encode `items` chunk by chunk in eval mode; L2-normalised float32 rows on the CPU."""
        was_training = self.training
        self.eval()
        try:
            chunks = [
                F.normalize(encode(to_inputs(items[start : start + batch_size]).to(self.device)).float(), dim=-1).cpu()
                for start in range(0, len(items), batch_size)
            ]
        finally:
            self.train(was_training)
        embeddings = torch.cat(chunks) if chunks else torch.empty(0)
        broken = (~torch.isfinite(embeddings)).any(dim=-1) if embeddings.ndim == 2 else torch.zeros(0, dtype=torch.bool)
        if broken.any():  # NaN weights (a diverged run) must not become "probability null" with exit code 0
            raise UserError(f"the model gives non-finite (NaN or inf) embeddings for {int(broken.sum())} of {len(items)} "
                            f"input(s), so its weights are damaged (a diverged training?); load an earlier checkpoint or retrain")
        return embeddings

    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU."""
        self.require(EmbedsImages, task="embed_images")
        return self._embed_in_batches(images, batch_size, self.preprocess, self.encode_image)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings (N, D), float32 on the CPU."""
        self.require(EmbedsTexts, task="embed_texts")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._embed_in_batches(texts, batch_size, self.tokenize, self.encode_text)


def _in_default_precision(model: nn.Module, source: Path) -> None:
    """Convert, with a note on stderr, a model whose weights file stored floating tensors in another
    precision (fp16, bf16) than torch's default (float32) the model was built for: kept as loaded,
    they would make it fail later, at inference, on float32 inputs."""
    import sys

    default = torch.get_default_dtype()
    stored: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != default:
            name = str(tensor.dtype).replace("torch.", "")
            stored[name] = stored.get(name, 0) + 1
    if stored:
        model.to(default)
        what = ", ".join(f"{count} {name}" for name, count in sorted(stored.items()))
        print(f"vlmkit: note: {source} stores weights in another precision ({what} tensor(s)); converted them to "
              f"{str(default).replace('torch.', '')} on load", file=sys.stderr)


def _field_names(config_class: type, section: str) -> set[str]:
    """Field names of the dataclass that `config_class.<section>` is annotated with (empty if none)."""
    import dataclasses
    import typing

    if not dataclasses.is_dataclass(config_class):
        return set()
    kind = typing.get_type_hints(config_class).get(section)
    return {f.name for f in dataclasses.fields(kind)} if isinstance(kind, type) and dataclasses.is_dataclass(kind) else set()
