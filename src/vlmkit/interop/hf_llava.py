"""HF transformers `LlavaForConditionalGeneration` folders <-> the `llava` family, both ways.

A folder holds `config.json` (model_type "llava", a Llama `text_config` and a CLIP
`vision_config`), `model.safetensors` (or sharded, or `pytorch_model.bin`), `tokenizer.json` with
the `<image>` token at `image_token_index`, and usually `preprocessor_config.json`. The keys come
in three layouts, all read strictly (every tensor used, every rule satisfied):

- the hub layout (llava-hf/*, transformers 4 and `convert_llava_weights_to_hf.py`):
  `vision_tower.vision_model.*`, `multi_modal_projector.linear_1/2.*`, `language_model.model.*`,
  `language_model.lm_head.weight`;
- what transformers 5 writes with `save_pretrained`: the same, but `vision_tower.*` without the
  CLIP vision model's own `vision_model.` prefix;
- transformers 5's in-memory names (a `state_dict()` saved as it is): `model.vision_tower.*`,
  `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`.

The layout is read off the keys; the rules themselves are `hf_clip.vision_rules` (the tower) and
`hf_lm.llama_format` (the LM) at that layout's prefixes. Export writes the hub layout, which
transformers 4 and 5 both load.

Settings vlmkit's LLaVA does not implement are one UserError each: a list of feature layers
(concatenated features), a text model other than Llama, a vision tower other than CLIP's, a
projector activation other than "gelu" (vlmkit's `mlp2x_gelu`).

Prompts differ in one way: HF's processor writes each `<image>` as `image_seq_length` copies into
the text, while vlmkit's LLaVA tokenizes one placeholder per image and expands it itself (the
collate, `Llava.chat`/`answer`/`generate`); `Llava.embed_with_images` reads either once expanded.
The conversation template is not part of an HF folder: a loaded model speaks `vicuna_v1` (LLaVA-1.5's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.mapping import Format, check_position_ids, module

FORMAT_NAME = "HF transformers LlavaForConditionalGeneration"
ARCHITECTURE = "LlavaForConditionalGeneration"
# LlavaConfig defaults, for configs that leave keys out.
LLAVA_DEFAULTS = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_select_strategy": "default",
                  "vision_feature_layer": -2, "multimodal_projector_bias": True}
IMAGE_TOKEN = "<image>"


def is_hf_llava(config: dict) -> bool:
    """Whether an HF config.json describes a LLaVA (1.5-style) model."""
    return config.get("model_type") == "llava"


# ---- config ------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit `llava` config dict from an HF `LlavaConfig` dict (config.json)."""
    from vlmkit.interop import hf_clip, hf_lm

    hf = {**LLAVA_DEFAULTS, **hf}
    text = dict(hf.get("text_config") or {"model_type": "llama"})
    vision = dict(hf.get("vision_config") or {"model_type": "clip_vision_model"})
    text_type, vision_type = text.get("model_type", "llama"), vision.get("model_type", "clip_vision_model")
    layer = hf["vision_feature_layer"]
    act = hf["projector_hidden_act"]
    if text_type != "llama":
        raise UserError(f"{where}: text_config is a '{text_type}' model; vlmkit's LLaVA loads Llama language models only")
    if vision_type != "clip_vision_model":
        raise UserError(f"{where}: vision_config is a '{vision_type}' tower; vlmkit's LLaVA loads CLIP vision towers only")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise UserError(f"{where}: vision_feature_layer {layer!r} concatenates several layers; vlmkit's LLaVA takes one integer layer")
    if act != "gelu":
        raise UserError(f"{where}: projector_hidden_act '{act}' is not supported; vlmkit's LLaVA projector is Linear-GELU-Linear ('gelu')")
    lm = hf_lm.config_from_hf({**text, "model_type": "llama"}, f"{where} text_config")["lm"]
    # transformers 5 keeps the deciding tie_word_embeddings at the top (copied from the text config when unset).
    lm["tie_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    image_token_id = hf.get("image_token_id", hf["image_token_index"])
    if not isinstance(image_token_id, int) or not 0 <= image_token_id < lm["vocab_size"]:
        raise UserError(f"{where}: image_token_index {image_token_id!r} is outside the text model's vocabulary of {lm['vocab_size']}")
    return {
        "vision": hf_clip.vision_config_from_hf(vision, f"{where} vision_config"),
        "lm": lm,
        "projector": "mlp2x_gelu",
        "projector_bias": bool(hf["multimodal_projector_bias"]),
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": hf["vision_feature_select_strategy"],
        "image_token": IMAGE_TOKEN,
        "image_token_id": image_token_id,
    }


def config_to_hf(config) -> dict[str, Any]:
    """The HF `LlavaConfig` dict (config.json) of a vlmkit `llava` config (check `check_exportable` first)."""
    from vlmkit.interop import hf_clip, hf_lm

    text = {key: value for key, value in hf_lm.config_to_hf(config).items() if key not in ("architectures", "dtype")}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llava",
        "image_token_index": config.image_token_id,
        "image_seq_length": config.num_image_tokens,  # what HF's processor expands each <image> to
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "tie_word_embeddings": config.lm.tie_embeddings,
        "dtype": "float32",
        "text_config": text,
        # A CLIPVisionModel has no projection; projection_dim is only CLIPVisionConfig's bookkeeping.
        "vision_config": hf_clip.vision_config_to_hf(config.vision, config.lm.width),
    }


