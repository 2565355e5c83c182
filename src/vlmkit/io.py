"""Atomic file writing and strict safetensors loading.

Everything a run writes goes to a temporary file in the same folder and is renamed into place,
so an interrupted run never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from vlmkit.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used, so `vlmkit score` can write files without it
    import torch


def _temporary_next_to(path: Path) -> tuple[int, str]:
    """A new, uniquely named file beside `path`: (open descriptor, its path).

    Unlike mkstemp (always mode 0600) it is created with mode 0666 for the kernel to apply the
    user's umask to, so an atomically written file looks like any other file the user writes.
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _temporary_next_to(path)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work, an output FILE a command could not write: an existing folder, a
    device or pipe, or a path through a file. Missing folders are fine: every command creates the
    folders of its output files (`atomic_write_bytes` does), and says so in its --help."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        mode = path.stat().st_mode if path.exists() else 0
        if stat.S_ISDIR(mode):
            raise UserError(f"{option} {path} is an existing folder; give a file path inside it, e.g. {path / 'out'}")
        if not stat.S_ISREG(mode):
            raise UserError(f"{option} {path} exists and is not a regular file; give a new file path")
    check_parent_folders(path, option)
    return path


def check_parent_folders(path: str | os.PathLike, option: str) -> None:
    """Refuse an output path whose nearest existing ancestor is a file or a folder the user cannot
    write (the missing folders below it are created when the output is written)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path} lies inside {parent}, which is a file, not a folder; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{option} {path}: the folder {parent} is not writable; choose another path or fix its permissions")
            return


def write_output_file(path: str | os.PathLike, data: bytes, option: str) -> None:
    """`check_output_file`, then `atomic_write_bytes`, with a failed write (full disk, permissions)
    as one UserError: the previous file, if any, is left as it was and nothing half-written stays."""
    path = check_output_file(path, option)
    try:
        atomic_write_bytes(path, data)
    except OSError as error:
        raise UserError(f"cannot write {option} {path} ({error.strerror or error}); nothing was written, "
                        f"free some space or choose another path") from None


def atomic_torch_save(path: str | os.PathLike, obj) -> None:
    """torch.save through a temporary file (optimizer and RNG states; read back with weights_only)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _temporary_next_to(path)
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors atomically (tied weights are written once per name)."""
    from safetensors.torch import save as to_bytes

    tensors, seen_storage = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen_storage:
            tensor = tensor.clone()  # safetensors refuses two names on one storage
        seen_storage.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    atomic_write_bytes(path, to_bytes(tensors, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-mapped read of a safetensors file (no second copy in memory)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read weights file {path}: {error}; the file is corrupt or not safetensors") from None
    # safetensors packs tensors at 4-byte offsets; a weight that is not 64-byte aligned can take another
    # CPU kernel path than the freshly built model's (results differing in the last bit), so such
    # tensors are copied to an aligned buffer and a reloaded model computes bit-identically.
    return {key: tensor.clone() if tensor.data_ptr() % 64 else tensor for key, tensor in tensors.items()}


def name_listing(names: list[str], limit: int = 8) -> str:
    """The first `limit` names and how many more, for one-line error messages."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def key_mismatch_error(source: str, assumed_format: str, missing: list[str], unexpected: list[str],
                       mismatched: list[str], hint: str = "") -> UserError:
    """The one-sentence error of every strict load: which keys, which file, which format was assumed."""
    parts = []
    if missing:
        parts.append(f"missing keys: {name_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {name_listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches: {name_listing(mismatched, 4)}")
    return UserError(f"weights in {source} do not fit the model (assumed format: {assumed_format}): " + "; ".join(parts) + hint)


def _with_optional_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` plus the defaults of the entries its modules declare optional ({name: default tensor}
    in a module's `optional_state`: counters that files written by an earlier vlmkit do not hold)."""
    filled = state_dict
    for prefix, module in model.named_modules():
        for name, default in getattr(module, "optional_state", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            if key not in filled:
                filled = dict(filled) if filled is state_dict else filled
                filled[key] = default.clone()
    return filled


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, assumed_format: str) -> None:
    """Load weights, failing loudly on any missing/unexpected key or shape mismatch (state a module marks
    optional, `optional_state`, is filled with its default where a file written before it lacks it)."""
    state_dict = _with_optional_state(model, state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{name} {tuple(state_dict[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(state_dict)
        if tuple(state_dict[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or mismatched:
        raise key_mismatch_error(source, assumed_format, missing, unexpected, mismatched)
    # A model built on the meta device takes the loaded tensors as they are (no copy); a real
    # model is copied into, so optimizers holding its parameters stay attached.
    on_meta = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
