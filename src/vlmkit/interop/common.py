"""What every format's loader and exporter share: building on the meta device, strict loading,
attaching the tokenizer and image transform, and writing a foreign folder.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlmkit.errors import UserError
from vlmkit.interop.mapping import Format, to_ours


def reject_kwargs(kwargs: dict[str, Any], format_name: str) -> None:
    """Options a loader does not understand are errors, never silently ignored."""
    given = {key: value for key, value in kwargs.items() if value is not None}
    if given:
        raise UserError(f"option(s) {', '.join(sorted(given))} do not apply to the {format_name} format; leave them out")


class HFFolder(NamedTuple):
    """An HF model folder as read by `read_hf_folder`."""

    config: dict[str, Any]          # config.json
    architecture: str               # the accepted architecture it holds
    weights: Path                   # its weights file (safetensors, .bin or a sharded index)
    state: dict[str, torch.Tensor]  # the tensors, floats cast to the dtype asked for


def read_hf_folder(directory: Path, accepted: str | Sequence[str], dtype: torch.dtype | None,
                   assumed: str | None = None) -> HFFolder:
    """An HF folder saved from one of the `accepted` architectures: its config.json, which of them it
    holds, its weights file and the tensors in it, floats cast to `dtype`.

    A config.json naming none of them is one line. One that names no architecture at all holds
    `assumed` (by default the only accepted architecture; with several and no `assumed`, an error)."""
    from vlmkit.interop.files import cast_floats, find_hf_weights, read_json, read_weights

    accepted = [accepted] if isinstance(accepted, str) else list(accepted)
    assumed = accepted[0] if assumed is None and len(accepted) == 1 else assumed
    hf = read_json(directory / "config.json")
    named = hf.get("architectures") or ([assumed] if assumed else [])
    architecture = next((name for name in named if name in accepted), None)
    if architecture is None:
        held = named[0] if named else "model of unnamed class"
        raise UserError(f"{directory} holds a {held}; vlmkit loads {' and '.join(accepted)} folders "
                        "(config.json 'architectures')")
    weights = find_hf_weights(directory)
    return HFFolder(hf, architecture, weights, cast_floats(read_weights(weights), dtype))


def build_and_load(family: str, config: dict[str, Any], state: dict[str, torch.Tensor],
                   make_format: Callable[[Any], Format], source: str):
    """Build `family` from `config` on the meta device and load `state` into it strictly, in eval mode.

    The meta device skips random initialisation (every tensor comes from the file), and the
    converted tensors are assigned rather than copied, so a memory-mapped checkpoint is not
    duplicated. `make_format(model)` gives the key layout to convert from (built from its shape).
    """
    from vlmkit.io import load_state_dict_strict
    from vlmkit.models.registry import get_family

    with torch.device("meta"):
        model = get_family(family).from_config_dict(config)
    fmt = make_format(model)
    converted = to_ours(state, fmt, model.state_dict(), source)
    load_state_dict_strict(model, converted, source, fmt.name)
    for note in fmt.notes:
        print(f"vlmkit: {note}", file=sys.stderr)
    return model.eval()


def attach_preprocessing(model, directory: Path | None, image_size: int | None, context_length: int | None = None) -> None:
    """Attach the folder's tokenizer and image transform (HF files), or CLIP's defaults for images.

    The tokenizer keeps the folder's special tokens, so padding follows the checkpoint's own
    convention (HF's openai folders pad with <|endoftext|>); its length is capped at what the
    model's position table (or `context_length`) allows.
    """
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.tokenizers import Tokenizer

    if directory is not None and any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json", "vocab.txt")):
        model.tokenizer = Tokenizer.load(directory)
        limit = context_length or model.config.text.context_length
        model.tokenizer.context_length = min(model.tokenizer.context_length, limit)
    if image_size is not None:
        if directory is not None and (directory / "preprocessor_config.json").is_file():
            model.transform = ImageTransform.load(directory)
        else:
            model.transform = ImageTransform(image_size=image_size)


def write_folder(model, directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor], format_name: str,
                 vocab_files: bool = False, extra_files: dict[str, Any] | None = None) -> None:
    """Write a foreign-format folder: weights, tokenizer, preprocessor config, then config.json last.

    config.json is written last so that a folder interrupted midway is recognisably incomplete.
    `vocab_files` also writes the BPE's `vocab.json` + `merges.txt` (what HF's slow CLIP tokenizer
    reads); `extra_files` are JSON files by relative path (sentence-transformers' module configs).
    """
    from vlmkit.io import atomic_write_json, save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
        if vocab_files and model.tokenizer.kind == "clip":
            model.tokenizer.save_vocab(directory)
        if model.tokenizer.kind == "bert":
            _write_vocab_txt(model.tokenizer, directory / "vocab.txt")
    if model.transform is not None:
        model.transform.save(directory)
    for name, content in (extra_files or {}).items():
        atomic_write_json(directory / name, content)
    atomic_write_json(directory / "config.json", config)
    print(f"vlmkit: wrote {format_name} folder {directory}", file=sys.stderr)


def _write_vocab_txt(tokenizer, path: Path) -> None:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        return  # ids with gaps cannot be written as one-token-per-line; tokenizer.json still holds them
    path.write_text("\n".join(token for token, _ in ordered) + "\n", encoding="utf-8")
