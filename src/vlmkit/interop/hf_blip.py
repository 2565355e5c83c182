"""HF transformers BLIP folders (`BlipForConditionalGeneration`, `BlipForImageTextRetrieval`), both ways.

One declarative mapping: the ViT (`vision_model.*`: fused `self_attn.qkv` rows [q; k; v] like ours,
a patch-embedding bias, no ln_pre, `post_layernorm` on every token), the BERT text stack with
cross-attention (`text_decoder.bert.*` for the captioner, `text_encoder.*` for retrieval; q, k, v
separate, our cross-attention keeps k and v fused), and the heads: the BERT LM head
(`text_decoder.cls.predictions.*`, decoder weight tied to the word embedding and its bias to
`predictions.bias`), `vision_proj` / `text_proj` / `itm_head`.

A captioner folder becomes a vlmkit BLIP with the decoder side only, a retrieval folder one with
the encoder side only (`encoder` / `decoder` in the config), so loading stays strict. What HF does
not store: momentum encoders and queues (`distill` is false) and the ITC temperature (HF's
retrieval forward returns the plain cosine; vlmkit's `temperature` starts at `init_temperature`
0.07 and is not exported). HF's `BlipForImageTextRetrieval` does not put [ENC] at position 0 of
the ITM text (transformers #22732, #25629), so a loaded model has `enc_token_id = None` and scores
exactly as HF does; salesforce/BLIP's own training and evaluation code does substitute it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.bert import BERT_BLOCK
from vlmkit.interop.hf_clip import mlp_ratio
from vlmkit.interop.mapping import BlockNames, Format, Rule, block_rules, check_position_ids, fused, module, rename

FORMAT_NAME = "HF transformers BLIP"
CAPTIONER, RETRIEVAL = "BlipForConditionalGeneration", "BlipForImageTextRetrieval"
VISION_BLOCK = BlockNames(norm1="layer_norm1", qkv="self_attn.qkv.", out="self_attn.projection", norm2="layer_norm2",
                          fc1="mlp.fc1", fc2="mlp.fc2")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu",
               "quick_gelu": "quick_gelu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu", "quick_gelu": "quick_gelu"}
# BlipVisionConfig / BlipTextConfig defaults, for configs that leave keys out.
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 384, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                 "bos_token_id": 30522, "pad_token_id": 0, "sep_token_id": 102}


def is_hf_blip(config: dict) -> bool:
    return config.get("model_type") == "blip"


def _activation(name: Any, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{where} hidden_act '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def vision_config_from_hf(vision: dict[str, Any], where: str) -> dict[str, Any]:
    """The vlmkit ViT section of an HF BLIP / BLIP-2 `vision_config` (no ln_pre, a patch bias, ln_post)."""
    return {
        "type": "vit", "image_size": int(vision["image_size"]), "patch_size": int(vision["patch_size"]),
        "width": vision["hidden_size"], "depth": vision["num_hidden_layers"], "heads": vision["num_attention_heads"],
        "mlp_ratio": mlp_ratio(vision["hidden_size"], vision["intermediate_size"], f"{where} vision_config"),
        "activation": _activation(vision["hidden_act"], f"{where} vision_config"),
        "norm_eps": float(vision["layer_norm_eps"]), "norm_pre": False, "patch_bias": True,
    }


def vision_config_to_hf(vision, model_type: str) -> dict[str, Any]:
    """An HF BLIP / BLIP-2 `vision_config` (of `model_type`) from a vlmkit ViT config."""
    return {
        "model_type": model_type, "hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
        "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads, "image_size": vision.image_size,
        "patch_size": vision.patch_size, "hidden_act": TO_HF_ACTIVATION[vision.activation], "layer_norm_eps": vision.norm_eps,
        "attention_dropout": 0.0,
    }


def config_from_hf(hf: dict[str, Any], architecture: str, where: str) -> dict[str, Any]:
    """A vlmkit BLIP config dict from an HF `BlipConfig` dict, with the side the architecture holds."""
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    text = {**TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    if text.get("encoder_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise UserError(f"{where}: text_config.encoder_hidden_size {text['encoder_hidden_size']} differs from the vision "
                        f"width {vision['hidden_size']}; the checkpoint is inconsistent")
    if isinstance(vision["image_size"], (list, tuple)) or isinstance(vision["patch_size"], (list, tuple)):
        raise UserError(f"{where}: only square images are supported (integer image_size and patch_size)")
    captioner = architecture == CAPTIONER
    return {
        "embed_dim": int(hf.get("image_text_hidden_size", 256)),
        "vision": vision_config_from_hf(vision, where),
        "text": {
            "vocab_size": text["vocab_size"], "context_length": text["max_position_embeddings"], "width": text["hidden_size"],
            "depth": text["num_hidden_layers"], "heads": text["num_attention_heads"],
            "mlp_ratio": mlp_ratio(text["hidden_size"], text["intermediate_size"], f"{where} text_config"),
            "activation": _activation(text["hidden_act"], f"{where} text_config"),
            "causal": False, "pool": "cls", "eos_token_id": text["sep_token_id"], "pad_token_id": text["pad_token_id"] or 0,
            "prenorm": False, "embed_norm": True, "type_vocab_size": 0, "norm_eps": float(text["layer_norm_eps"]),
        },
        "encoder": not captioner, "decoder": captioner,
        "dec_token_id": text["bos_token_id"], "enc_token_id": None,  # HF's ITM reads the text as given
        "prompt": "", "distill": False,
    }


def _vision_rules(config) -> list[Rule]:
    vision, theirs = config.vision, "vision_model"
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    rules = [
        Rule("visual.class_embedding", (f"{theirs}.embeddings.class_embedding",),
             join=lambda t: t.reshape(-1), split=lambda t: (t.reshape(1, 1, -1),)),
        Rule("visual.positional_embedding", (f"{theirs}.embeddings.position_embedding",),
             join=lambda t: t.reshape(tokens, -1), split=lambda t: (t.reshape(1, tokens, -1),)),
        *module("visual.patch_embed", f"{theirs}.embeddings.patch_embedding"),
        *module("visual.norm_post", f"{theirs}.post_layernorm"),
    ]
    for index in range(vision.depth):
        rules += block_rules(f"visual.transformer.blocks.{index}", f"{theirs}.encoder.layers.{index}", VISION_BLOCK)
    return rules


def _text_rules(config, theirs: str) -> list[Rule]:
    rules = [
        rename("text.token_embedding.weight", f"{theirs}.embeddings.word_embeddings.weight"),
        rename("text.positional_embedding", f"{theirs}.embeddings.position_embeddings.weight"),
        *module("text.embed_norm", f"{theirs}.embeddings.LayerNorm"),
    ]
    for index in range(config.text.depth):
        ours, layer = f"text.transformer.blocks.{index}", f"{theirs}.encoder.layer.{index}"
        rules += block_rules(ours, layer, BERT_BLOCK)
        rules += module(f"{ours}.cross_attn.q", f"{layer}.crossattention.self.query")
        for param in ("weight", "bias"):
            rules.append(fused(f"{ours}.cross_attn.kv.{param}",
                               (f"{layer}.crossattention.self.key.{param}", f"{layer}.crossattention.self.value.{param}")))
        rules += module(f"{ours}.cross_attn.out", f"{layer}.crossattention.output.dense")
        rules += module(f"{ours}.norm_cross", f"{layer}.crossattention.output.LayerNorm")
    return rules


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer that old transformers versions saved"
    if key in ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"):
        return "tied to the word embedding / predictions.bias"
    return None


def blip_format(config) -> Format:
    """The HF key layout of a vlmkit BLIP config holding one side (captioner or retrieval)."""
    if config.encoder and config.decoder:
        raise UserError("this BLIP model holds both the encoder and the decoder side, and HF has no BLIP class with both; "
                        "save it with format='vlmkit'")
    rules = _vision_rules(config)
    if config.decoder:
        rules += _text_rules(config, "text_decoder.bert")
        head = "text_decoder.cls.predictions"
        rules += [*module("lm_head.dense", f"{head}.transform.dense"), *module("lm_head.norm", f"{head}.transform.LayerNorm"),
                  rename("lm_head.bias", f"{head}.bias")]
    else:
        rules += _text_rules(config, "text_encoder")
        rules += [*module("vision_proj", "vision_proj"), *module("text_proj", "text_proj"), *module("itm_head", "itm_head")]
    return Format(FORMAT_NAME, rules, skip=_skip, check_skipped=_check_skipped)


def _check_skipped(key: str, tensor: torch.Tensor) -> None:
    if key.endswith("position_ids"):
        check_position_ids(key, tensor)


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A vlmkit BLIP model from an HF BlipForConditionalGeneration / BlipForImageTextRetrieval folder."""
    from vlmkit.interop.common import attach_preprocessing, read_hf_folder, reject_kwargs
    from vlmkit.interop.mapping import to_ours
    from vlmkit.io import load_state_dict_strict
    from vlmkit.models.registry import get_family

    reject_kwargs(unused, FORMAT_NAME)
    hf, architecture, weights, state = read_hf_folder(directory, (CAPTIONER, RETRIEVAL), dtype)
    config = config_from_hf(hf, architecture, str(directory / "config.json"))
    with torch.device("meta"):
        model = get_family("blip").from_config_dict(config)
    fmt = blip_format(model.config)
    expected = model.state_dict()
    converted = to_ours(state, fmt, expected, str(weights))
    if "temperature" in expected:  # not in HF's checkpoints: the config's initial value
        reference = next(iter(converted.values()))
        converted["temperature"] = torch.tensor(float(model.config.init_temperature), dtype=reference.dtype)
    load_state_dict_strict(model, converted, str(weights), fmt.name)
    attach_preprocessing(model, directory, image_size=config["vision"]["image_size"])
    return model.eval()


