"""Reading and writing the weight files of foreign formats: safetensors (memory-mapped), pickle-free
`torch.load(weights_only=True)` for `.bin`/`.pt`, HF's sharded index, and JSON configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.errors import UserError
from vlmkit.io import load_safetensors

# HF's single-file and sharded weight names, safetensors first (no pickle).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise UserError(f"cannot read {path} ({error}); the file is missing or not valid JSON") from None
    except RecursionError:
        raise UserError(f"cannot read {path}: its JSON is nested too deeply to parse; the file is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; re-export the checkpoint")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file: safetensors (memory-mapped) or a pickle-free torch file.

    `.bin`/`.pt`/`.pth` files are read with `weights_only=True` (no code runs) and memory-mapped
    when they are in torch's zip format. Training checkpoints that wrap the weights in
    `{"state_dict": ...}` are unwrapped, and DDP's `module.` prefix is removed.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        state = _quiet_torch_load(path, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        state = _torch_load(path, mmap=False)
    except Exception as error:
        raise _unreadable(path, error) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; give a weights file (.safetensors, .bin or .pt)")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _quiet_torch_load(path: Path, mmap: bool):
    """torch.load with weights_only (no pickled code ever runs), its warnings kept off stderr: a
    protocol-4 pickle warns before failing, and the failure is reported in one line below."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _torch_load(path: Path, mmap: bool):
    try:
        return _quiet_torch_load(path, mmap)
    except Exception as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: Exception) -> UserError:
    text = str(error)
    if "Weights only load failed" in text:
        # torch's message advises weights_only=False, i.e. running whatever the pickle holds: never.
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].split(". Please")[0].strip() \
            if "WeightsUnpickler error:" in text else ""
        return UserError(
            f"cannot read {path} as a pickle-free torch weights file: it holds more than tensors{f' ({detail[:120]})' if detail else ''}, and vlmkit never runs "
            f"code from a pickle; convert it to safetensors where it is trusted, or re-save it with "
            f"torch.save(model.state_dict())"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return UserError(
        f"cannot read {path} as a pickle-free torch weights file ({first[:200]}); "
        f"convert it to safetensors, or re-save it with torch.save(model.state_dict())"
    )


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path} has no 'weight_map'; re-export the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise UserError(f"shard {shard_path} named in {index_path.name} is missing; download the whole checkpoint")
        state.update(read_weights(shard_path))
    return state


def find_hf_weights(directory: Path) -> Path:
    """The weight file of an HF folder (safetensors preferred), or a UserError listing what is expected."""
    for name in HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise UserError(f"{directory} has a config.json but no weights; it needs one of {', '.join(HF_WEIGHT_FILES)}")


def cast_floats(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype` (float32 by default: fp16 checkpoints compute in fp32)."""
    dtype = dtype or torch.float32
    return {key: value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value for key, value in state.items()}
