"""HF transformers `CLIPModel` folders: config and key mapping both ways, loading and export.

An HF CLIP folder holds `config.json` (model_type "clip"), `model.safetensors` (or
`pytorch_model.bin`, or a sharded index), tokenizer files and `preprocessor_config.json`. HF keeps
q, k and v as three Linears (our fused `qkv` rows are [q; k; v]) and projections as bias-free
Linears like ours. Text pooling follows HF: legacy configs with `eos_token_id == 2` pool at the
argmax id, newer ones at the first `eos_token_id`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.mapping import BlockNames, Format, Rule, block_rules, check_position_ids, module, rename

FORMAT_NAME = "HF transformers CLIPModel"
HF_BLOCK = BlockNames(
    norm1="layer_norm1", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    out="self_attn.out_proj", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2",
)
# HF activation names <-> vlmkit's (HF's "gelu" is the exact erf GELU, like torch's default).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}
TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
LEGACY_EOS = 2  # HF's marker for "pool at the argmax id" (configs saved before transformers PR #24773)
# CLIPVisionConfig / CLIPTextConfig defaults, for configs that leave keys out.
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                 "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}


def _activation(name: Any, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{where} hidden_act '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp_ratio(width: int, hidden: int, where: str) -> float:
    """The MLP ratio our blocks use to rebuild `hidden` units exactly (int(width * ratio) == hidden)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise UserError(f"{where} intermediate_size {hidden} cannot be expressed as a ratio of width {width}")
    return ratio


