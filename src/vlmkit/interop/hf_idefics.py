"""HF transformers `IdeficsForVisionText2Text` folders <-> the `flamingo` family, both ways.

IDEFICS is HF's open re-implementation of Flamingo, and its parts map one to one onto vlmkit's:

- `model.vision_model.*` (a CLIP vision transformer; IDEFICS feeds its `last_hidden_state`, [CLS]
  included, to the resampler) -> `visual` (`hf_clip.vision_rules`), `vision_tokens: all`;
- `model.perceiver_resampler.{latents, blocks.i.0 (attention), blocks.i.1 (ReLU MLP), layer_norm}`
  -> `resampler` (k_proj / v_proj fused into our `kv`), `activation: relu`;
- `model.gated_cross_attn_layers.j.{alpha_cross_attn, alpha_dense, cross_attn, mlp, input_layernorm,
  post_attention_layernorm}` -> `gated[str(j * interval)]` (RMSNorm + SwiGLU, applied before decoder
  layer `j * interval`: `cross_attention_offset: 0`); the alphas are our tanh gates;
- `model.layers`, `model.norm`, `lm_head` (Llama) -> `lm` (`hf_lm.llama_format`);
- the decoupled embedding / head (`embed_tokens.additional_embedding`, `lm_head.additional_fc`: the
  two added tokens, always trained) -> `extra_embedding` / `extra_head`. IDEFICS adds
  `<fake_token_around_image>` and `<image>` (in that order): `extra_tokens` records it.

Parity: logits equal HF's within 1e-5 on the same ids, pixels and image attention mask
(tests/interop/test_hf_idefics.py). Refused with a UserError, because vlmkit's Flamingo has no
counterpart: `use_resampler: false` (visual tokens straight from the ViT; Flamingo always resamples),
`qk_layer_norms` / `qk_layer_norms_perceiver` (query/key norms, an IDEFICS addition), `alpha_type:
vector` (per-channel gates; Flamingo's are scalars), an `additional_vocab_size` other than 2, a tied
head, and a layer count that the cross-layer interval does not divide. Prompts: vlmkit writes
Flamingo's layout (`<image>` then text); an IDEFICS checkpoint was trained with its processor's
(`<fake_token_around_image><image><fake_token_around_image>`), which vlmkit's prompt builder does not write.

Export (`model.save_pretrained(dir, format="hf")`, `vlmkit convert SRC DST --to hf`) writes the same
layout through the same rules, reversed (`config_to_hf`, `export`): a loaded IDEFICS folder comes back
bit-identical. It takes a Flamingo only in the shape `config_from_hf` makes; anything else (a non-zero
`cross_attention_offset`, a LayerNorm / GELU cross-attention block, a resampler activation other than
relu or ff_mult other than 4, a vision tower other than a plain CLIP ViT, a GPT-2 style or grouped-query
or biased or tied LM, `vision_tokens: patches`, other `extra_tokens`, cross-attention heads / MLP width /
norm eps other than the LM's) is one UserError before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.mapping import Format, Rule, check_position_ids, fused, module, rename

FORMAT_NAME = "HF transformers IdeficsForVisionText2Text"
ARCHITECTURE = "IdeficsForVisionText2Text"
EXTRA_TOKENS = ("<fake_token_around_image>", "<image>")  # IDEFICS's added tokens, in id order
VISION_DEFAULTS = {"embed_dim": 768, "image_size": 224, "intermediate_size": 5120, "patch_size": 14, "num_hidden_layers": 32,
                   "num_attention_heads": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
PERCEIVER_DEFAULTS = {"resampler_n_latents": 64, "resampler_depth": 6, "resampler_n_heads": 16, "resampler_head_dim": 96,
                      "qk_layer_norms_perceiver": False}
DEFAULTS = {"vocab_size": 32000, "additional_vocab_size": 0, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu", "alpha_type": "float",
            "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
            "cross_layer_interval": 1, "qk_layer_norms": False, "use_resampler": False, "max_position_embeddings": 2048}


def is_hf_idefics(config: dict) -> bool:
    """Whether an HF config.json describes an IDEFICS (1) model."""
    return config.get("model_type") == "idefics"


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit `flamingo` config dict from an HF `IdeficsConfig` dict (config.json)."""
    from vlmkit.interop import hf_clip, hf_lm

    hf = {**DEFAULTS, **hf}
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    perceiver = {**PERCEIVER_DEFAULTS, **(hf.get("perceiver_config") or {})}
    interval, depth = hf["cross_layer_interval"], hf["num_hidden_layers"]
    problems = {
        "no Perceiver Resampler (use_resampler false), which vlmkit's Flamingo always has": not hf["use_resampler"],
        "query/key norms (qk_layer_norms), which Flamingo's cross-attention does not have": bool(hf["qk_layer_norms"]),
        "query/key norms in the resampler (qk_layer_norms_perceiver)": bool(perceiver["qk_layer_norms_perceiver"]),
        f"per-channel gates (alpha_type '{hf['alpha_type']}'); Flamingo's gates are scalars ('float')": hf["alpha_type"] != "float",
        f"{hf['additional_vocab_size']} added tokens; vlmkit's Flamingo has exactly 2": hf["additional_vocab_size"] != 2,
        "a head tied to the embedding (tie_word_embeddings)": bool(hf["tie_word_embeddings"]),
        f"a cross_layer_interval {interval} that does not divide its {depth} layers": not interval or depth % interval != 0,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"{where} has {problem}; vlmkit loads IDEFICS checkpoints without it")
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    lm = hf_lm.config_from_hf({
        "model_type": "llama", "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"], "num_hidden_layers": depth,
        "num_attention_heads": hf["num_attention_heads"], "hidden_act": hf["hidden_act"],
        "max_position_embeddings": hf["max_position_embeddings"], "rms_norm_eps": hf["rms_norm_eps"],
        "bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"], "pad_token_id": hf["pad_token_id"],
        "tie_word_embeddings": False, "rope_theta": rope,
    }, f"{where} (text side)")["lm"]
    clip_vision = {"hidden_size": vision["embed_dim"], **{key: vision[key] for key in VISION_DEFAULTS if key != "embed_dim"}}
    return {
        "vision": hf_clip.vision_config_from_hf(clip_vision, f"{where} vision_config"),
        "lm": lm,
        "resampler": {"depth": perceiver["resampler_depth"], "heads": perceiver["resampler_n_heads"],
                      "head_dim": perceiver["resampler_head_dim"], "num_latents": perceiver["resampler_n_latents"],
                      "ff_mult": 4, "activation": "relu"},
        "cross_attention_every": interval,
        "cross_attention_offset": 0,
        "cross_attention_heads": hf["num_attention_heads"],
        "cross_attention_mlp_hidden": hf["intermediate_size"],
        "cross_attention_norm": "rmsnorm",
        "cross_attention_activation": lm["activation"],
        "cross_attention_gated_mlp": True,
        "cross_attention_norm_eps": float(hf["rms_norm_eps"]),
        "vision_tokens": "all",
        "extra_tokens": list(EXTRA_TOKENS),
    }


