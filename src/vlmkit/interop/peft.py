"""LoRA adapters in PEFT's folder layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an adapter tensor after the HF module it sits on,
`base_model.model.<hf module path>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank).
Our layers are named differently (one fused `attn.qkv` where HF has `q_proj`/`k_proj`/`v_proj`),
so both directions take a *name translator*: `translator(our module path, slice name) -> HF module
path` (slice "all" for a LoRA on a whole layer), or None where the layer has no HF twin. One
slice of a fused layer is then one HF module: LoRA on `attn.qkv:q,v` saves as PEFT's LoRA on
`q_proj` and `v_proj`, which gives the same outputs because each slice's delta only touches its
own rows. The family that owns the layout (its HF mapping) provides the translator.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vlmkit.errors import UserError
from vlmkit.layers.lora import adapt_layers, layer_slices, load_lora_state_dict, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Translator = Callable[[str, str], "str | None"]


def save_peft_adapter(model: nn.Module, directory: str | Path, translator: Translator,
                      base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write `model`'s LoRA adapters as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads
    onto the HF twin of the model. Every adapted slice must translate to its own HF module, and every
    adapter must share one rank, alpha and dropout (PEFT's single `r` / `lora_alpha`)."""
    from vlmkit.io import atomic_write_json, save_safetensors

    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA adapters to save; apply_lora it first")
    settings = {(layer.rank, layer.alpha, layer.dropout_p) for layer in layers.values()}
    if len(settings) > 1:
        raise UserError(f"PEFT's layout has one rank, alpha and dropout per adapter; the model's layers use {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    tensors: dict[str, torch.Tensor] = {}
    hf_modules: dict[str, str] = {}
    for path, layer in layers.items():
        for name in layer.slices:
            hf_path = translator(path, name)
            if hf_path is None:
                raise UserError(f"LoRA on {path} (slice {name}) has no HF counterpart under this translator; "
                                f"adapt only layers the HF model has")
            if hf_path in hf_modules:
                raise UserError(f"the translator maps both {hf_modules[hf_path]} and {path}:{name} to {hf_path}")
            hf_modules[hf_path] = f"{path}:{name}"
            tensors[f"{PREFIX}{hf_path}.lora_A.weight"] = layer.lora_A[name].weight.detach().contiguous()
            tensors[f"{PREFIX}{hf_path}.lora_B.weight"] = layer.lora_B[name].weight.detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / ADAPTER_WEIGHTS)
    atomic_write_json(directory / ADAPTER_CONFIG, {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # Full module paths: PEFT matches a name that equals an entry (or ends with "." + it), so full
        # paths adapt exactly these modules, never a same-named layer of another tower.
        "target_modules": sorted(hf_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    })
    return directory


def read_peft_adapter(directory: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {HF module path: {"lora_A": tensor, "lora_B": tensor}}) of a PEFT LoRA folder, with every
    option vlmkit cannot reproduce refused by name."""
    from vlmkit.interop.files import read_json
    from vlmkit.io import load_safetensors

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{directory} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{directory} has no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read; re-save with safetensors)")
    config = read_json(directory / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{directory / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}; only LORA adapters load")
    refused = {"bias": config.get("bias", "none") != "none", "use_dora": bool(config.get("use_dora")),
               "modules_to_save": bool(config.get("modules_to_save")), "rank_pattern": bool(config.get("rank_pattern")),
               "alpha_pattern": bool(config.get("alpha_pattern"))}
    if any(refused.values()):
        raise UserError(f"{directory / ADAPTER_CONFIG} uses {', '.join(k for k, v in refused.items() if v)}, which vlmkit's "
                        f"LoRA does not reproduce; only plain LoRA (bias 'none', one rank and alpha) loads")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_safetensors(directory / ADAPTER_WEIGHTS).items():
        inner = key[len(PREFIX):] if key.startswith(PREFIX) else key
        hf_path, _, kind = inner.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise UserError(f"{directory / ADAPTER_WEIGHTS}: tensor {key} is not a LoRA A/B weight (embedding or bias adapters do not load)")
        modules.setdefault(hf_path, {})[f"lora_{kind[0]}"] = tensor
    if incomplete := [path for path, pair in modules.items() if len(pair) != 2]:
        raise UserError(f"{directory / ADAPTER_WEIGHTS}: {incomplete[0]} has only one of lora_A / lora_B")
    return config, modules


def load_peft_adapter(model: nn.Module, directory: str | Path, translator: Translator) -> nn.Module:
    """Adapt `model` (without adapters yet) with the LoRA of a PEFT folder, in place: every HF module the
    adapter names must be the translation of one layer (or slice) of `model`. Base weights are frozen as
    `apply_lora` does; rsLoRA's alpha / sqrt(r) scale is kept exactly. Returns `model`."""
    config, modules = read_peft_adapter(directory)
    if lora_layers(model):
        raise UserError("the model already has LoRA adapters; load a PEFT adapter into a model without them")
    rank = int(config["r"])
    # Our scale is alpha / rank; rsLoRA's alpha / sqrt(rank) is the same scale with alpha * sqrt(rank).
    alpha = float(config.get("lora_alpha", 8)) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    ours: dict[str, tuple[str, str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path:
            for name in layer_slices(path, module):
                hf_path = translator(path, name)
                if hf_path is not None:
                    ours[hf_path] = (path, name)
    plan: dict[str, list[str]] = {}
    for hf_path in modules:
        if hf_path not in ours:
            raise UserError(f"the adapter's module {hf_path} is no layer of this model under the translator "
                            f"(it maps to e.g. {', '.join(list(ours)[:3])})")
        path, name = ours[hf_path]
        plan.setdefault(path, []).append(name)
    adapt_layers(model, plan, rank, alpha, float(config.get("lora_dropout", 0.0)))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)
    state = {}
    for hf_path, pair in modules.items():
        path, name = ours[hf_path]
        state[f"{path}.lora_A.{name}.weight"] = pair["lora_A"]
        state[f"{path}.lora_B.{name}.weight"] = pair["lora_B"]
    load_lora_state_dict(model, state, source=str(Path(directory) / ADAPTER_WEIGHTS))
    return model