# ---- export ------------------------------------------------------------------------------------
def config_to_hf(model) -> dict[str, Any]:
    """The HF `BlipConfig` dict (config.json) of a one-sided vlmkit BLIP model."""
    config = model.config
    vision, text = config.vision, config.text
    problems = {
        "a conv stem": bool(vision.conv_stem), "an ln_pre": vision.norm_pre, "no patch-embedding bias": not vision.patch_bias,
        "LayerScale": vision.layer_scale is not None, "token-type embeddings": bool(text.type_vocab_size),
        "pre-LN text blocks": text.prenorm, "no embedding LayerNorm": not text.embed_norm,
        f"activation '{vision.activation}' / '{text.activation}'": vision.activation not in TO_HF_ACTIVATION
        or text.activation not in TO_HF_ACTIVATION,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"this BLIP model has {problem}, which HF's BLIP cannot hold; save it with format='vlmkit'")
    architecture = CAPTIONER if config.decoder else RETRIEVAL
    return {
        "architectures": [architecture], "model_type": "blip", "image_text_hidden_size": config.embed_dim,
        "projection_dim": config.embed_dim, "dtype": "float32",
        "vision_config": vision_config_to_hf(vision, "blip_vision_model"),
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "encoder_hidden_size": vision.width, "intermediate_size": int(text.width * text.mlp_ratio),
            "num_hidden_layers": text.depth, "num_attention_heads": text.heads, "max_position_embeddings": text.context_length,
            "hidden_act": TO_HF_ACTIVATION[text.activation], "layer_norm_eps": text.norm_eps,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "bos_token_id": config.dec_token_id if config.dec_token_id is not None else text.vocab_size - 1,
            "pad_token_id": text.pad_token_id, "sep_token_id": text.eos_token_id, "eos_token_id": text.eos_token_id,
        },
    }


def export(model, directory: Path) -> None:
    """Write an HF BlipForConditionalGeneration (decoder side) or BlipForImageTextRetrieval (encoder side) folder."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    fmt = blip_format(model.config)
    hf_config = config_to_hf(model)
    if model.config.encoder and model.config.enc_token_id is not None:
        print("vlmkit: note: HF's BlipForImageTextRetrieval does not put [ENC] at position 0 of ITM texts, which this "
              "model was trained with; give HF input_ids starting with [ENC] to score as vlmkit does", file=sys.stderr)
    state = {key: value for key, value in model.state_dict().items() if key != "temperature"}  # HF keeps no temperature
    state = to_theirs(state, fmt)
    if model.config.decoder:  # HF reads the tied LM-head tensors too
        state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"].clone()
        state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"].clone()
    write_folder(model, Path(directory), hf_config, state, FORMAT_NAME)