def idefics_format(config, state: dict[str, torch.Tensor] | None = None) -> Format:
    """The IdeficsForVisionText2Text key layout of a `flamingo` config made by `config_from_hf`."""
    from vlmkit.interop.hf_clip import vision_rules
    from vlmkit.interop.hf_lm import llama_format

    decoder = llama_format(config, state, prefix="model.", head="lm_head.weight")
    rules: list[Rule] = vision_rules(config.vision, "visual", "model.vision_model") + decoder.rules
    rules += [rename("extra_embedding.weight", "model.embed_tokens.additional_embedding.weight"),
              rename("extra_head.weight", "lm_head.additional_fc.weight")]
    perceiver = "model.perceiver_resampler"
    rules += [rename("resampler.latents", f"{perceiver}.latents"), *module("resampler.norm", f"{perceiver}.layer_norm")]
    for index in range(config.resampler.depth):
        ours, attn, mlp = f"resampler.layers.{index}", f"{perceiver}.blocks.{index}.0", f"{perceiver}.blocks.{index}.1"
        rules += [*module(f"{ours}.attn.norm_media", f"{attn}.context_layer_norm"),
                  *module(f"{ours}.attn.norm_latents", f"{attn}.latents_layer_norm"),
                  rename(f"{ours}.attn.q.weight", f"{attn}.q_proj.weight"),
                  fused(f"{ours}.attn.kv.weight", (f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")),
                  rename(f"{ours}.attn.out.weight", f"{attn}.output_proj.weight"),
                  *module(f"{ours}.ff.norm", f"{mlp}.ln"),
                  rename(f"{ours}.ff.fc1.weight", f"{mlp}.fc.weight"), rename(f"{ours}.ff.fc2.weight", f"{mlp}.c_proj.weight")]
    for number, layer in enumerate(config.cross_attention_layers):
        ours, theirs = f"gated.{layer}", f"model.gated_cross_attn_layers.{number}"
        rules += [rename(f"{ours}.attn_gate", f"{theirs}.alpha_cross_attn"), rename(f"{ours}.ff_gate", f"{theirs}.alpha_dense"),
                  rename(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
                  rename(f"{ours}.ff_norm.weight", f"{theirs}.post_attention_layernorm.weight"),
                  rename(f"{ours}.attn.q.weight", f"{theirs}.cross_attn.q_proj.weight"),
                  fused(f"{ours}.attn.kv.weight", (f"{theirs}.cross_attn.k_proj.weight", f"{theirs}.cross_attn.v_proj.weight")),
                  rename(f"{ours}.attn.out.weight", f"{theirs}.cross_attn.o_proj.weight"),
                  fused(f"{ours}.ff.fc1.weight", (f"{theirs}.mlp.gate_proj.weight", f"{theirs}.mlp.up_proj.weight")),
                  rename(f"{ours}.ff.fc2.weight", f"{theirs}.mlp.down_proj.weight")]

    def skip(key: str) -> str | None:
        if key.endswith("position_ids"):
            return "a constant arange buffer that old transformers versions saved"
        if key.endswith("rotary_emb.inv_freq"):
            return "rotary frequencies, recomputed"
        return decoder.skip(key)

    def check(key: str, tensor: torch.Tensor) -> None:
        if key.endswith("position_ids"):
            check_position_ids(key, tensor)
        elif key.startswith("model.layers."):
            decoder.check_skipped(key, tensor)

    return Format(FORMAT_NAME, rules, skip=skip, check_skipped=check)


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A `flamingo` family model from an HF IdeficsForVisionText2Text folder (with its tokenizer and
    image transform when the folder has them)."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, _, weights, state = read_hf_folder(directory, ARCHITECTURE, dtype)
    config = config_from_hf(hf, str(directory / "config.json"))
    model = build_and_load("flamingo", config, state, lambda built: idefics_format(built.config, state), str(weights))
    attach_preprocessing(model, directory, image_size=model.config.vision.image_size, context_length=model.config.lm.context_length)
    return model


# ---- export ------------------------------------------------------------------------------------
def config_to_hf(model) -> dict[str, Any]:
    """The HF `IdeficsConfig` dict (config.json) of a vlmkit `flamingo` model, or a one-line UserError
    naming the first setting IDEFICS cannot express (everything `config_from_hf` fixes must hold)."""
    from vlmkit.interop.hf_clip import TO_HF_ACTIVATION, vision_export_problem
    from vlmkit.interop.hf_lm import llama_needs

    config = model.config
    vision, lm, resampler = config.vision, config.lm, config.resampler
    vision_problem = vision_export_problem(vision)
    not_llama = [need for need, holds in llama_needs(lm).items() if not holds]
    problems = {
        f"an image tower with {vision_problem} (IDEFICS's is a plain CLIP ViT)": vision_problem is not None,
        f"a {'GPT-2 style' if lm.positions == 'learned' else 'non-Llama'} language model without "
        f"{', '.join(not_llama)} (IDEFICS's is Llama: rotary positions, RMSNorm, SwiGLU, silu)": bool(not_llama),
        f"grouped-query attention ({lm.num_kv_heads} key/value heads for {lm.heads})": lm.num_kv_heads != lm.heads,
        "biases in the language model": lm.bias,
        "a head tied to the embedding (tie_embeddings)": lm.tie_embeddings,
        f"cross_attention_offset {config.cross_attention_offset} (IDEFICS puts a gated block before layers 0, N, 2N: "
        f"offset 0)": config.cross_attention_offset != 0,
        f"{lm.depth} LM layers, which cross_attention_every {config.cross_attention_every} does not divide":
        lm.depth % config.cross_attention_every != 0,
        f"a cross-attention block with {config.cross_attention_norm} and a {'gated' if config.cross_attention_gated_mlp else 'plain'} "
        f"MLP (IDEFICS's is RMSNorm + SwiGLU)":
        config.cross_attention_norm != "rmsnorm" or not config.cross_attention_gated_mlp,
        f"cross-attention activation '{config.cross_attention_activation}' (IDEFICS uses the LM's, '{lm.activation}')":
        config.cross_attention_activation != lm.activation,
        f"{config.cross_attention_heads} cross-attention heads (IDEFICS uses the LM's {lm.heads})":
        config.cross_attention_heads != lm.heads,
        f"a cross-attention MLP of {config.cross_attention_mlp_hidden or 4 * lm.width} (IDEFICS uses the LM's "
        f"intermediate_size {lm.hidden})": (config.cross_attention_mlp_hidden or 4 * lm.width) != lm.hidden,
        f"cross-attention norm eps {config.cross_attention_norm_eps} (IDEFICS uses the LM's rms_norm_eps {lm.norm_eps})":
        config.cross_attention_norm_eps != lm.norm_eps,
        f"resampler activation '{resampler.activation}' (IDEFICS's is relu)": resampler.activation != "relu",
        f"resampler ff_mult {resampler.ff_mult} (IDEFICS's is 4)": resampler.ff_mult != 4,
        f"vision_tokens '{config.vision_tokens}' (IDEFICS resamples all ViT tokens, [CLS] included: 'all')":
        config.vision_tokens != "all",
        f"extra_tokens {list(config.extra_tokens)} (IDEFICS's added tokens are {list(EXTRA_TOKENS)}, in that order)":
        tuple(config.extra_tokens) != EXTRA_TOKENS,
    }
    for problem, present in problems.items():
        if present:
            raise UserError(f"this Flamingo model has {problem}, which vlmkit cannot write as {ARCHITECTURE}; "
                            f"save it with format='vlmkit'")
    return {
        "architectures": [ARCHITECTURE], "model_type": "idefics", "dtype": "float32",
        "vocab_size": lm.vocab_size, "additional_vocab_size": 2, "hidden_size": lm.width,
        "intermediate_size": lm.hidden, "num_hidden_layers": lm.depth, "num_attention_heads": lm.heads,
        "hidden_act": lm.activation, "max_position_embeddings": lm.context_length, "rms_norm_eps": lm.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta}, "dropout": lm.dropout,
        "bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id, "pad_token_id": lm.pad_token_id,
        "tie_word_embeddings": False, "alpha_type": "float", "cross_layer_interval": config.cross_attention_every,
        "qk_layer_norms": False, "use_resampler": True,
        "vision_config": {
            "model_type": "idefics_vision", "embed_dim": vision.width, "image_size": vision.image_size,
            "patch_size": vision.patch_size, "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads, "num_channels": 3,
            "hidden_act": TO_HF_ACTIVATION[vision.activation], "layer_norm_eps": vision.norm_eps, "attention_dropout": 0.0,
        },
        "perceiver_config": {
            "model_type": "idefics_perciever", "use_resampler": True,  # (sic) HF's spelling
            "resampler_n_latents": resampler.num_latents, "resampler_depth": resampler.depth,
            "resampler_n_heads": resampler.heads, "resampler_head_dim": resampler.head_dim,
            "qk_layer_norms_perceiver": False,
        },
    }


def export(model, directory: Path) -> None:
    """Write an HF IdeficsForVisionText2Text folder: config.json, model.safetensors, tokenizer, preprocessor.

    Every check runs before anything is written, and config.json is written last (`write_folder`)."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    hf_config = config_to_hf(model)
    state = to_theirs(model.state_dict(), idefics_format(model.config))
    write_folder(model, Path(directory), hf_config, state, FORMAT_NAME)