# ---- key layouts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where one layout keeps the vision tower, the projector, the decoder and the untied head."""

    name: str
    vision: str
    projector: str
    decoder: str
    head: str


HUB = Layout("hub (vision_tower.vision_model.*, language_model.model.*)", "vision_tower.vision_model",
             "multi_modal_projector", "language_model.model.", "language_model.lm_head.weight")
LAYOUTS = (
    HUB,
    Layout("transformers 5 save_pretrained (vision_tower.*, language_model.model.*)", "vision_tower",
           "multi_modal_projector", "language_model.model.", "language_model.lm_head.weight"),
    Layout("transformers 5 in-memory (model.vision_tower.*, model.language_model.*)", "model.vision_tower",
           "model.multi_modal_projector", "model.language_model.", "lm_head.weight"),
    Layout("transformers 4 in-memory (model.vision_tower.vision_model.*, model.language_model.*)",
           "model.vision_tower.vision_model", "model.multi_modal_projector", "model.language_model.", "lm_head.weight"),
)


def detect_layout(state: dict[str, torch.Tensor]) -> Layout:
    """The layout whose vision tower and decoder keys the state dict has (the hub layout when none
    fits, so the strict error lists the hub keys that are missing)."""
    for layout in LAYOUTS:
        if f"{layout.vision}.embeddings.patch_embedding.weight" in state and f"{layout.decoder}embed_tokens.weight" in state:
            return layout
    return HUB


def llava_format(config, state: dict[str, torch.Tensor] | None = None, layout: Layout = HUB) -> Format:
    """The LlavaForConditionalGeneration key layout of a `llava` config: CLIP tower + projector + Llama."""
    from vlmkit.interop.hf_clip import vision_rules
    from vlmkit.interop.hf_lm import llama_format

    decoder = llama_format(config, state, prefix=layout.decoder, head=layout.head)
    rules = vision_rules(config.vision, "visual", layout.vision)
    names = ("weight", "bias") if config.projector_bias else ("weight",)
    rules += module("projector.linear_1", f"{layout.projector}.linear_1", names)
    rules += module("projector.linear_2", f"{layout.projector}.linear_2", names)
    rules += decoder.rules

    def skip(key: str) -> str | None:
        if key.startswith(layout.vision) and key.endswith("position_ids"):
            return "a constant arange buffer that old transformers versions saved"
        return decoder.skip(key)

    def check(key: str, tensor: torch.Tensor) -> None:
        if key.startswith(layout.vision) and key.endswith("position_ids"):
            check_position_ids(key, tensor)
        else:
            decoder.check_skipped(key, tensor)

    return Format(f"{ARCHITECTURE}, {layout.name} layout", rules, skip=skip, check_skipped=check)


# ---- loading -------------------------------------------------------------------------------------
def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A `llava` family model from an HF LlavaForConditionalGeneration folder, with its tokenizer
    (which must hold `<image>` at the config's image_token_index) and image transform."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, _, weights, state = read_hf_folder(directory, ARCHITECTURE, dtype)
    config = config_from_hf(hf, str(directory / "config.json"))
    layout = detect_layout(state)
    model = build_and_load("llava", config, state, lambda built: llava_format(built.config, state, layout), str(weights))
    lm = model.config.lm
    attach_preprocessing(model, directory, image_size=model.config.vision.image_size, context_length=lm.context_length)
    tokenizer = model.tokenizer
    if tokenizer is not None:
        found = tokenizer.token_to_id(IMAGE_TOKEN)
        if found != model.config.image_token_id:
            raise UserError(f"{directory}'s tokenizer has {IMAGE_TOKEN} at id {found}, but config.json's image_token_index is "
                            f"{model.config.image_token_id}; give the tokenizer the checkpoint was trained with")
        # A tokenizer.json without a tokenizer_config names no specials: take the model's.
        tokenizer.bos_id = lm.bos_token_id if tokenizer.bos_id is None else tokenizer.bos_id
        tokenizer.eos_id = lm.eos_token_id if tokenizer.eos_id is None else tokenizer.eos_id
    return model


# ---- export --------------------------------------------------------------------------------------
def check_exportable(model) -> None:
    """Raise a UserError naming the first feature HF's LlavaForConditionalGeneration cannot hold."""
    from vlmkit.interop.hf_clip import vision_export_problem
    from vlmkit.interop.hf_lm import hf_style

    config = model.config
    problem = vision_export_problem(config.vision)
    if problem is None and config.projector != "mlp2x_gelu":
        problem = f"a '{config.projector}' projector (HF's has two linear layers: mlp2x_gelu)"
    if problem is None and config.lora is not None:
        problem = "LoRA adapters (export the adapter folder with PEFT, or merge them first)"
    if problem is None and hf_style(config.lm) != "llama":
        problem = "a GPT-2 style language model (vlmkit writes Llava with a Llama text model)"
    if problem is None and config.image_token_id is None:
        problem = "no image_token_id"
    if problem is not None:
        raise UserError(f"this LLaVA model has {problem}, which vlmkit cannot write as {ARCHITECTURE}; save it with format='vlmkit'")


def export(model, directory: Path) -> None:
    """Write an HF LlavaForConditionalGeneration folder (hub layout): config.json, model.safetensors, tokenizer, preprocessor."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    check_exportable(model)
    state = to_theirs(model.state_dict(), llava_format(model.config))
    write_folder(model, directory, config_to_hf(model.config), state, ARCHITECTURE)