def vision_config_from_hf(vision: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit ViT `vision` config dict from an HF `CLIPVisionConfig` dict (CLIPModel's or Llava's vision_config)."""
    vision = {**VISION_DEFAULTS, **vision}
    if vision["num_channels"] != 3 or isinstance(vision["image_size"], (list, tuple)) or isinstance(vision["patch_size"], (list, tuple)):
        raise UserError(f"{where}: only square RGB images are supported (num_channels 3, integer image_size and patch_size)")
    return {
        "type": "vit", "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
        "width": vision["hidden_size"], "depth": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
        "mlp_ratio": mlp_ratio(vision["hidden_size"], vision["intermediate_size"], where),
        "activation": _activation(vision["hidden_act"], where),
        "norm_eps": float(vision["layer_norm_eps"]),
    }


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit CLIP config dict from an HF `CLIPConfig` dict (config.json)."""
    vision = hf.get("vision_config") or {}
    text = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    eos = text["eos_token_id"]
    if isinstance(eos, list):
        eos = eos[0]
    legacy = eos == LEGACY_EOS
    return {
        "embed_dim": int(hf.get("projection_dim", 512)),
        "init_logit_scale": float(hf.get("logit_scale_init_value", 2.6592)),
        "vision": vision_config_from_hf(vision, f"{where} vision_config"),
        "text": {
            "vocab_size": text["vocab_size"], "context_length": text["max_position_embeddings"],
            "width": text["hidden_size"], "depth": text["num_hidden_layers"], "heads": text["num_attention_heads"],
            "mlp_ratio": mlp_ratio(text["hidden_size"], text["intermediate_size"], f"{where} text_config"),
            "activation": _activation(text["hidden_act"], f"{where} text_config"),
            "causal": True, "pool": "argmax" if legacy else "eos",
            # A legacy config's eos id (2) is a placeholder; the real end token is the highest id.
            "eos_token_id": text["vocab_size"] - 1 if legacy else eos,
            "pad_token_id": text["pad_token_id"] if text["pad_token_id"] is not None else 0,
            "norm_eps": float(text["layer_norm_eps"]),
        },
    }


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer that old transformers versions saved"
    return None


def vision_rules(vision, ours: str, theirs: str) -> list[Rule]:
    """The rules of an HF CLIP vision transformer (`CLIPVisionTransformer`) at `theirs` for our ViT at `ours`.

    `theirs` is "vision_model" inside a CLIPModel, "vision_tower.vision_model" in a Llava hub
    checkpoint (transformers 5 drops the inner "vision_model" when it saves one). Without the
    projection, which the ViT's owner maps (CLIPModel's `visual_projection`).
    """
    rules = [
        rename(f"{ours}.class_embedding", f"{theirs}.embeddings.class_embedding"),
        rename(f"{ours}.patch_embed.weight", f"{theirs}.embeddings.patch_embedding.weight"),
        rename(f"{ours}.positional_embedding", f"{theirs}.embeddings.position_embedding.weight"),
        *module(f"{ours}.norm_pre", f"{theirs}.pre_layrnorm"),  # (sic) HF's spelling
        *module(f"{ours}.norm_post", f"{theirs}.post_layernorm"),
    ]
    for index in range(vision.depth):
        rules += block_rules(f"{ours}.transformer.blocks.{index}", f"{theirs}.encoder.layers.{index}", HF_BLOCK)
    return rules


def clip_format(config) -> Format:
    """The HF CLIPModel key layout for a vlmkit CLIP config (ViT image tower, causal text tower)."""
    rules = [rename("logit_scale", "logit_scale")]
    text = "text_model"
    rules += vision_rules(config.vision, "visual", "vision_model")
    rules += [
        rename("visual.proj.weight", "visual_projection.weight"),
        rename("text.token_embedding.weight", f"{text}.embeddings.token_embedding.weight"),
        rename("text.positional_embedding", f"{text}.embeddings.position_embedding.weight"),
        *module("text.final_norm", f"{text}.final_layer_norm"),
        rename("text.proj.weight", "text_projection.weight"),
    ]
    for index in range(config.text.depth):
        rules += block_rules(f"text.transformer.blocks.{index}", f"{text}.encoder.layers.{index}", HF_BLOCK)
    return Format(FORMAT_NAME, rules, skip=_skip, check_skipped=check_position_ids)


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A vlmkit CLIP model from an HF CLIPModel folder, with its tokenizer and image transform."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, _, weights, state = read_hf_folder(directory, "CLIPModel", dtype)
    config = config_from_hf(hf, str(directory / "config.json"))
    model = build_and_load("clip", config, state, lambda built: clip_format(built.config), str(weights))
    attach_preprocessing(model, directory, image_size=config["vision"]["image_size"])
    return model


# ---- export ------------------------------------------------------------------------------------
def check_exportable(model) -> None:
    """Raise a UserError naming the first feature HF's CLIPModel cannot represent."""
    config = model.config
    vision, text = config.vision, config.text
    problems = {
        "a ResNet image tower (HF CLIPModel is ViT-only; use --to openclip)": vision.type != "vit",
        "a conv stem": bool(vision.conv_stem),
        "mean-pooled image tokens": vision.pool != "cls",
        "no ln_pre": not vision.norm_pre,
        "LayerScale": vision.layer_scale is not None,
        "a patch-embedding bias": vision.patch_bias,
        "a bidirectional / BERT-style text tower": not text.causal or not text.prenorm or text.embed_norm or text.type_vocab_size,
        f"text pooling '{text.pool}'": text.pool not in ("eos", "argmax"),
        "a SigLIP logit bias": getattr(model, "logit_bias", None) is not None,
        f"activation '{vision.activation}' / '{text.activation}'": vision.activation not in TO_HF_ACTIVATION
        or text.activation not in TO_HF_ACTIVATION,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"this CLIP model has {problem}, which HF's CLIPModel cannot hold; save it with format='vlmkit'")


def vision_config_to_hf(vision, projection_dim: int) -> dict[str, Any]:
    """The HF `CLIPVisionConfig` dict of a vlmkit ViT config (check `vision_export_problem` first)."""
    return {
        "model_type": "clip_vision_model", "hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
        "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "num_channels": 3, "hidden_act": TO_HF_ACTIVATION[vision.activation],
        "layer_norm_eps": vision.norm_eps, "projection_dim": projection_dim, "attention_dropout": 0.0,
    }


def vision_export_problem(vision) -> str | None:
    """The first feature of a vlmkit image tower that HF's CLIP vision transformer cannot hold, or None."""
    problems = {
        "a ResNet image tower (HF CLIP is ViT-only)": vision.type != "vit",
        "a conv stem": bool(vision.conv_stem),
        "no ln_pre": not vision.norm_pre,
        "LayerScale": vision.layer_scale is not None,
        "a patch-embedding bias": vision.patch_bias,
        f"activation '{vision.activation}'": vision.activation not in TO_HF_ACTIVATION,
    }
    return next((problem for problem, present in problems.items() if present), None)


def config_to_hf(config) -> dict[str, Any]:
    """The HF `CLIPConfig` dict (config.json) of a vlmkit CLIP config."""
    import math

    vision, text = config.vision, config.text
    eos = LEGACY_EOS if text.pool == "argmax" else text.eos_token_id
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": float(config.init_logit_scale) if math.isfinite(config.init_logit_scale) else 2.6592,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "vision_config": vision_config_to_hf(vision, config.embed_dim),
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio), "num_hidden_layers": text.depth,
            "num_attention_heads": text.heads, "max_position_embeddings": text.context_length,
            "hidden_act": TO_HF_ACTIVATION[text.activation], "layer_norm_eps": text.norm_eps,
            "projection_dim": config.embed_dim, "attention_dropout": 0.0,
            # HF checks these ids against the vocabulary; tiny vocabularies get the end token for all three.
            "bos_token_id": min(49406, text.vocab_size - 1), "eos_token_id": eos,
            "pad_token_id": text.pad_token_id,
        },
    }


def export(model, directory: Path) -> None:
    """Write an HF CLIPModel folder: config.json, model.safetensors (HF names), tokenizer, preprocessor."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    check_exportable(model)
    state = to_theirs(model.state_dict(), clip_format(model.config))
    write_folder(model, directory, config_to_hf(model.config), state, FORMAT_NAME, vocab_files=True)


def is_hf_clip(config: dict) -> bool:
    return config.get("model_type") == "clip" or "CLIPModel" in (config.get("architectures") or [])
