"""OpenAI CLIP / OpenCLIP state dicts: architecture inference, key mapping both ways, load and export.

OpenAI's and OpenCLIP's checkpoints share one layout: `visual.*` (ViT: `conv1`, `class_embedding`,
`ln_pre`, `transformer.resblocks.{i}` with a fused `attn.in_proj_weight`, `ln_post`, `proj` used as
`x @ W`; ResNet: `layer{1-4}`, `attnpool.*`, the names our ModifiedResNet already uses), then the
text tower at the top level (`token_embedding`, `positional_embedding`, `transformer.resblocks`,
`ln_final`, `text_projection`) and `logit_scale`. The architecture is read from the tensors' shapes
as OpenAI's `build_model` does (heads = width // 64), or forced with `model_name="ViT-B-32"`.

Activation: the file does not say. OpenAI's weights use QuickGELU, most OpenCLIP-trained ones GELU.
Without a hint the loader assumes QuickGELU (OpenAI-style files); `activation="gelu"`, a model name
without "-quickgelu" (OpenCLIP's configs) or an `open_clip_config.json` says otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.mapping import BlockNames, Format, block_rules, count_layers, module, rename, transposed

FORMAT_NAME = "OpenAI/OpenCLIP CLIP state dict"
OPENCLIP_BLOCK = BlockNames(norm1="ln_1", qkv="attn.in_proj_", out="attn.out_proj", norm2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
# Folder layout of OpenCLIP models on the HF hub (what open_clip's push_to_hub writes).
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _text(width: int, layers: int = 12, context: int = 77, vocab: int = 49408) -> dict[str, Any]:
    return {"width": width, "layers": layers, "context_length": context, "vocab_size": vocab}


# OpenCLIP's architecture configs (model_configs/*.json), the ones OpenAI released weights for.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "RN50": {"embed_dim": 1024, "vision": {"type": "resnet", "layers": (3, 4, 6, 3), "width": 64, "image_size": 224}, "text": _text(512)},
    "RN101": {"embed_dim": 512, "vision": {"type": "resnet", "layers": (3, 4, 23, 3), "width": 64, "image_size": 224}, "text": _text(512)},
    "RN50x4": {"embed_dim": 640, "vision": {"type": "resnet", "layers": (4, 6, 10, 6), "width": 80, "image_size": 288}, "text": _text(640)},
    "RN50x16": {"embed_dim": 768, "vision": {"type": "resnet", "layers": (6, 8, 18, 8), "width": 96, "image_size": 384}, "text": _text(768)},
    "RN50x64": {"embed_dim": 1024, "vision": {"type": "resnet", "layers": (3, 15, 36, 10), "width": 128, "image_size": 448}, "text": _text(1024)},
    "ViT-B-32": {"embed_dim": 512, "vision": {"type": "vit", "layers": 12, "width": 768, "patch_size": 32, "image_size": 224}, "text": _text(512)},
    "ViT-B-16": {"embed_dim": 512, "vision": {"type": "vit", "layers": 12, "width": 768, "patch_size": 16, "image_size": 224}, "text": _text(512)},
    "ViT-L-14": {"embed_dim": 768, "vision": {"type": "vit", "layers": 24, "width": 1024, "patch_size": 14, "image_size": 224}, "text": _text(768)},
    "ViT-L-14-336": {"embed_dim": 768, "vision": {"type": "vit", "layers": 24, "width": 1024, "patch_size": 14, "image_size": 336}, "text": _text(768)},
}


def _require(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise UserError(
            f"{source} has no '{key}', so it is not an OpenAI/OpenCLIP CLIP state dict "
            f"(assumed format: {FORMAT_NAME}); give an HF folder, a vlmkit folder, or pass model_name="
        )
    return state[key]


def infer_architecture(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The architecture spec (as in KNOWN_MODELS) read from tensor shapes, as OpenAI's build_model does."""
    text_projection = _require(state, "text_projection", source)
    token_embedding = _require(state, "token_embedding.weight", source)
    spec: dict[str, Any] = {
        "embed_dim": text_projection.shape[1],
        "text": {
            "width": _require(state, "ln_final.weight", source).shape[0],
            "layers": count_layers(state, "transformer.resblocks."),
            "context_length": _require(state, "positional_embedding", source).shape[0],
            "vocab_size": token_embedding.shape[0],
            "mlp_ratio": _require(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0] / text_projection.shape[0],
        },
    }
    if "visual.class_embedding" in state:  # a ViT; the ResNet has an attention pool instead
        conv = _require(state, "visual.conv1.weight", source)  # (width, 3, patch, patch)
        grid = round((_require(state, "visual.positional_embedding", source).shape[0] - 1) ** 0.5)
        spec["vision"] = {
            "type": "vit", "width": conv.shape[0], "patch_size": conv.shape[-1], "image_size": conv.shape[-1] * grid,
            "layers": count_layers(state, "visual.transformer.resblocks."),
            "mlp_ratio": _require(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0] / conv.shape[0],
        }
    else:
        grid = round((_require(state, "visual.attnpool.positional_embedding", source).shape[0] - 1) ** 0.5)
        spec["vision"] = {
            "type": "resnet", "width": _require(state, "visual.layer1.0.conv1.weight", source).shape[0],
            "layers": tuple(count_layers(state, f"visual.layer{stage}.") for stage in (1, 2, 3, 4)),
            "image_size": grid * 32,
        }
    return spec


