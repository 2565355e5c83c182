"""HF transformers `Blip2ForConditionalGeneration` folders (with a Llama language model) <-> `blip2_lm`.

One declarative mapping, strict both ways: the ViT (`vision_model.*`, the same layout as HF BLIP's:
fused `self_attn.qkv` rows, a patch-embedding bias, no ln_pre; `post_layernorm` is BLIP-2's
`ln_vision`, vlmkit's `visual.norm_post`), `query_tokens`, the query-only Q-Former (`qformer.layernorm`
= the embedding LayerNorm; per layer `attention.attention.{query,key,value}` fused into our `qkv`,
`crossattention.*` in layers 0, f, 2f, ..., `intermediate_query` / `output_query` = the query FFN),
`language_projection` and the Llama LM (`language_model.model.*`, `language_model.lm_head.weight`,
`hf_lm.llama_format`). Settings vlmkit does not implement are one UserError each: a text model other
than Llama, a Q-Former with its text side (`use_qformer_text_input`). HF's processor writes
`num_query_tokens` copies of the `<image>` token (`image_token_index`) in front of the text and the model
scatters the projected queries into them; vlmkit puts the queries in front of the text embeddings
itself, which is the same sequence (tested: the text positions' logits agree).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.hf_blip import VISION_BLOCK, _activation, vision_config_from_hf, vision_config_to_hf
from vlmkit.interop.hf_clip import mlp_ratio
from vlmkit.interop.mapping import Format, Rule, block_rules, fused, module

FORMAT_NAME = "HF transformers Blip2ForConditionalGeneration"
ARCHITECTURE = "Blip2ForConditionalGeneration"
VISION_DEFAULTS = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True}
QFORMER_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512,
                    "layer_norm_eps": 1e-12, "cross_attention_frequency": 2, "pad_token_id": 0}


def is_hf_blip2(config: dict) -> bool:
    """Whether an HF config.json describes a BLIP-2 model."""
    return config.get("model_type") == "blip-2"


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit `blip2_lm` config dict from an HF `Blip2Config` dict (config.json)."""
    from vlmkit.interop import hf_lm

    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    qformer = {**QFORMER_DEFAULTS, **(hf.get("qformer_config") or {})}
    text = dict(hf.get("text_config") or {"model_type": "opt"})
    if text.get("model_type") != "llama":
        raise UserError(f"{where}: text_config is a '{text.get('model_type')}' model; vlmkit's BLIP-2 loads Llama language models only")
    if qformer.get("use_qformer_text_input"):
        raise UserError(f"{where}: qformer_config.use_qformer_text_input is set (a retrieval Q-Former); vlmkit loads the "
                        f"captioning Q-Former of Blip2ForConditionalGeneration")
    if not vision.get("qkv_bias", True):
        raise UserError(f"{where}: vision_config.qkv_bias is false; vlmkit's ViT has q/k/v biases")
    if qformer.get("encoder_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise UserError(f"{where}: qformer_config.encoder_hidden_size differs from the vision width; the checkpoint is inconsistent")
    lm = hf_lm.config_from_hf(text, f"{where} text_config")["lm"]
    lm["tie_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return {
        "vision": vision_config_from_hf(vision, where),
        "qformer": {
            "vocab_size": qformer["vocab_size"], "context_length": qformer["max_position_embeddings"],
            "width": qformer["hidden_size"], "depth": qformer["num_hidden_layers"], "heads": qformer["num_attention_heads"],
            "mlp_ratio": mlp_ratio(qformer["hidden_size"], qformer["intermediate_size"], f"{where} qformer_config"),
            "activation": _activation(qformer["hidden_act"], f"{where} qformer_config"), "causal": False, "pool": "cls",
            "eos_token_id": None, "pad_token_id": qformer["pad_token_id"] or 0, "prenorm": False, "embed_norm": True,
            "type_vocab_size": 0, "norm_eps": float(qformer["layer_norm_eps"]),
        },
        "lm": lm,
        "num_query_tokens": int(hf.get("num_query_tokens", 32)),
        "cross_attention_frequency": int(qformer["cross_attention_frequency"]),
        "image_token_id": hf.get("image_token_id", hf.get("image_token_index")),
    }


def config_to_hf(model) -> dict[str, Any]:
    """The HF `Blip2Config` dict (config.json) of a vlmkit `blip2_lm` model with a Llama LM."""
    from vlmkit.interop import hf_lm
    from vlmkit.interop.hf_blip import TO_HF_ACTIVATION

    config = model.config
    vision, qformer = config.vision, config.qformer
    problems = {
        "a conv stem": bool(vision.conv_stem), "an ln_pre": vision.norm_pre, "no patch-embedding bias": not vision.patch_bias,
        "LayerScale": vision.layer_scale is not None, "a GPT-2 style language model": hf_lm.hf_style(config.lm) != "llama",
        f"activation '{vision.activation}' / '{qformer.activation}'": vision.activation not in TO_HF_ACTIVATION
        or qformer.activation not in TO_HF_ACTIVATION,
        "no image_token_id (HF's processor expands an <image> token; set image_token_id to an id of the LM's vocabulary)":
        config.image_token_id is None,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"this BLIP-2 model has {problem}, which vlmkit cannot write as {ARCHITECTURE}; save it with format='vlmkit'")
    text = {key: value for key, value in hf_lm.config_to_hf(config).items() if key not in ("architectures", "dtype")}
    return {
        "architectures": [ARCHITECTURE], "model_type": "blip-2", "num_query_tokens": config.num_query_tokens,
        "image_token_index": config.image_token_id, "tie_word_embeddings": config.lm.tie_embeddings, "dtype": "float32",
        "vision_config": {**vision_config_to_hf(vision, "blip_2_vision_model"), "qkv_bias": True},
        "qformer_config": {
            "model_type": "blip_2_qformer", "vocab_size": qformer.vocab_size, "hidden_size": qformer.width,
            "num_hidden_layers": qformer.depth, "num_attention_heads": qformer.heads,
            "intermediate_size": int(qformer.width * qformer.mlp_ratio), "hidden_act": TO_HF_ACTIVATION[qformer.activation],
            "max_position_embeddings": qformer.context_length, "layer_norm_eps": qformer.norm_eps,
            "cross_attention_frequency": config.cross_attention_frequency, "encoder_hidden_size": vision.width,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": qformer.pad_token_id,
        },
        "text_config": text,
    }


def export(model, directory: Path) -> None:
    """Write an HF Blip2ForConditionalGeneration folder: config.json, model.safetensors, tokenizer, preprocessor."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    hf_config = config_to_hf(model)
    write_folder(model, Path(directory), hf_config, to_theirs(model.state_dict(), blip2_format(model.config)), FORMAT_NAME)


def blip2_format(config, state: dict[str, torch.Tensor] | None = None) -> Format:
    """The Blip2ForConditionalGeneration key layout of a `blip2_lm` config."""
    from vlmkit.interop.hf_lm import llama_format

    vision = config.vision
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    ours_v, theirs_v = "query_encoder.visual", "vision_model"
    rules = [
        Rule(f"{ours_v}.class_embedding", (f"{theirs_v}.embeddings.class_embedding",),
             join=lambda t: t.reshape(-1), split=lambda t: (t.reshape(1, 1, -1),)),
        Rule(f"{ours_v}.positional_embedding", (f"{theirs_v}.embeddings.position_embedding",),
             join=lambda t: t.reshape(tokens, -1), split=lambda t: (t.reshape(1, tokens, -1),)),
        *module(f"{ours_v}.patch_embed", f"{theirs_v}.embeddings.patch_embedding"),
        *module(f"{ours_v}.norm_post", f"{theirs_v}.post_layernorm"),
        Rule("query_encoder.query_tokens", ("query_tokens",)),
        *module("query_encoder.qformer.embed_norm", "qformer.layernorm"),
        *module("language_projection", "language_projection"),
    ]
    for index in range(vision.depth):
        rules += block_rules(f"{ours_v}.transformer.blocks.{index}", f"{theirs_v}.encoder.layers.{index}", VISION_BLOCK)
    for index in range(config.qformer.depth):
        ours, layer = f"query_encoder.qformer.transformer.blocks.{index}", f"qformer.encoder.layer.{index}"
        for param in ("weight", "bias"):
            rules.append(fused(f"{ours}.attn.qkv.{param}", tuple(f"{layer}.attention.attention.{name}.{param}"
                                                                 for name in ("query", "key", "value"))))
        rules += module(f"{ours}.attn.out", f"{layer}.attention.output.dense")
        rules += module(f"{ours}.norm1", f"{layer}.attention.output.LayerNorm")
        if index % config.cross_attention_frequency == 0:
            rules += module(f"{ours}.cross_attn.q", f"{layer}.crossattention.attention.query")
            for param in ("weight", "bias"):
                rules.append(fused(f"{ours}.cross_attn.kv.{param}", (f"{layer}.crossattention.attention.key.{param}",
                                                                      f"{layer}.crossattention.attention.value.{param}")))
            rules += module(f"{ours}.cross_attn.out", f"{layer}.crossattention.output.dense")
            rules += module(f"{ours}.norm_cross", f"{layer}.crossattention.output.LayerNorm")
        rules += module(f"{ours}.mlp_query.fc1", f"{layer}.intermediate_query.dense")
        rules += module(f"{ours}.mlp_query.fc2", f"{layer}.output_query.dense")
        rules += module(f"{ours}.norm2_query", f"{layer}.output_query.LayerNorm")
    decoder = llama_format(config, state, prefix="language_model.model.", head="language_model.lm_head.weight")
    rules += decoder.rules
    return Format(ARCHITECTURE, rules, skip=decoder.skip, check_skipped=decoder.check_skipped)


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A `blip2_lm` model from an HF Blip2ForConditionalGeneration folder (Llama LM), with its tokenizer."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, _, weights, state = read_hf_folder(directory, ARCHITECTURE, dtype)
    config = config_from_hf(hf, str(directory / "config.json"))
    model = build_and_load("blip2_lm", config, state, lambda built: blip2_format(built.config, state), str(weights))
    attach_preprocessing(model, directory, image_size=model.config.vision.image_size, context_length=model.config.lm.context_length)
    return model