def config_from_spec(spec: dict[str, Any], activation: str) -> dict[str, Any]:
    """A vlmkit CLIP config dict from an architecture spec; heads = width // 64 as OpenAI and OpenCLIP use."""
    vision, text = spec["vision"], spec["text"]
    if vision["type"] == "vit":
        vision_config = {
            "type": "vit", "image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": vision["width"],
            "depth": vision["layers"], "heads": max(vision["width"] // 64, 1), "mlp_ratio": vision.get("mlp_ratio", 4.0),
            "activation": activation,
        }
    else:
        # The ResNet's attention pool runs at width * 32 channels with 64-dim heads.
        vision_config = {"type": "resnet", "image_size": vision["image_size"], "width": vision["width"],
                         "heads": vision["width"] * 32 // 64, "resnet_layers": list(vision["layers"])}
    return {
        "embed_dim": spec["embed_dim"],
        "vision": vision_config,
        "text": {
            "vocab_size": text["vocab_size"], "context_length": text["context_length"], "width": text["width"],
            "depth": text["layers"], "heads": max(text["width"] // 64, 1), "mlp_ratio": text.get("mlp_ratio", 4.0),
            "activation": activation, "causal": True,
            # OpenAI/OpenCLIP pool at the argmax id: <|endoftext|> is the highest id of the vocabulary.
            "pool": "argmax", "eos_token_id": text["vocab_size"] - 1, "pad_token_id": 0,
        },
    }


def openclip_format(model) -> Format:
    """The OpenAI/OpenCLIP key layout of a vlmkit CLIP model (ViT or ModifiedResNet image tower)."""
    config = model.config
    rules = [rename("logit_scale", "logit_scale")]
    if config.vision.type == "vit":
        rules += [
            rename("visual.patch_embed.weight", "visual.conv1.weight"),
            rename("visual.class_embedding", "visual.class_embedding"),
            rename("visual.positional_embedding", "visual.positional_embedding"),
            *module("visual.norm_pre", "visual.ln_pre"),
            *module("visual.norm_post", "visual.ln_post"),
            transposed("visual.proj.weight", "visual.proj"),
        ]
        for index in range(config.vision.depth):
            rules += block_rules(f"visual.transformer.blocks.{index}", f"visual.transformer.resblocks.{index}", OPENCLIP_BLOCK)
    else:  # our ModifiedResNet is written with OpenAI's parameter names
        rules += [rename(f"visual.{name}", f"visual.{name}") for name in model.visual.state_dict()]
    rules += [
        rename("text.token_embedding.weight", "token_embedding.weight"),
        rename("text.positional_embedding", "positional_embedding"),
        *module("text.final_norm", "ln_final"),
        transposed("text.proj.weight", "text_projection"),
    ]
    for index in range(config.text.depth):
        rules += block_rules(f"text.transformer.blocks.{index}", f"transformer.resblocks.{index}", OPENCLIP_BLOCK)
    return Format(FORMAT_NAME, rules)


def _activation(model_name: str | None, activation: str | None, folder_config: dict | None) -> str:
    if activation is not None:
        if activation not in ("quick_gelu", "gelu"):
            raise UserError(f"activation '{activation}' is not an OpenAI/OpenCLIP choice; use 'quick_gelu' or 'gelu'")
        return activation
    if folder_config is not None and "quick_gelu" in folder_config.get("model_cfg", {}):
        return "quick_gelu" if folder_config["model_cfg"]["quick_gelu"] else "gelu"
    if model_name is not None:
        return "quick_gelu" if model_name.lower().endswith("-quickgelu") else "gelu"
    return "quick_gelu"  # OpenAI's released weights


def _spec_for_name(model_name: str) -> dict[str, Any]:
    base = model_name[: -len("-quickgelu")] if model_name.lower().endswith("-quickgelu") else model_name
    if base not in KNOWN_MODELS:
        raise UserError(f"unknown OpenCLIP model name '{model_name}'; known: {', '.join(KNOWN_MODELS)} (optionally with -quickgelu)")
    return KNOWN_MODELS[base]


def load(source: Path, model_name: str | None = None, activation: str | None = None, dtype: torch.dtype | None = None):
    """A vlmkit CLIP model from an OpenAI/OpenCLIP state dict file or an OpenCLIP hub folder.

    The architecture comes from `model_name` ("ViT-B-32", "RN50", "ViT-B-32-quickgelu", ...) or is
    inferred from the tensors' shapes; `activation` ("quick_gelu" | "gelu") overrides the default
    described in the module docstring. The tokenizer is OpenAI's (the real 49,408-token BPE, padded
    with 0 as OpenCLIP does) when the vocabulary has that size; images use CLIP's preprocessing at
    the model's resolution, or the folder's `preprocess_cfg`.
    """
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.interop.common import build_and_load
    from vlmkit.interop.files import cast_floats, read_json, read_weights
    from vlmkit.tokenizers import clip_tokenizer

    folder_config = None
    if source.is_dir():
        folder_config = read_json(source / OPENCLIP_CONFIG)
        weights = next((source / name for name in OPENCLIP_WEIGHTS if (source / name).is_file()), None)
        if weights is None:
            raise UserError(f"{source} has {OPENCLIP_CONFIG} but no weights; it needs one of {', '.join(OPENCLIP_WEIGHTS)}")
    else:
        weights = source
    state = cast_floats(read_weights(weights), dtype)
    spec = _spec_for_name(model_name) if model_name else infer_architecture(state, str(weights))
    config = config_from_spec(spec, _activation(model_name, activation, folder_config))
    assumed = f"{FORMAT_NAME}, {model_name or 'architecture inferred from shapes'}"
    model = build_and_load("clip", config, state, lambda built: _named(openclip_format(built), assumed), str(weights))
    if config["text"]["vocab_size"] == 49408:
        model.tokenizer = clip_tokenizer(context_length=config["text"]["context_length"])
    else:
        model.missing_tokenizer_reason = (
            f"{weights} has a {config['text']['vocab_size']:,}-token vocabulary, not CLIP's 49,408, so its tokenizer "
            f"cannot be known and none is attached; give it one: in Python, model.tokenizer = "
            f"vlmkit.tokenizers.Tokenizer.load('FOLDER_WITH_TOKENIZER_JSON'), or `vlmkit convert` it to a folder and copy "
            f"the tokenizer's tokenizer.json into that folder"
        )
    preprocess = (folder_config or {}).get("preprocess_cfg", {})
    model.transform = ImageTransform(
        image_size=config["vision"]["image_size"],
        **{key: preprocess[name] for key, name in (("mean", "mean"), ("std", "std")) if name in preprocess},
    )
    return model


def _named(fmt: Format, name: str) -> Format:
    fmt.name = name
    return fmt


# ---- export ------------------------------------------------------------------------------------
def export(model, directory: Path) -> None:
    """Write an OpenCLIP hub-style folder: open_clip_model.safetensors + open_clip_config.json.

    `open_clip.create_model_and_transforms("local-dir:DIR")` reads it, and so does `vlmkit.load`.
    """
    from vlmkit.interop.mapping import to_theirs
    from vlmkit.io import atomic_write_json, save_safetensors

    config = model.config
    vision, text = config.vision, config.text
    problems = {
        "a bidirectional text tower": not text.causal or not text.prenorm or text.embed_norm or text.type_vocab_size,
        # OpenCLIP pools at the argmax id. First-eos pooling is the same position when the end token is the
        # highest id (CLIP's BPE: <|endoftext|> = vocab_size - 1) and every row holds it, which vlmkit's
        # tokenizers guarantee (truncation keeps the end token).
        "text pooling OpenCLIP cannot express (it pools at the argmax id; first-eos pooling is only the same "
        "when the end token is the highest id)": text.pool not in ("argmax", "eos")
        or (text.pool == "eos" and text.eos_token_id != text.vocab_size - 1),
        "a ViT feature OpenCLIP's config cannot express (conv stem, mean pool, no ln_pre, LayerScale)": vision.type == "vit"
        and (bool(vision.conv_stem) or vision.pool != "cls" or not vision.norm_pre or vision.layer_scale is not None),
        "different activations in the two towers": vision.type == "vit" and vision.activation != text.activation,
        "an activation other than GELU / QuickGELU": text.activation not in ("gelu", "quick_gelu"),
        "heads that are not width // 64": text.heads != max(text.width // 64, 1)
        or (vision.type == "vit" and vision.heads != max(vision.width // 64, 1)),
        "a SigLIP logit bias": getattr(model, "logit_bias", None) is not None,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"this CLIP model has {problem}, which the OpenCLIP format cannot hold; save it with format='vlmkit'")
    state = to_theirs(model.state_dict(), openclip_format(model))
    if vision.type == "vit":
        vision_cfg = {"image_size": vision.image_size, "layers": vision.depth, "width": vision.width,
                      "patch_size": vision.patch_size, "mlp_ratio": vision.mlp_ratio}
    else:
        vision_cfg = {"image_size": vision.image_size, "layers": list(vision.resnet_layers), "width": vision.width}
    transform = model.transform
    open_clip_config = {
        "model_cfg": {
            "embed_dim": config.embed_dim, "quick_gelu": text.activation == "quick_gelu", "vision_cfg": vision_cfg,
            "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                         "heads": text.heads, "layers": text.depth, "mlp_ratio": text.mlp_ratio},
        },
        "preprocess_cfg": {"mean": list(transform.mean), "std": list(transform.std)} if transform is not None else {},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, directory / OPENCLIP_WEIGHTS[0], metadata={"format": "pt"})
    # Written last: a folder without it is recognisably incomplete. OpenCLIP folders carry no
    # tokenizer files; the tokenizer is OpenAI's by convention.
    atomic_write_json(directory / OPENCLIP_CONFIG, open_clip_config)
