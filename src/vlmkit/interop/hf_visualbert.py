"""HF transformers VisualBERT folders (`VisualBertModel`, `VisualBertForPreTraining`,
`VisualBertForQuestionAnswering`) <-> vlmkit's `visualbert` family.

HF VisualBERT has no image tower: it reads `visual_embeds` (detector features). A loaded model is a
`visualbert` with `vision: null` and `visual_dim` = HF's `visual_embedding_dim`, which
`forward_features(tokens, visual_embeds, visual_mask)` runs exactly as HF's forward (outputs within
1e-5, tests/interop/test_hf_visualbert.py). Keys, one to one (`visual_bert.` prefix in the head models):
- embeddings.{word,position,token_type}_embeddings, LayerNorm -> bert.{token_embedding,
  positional_embedding, type_embedding, embed_norm}; visual_{token_type,position}_embeddings,
  visual_projection -> visual_{type,position}_embedding, visual_projection;
- encoder.layer.{i} (BERT blocks) -> bert.transformer.blocks.{i}; pooler.dense -> pooler;
- cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias -> mlm_head.{dense,norm}, mlm_bias
  (the decoder is tied to the word embeddings; its weight and bias are checked to be those);
- cls.seq_relationship -> heads.itm with its two rows swapped (HF: 0 = match, vlmkit: 1 = match);
- VisualBertForQuestionAnswering's cls -> heads.answer (one Linear, `answer_head: linear`) read at
  the last text token before [SEP] (`answer_pool: last_text`), the answers from `id2label`.
vlmkit heads HF has no place for (the reasoning head, the region heads, and the heads a
VisualBertModel file lacks) keep their fresh initialisation, named in a note on stderr. Export
writes VisualBertForQuestionAnswering when the model has that head, else VisualBertForPreTraining;
a model with an image tower cannot be written (HF VisualBERT has none).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlmkit.errors import UserError
from vlmkit.interop.bert import ACTIVATIONS, BERT_BLOCK, TO_HF_ACTIVATION
from vlmkit.interop.files import cast_floats, find_hf_weights, read_json, read_weights
from vlmkit.interop.hf_clip import mlp_ratio
from vlmkit.interop.mapping import Format, Rule, block_rules, check_position_ids, count_layers, module, rename, to_ours, to_theirs

FORMAT_NAME = "HF transformers VisualBERT"
MODEL_TYPE = "visual_bert"
QA = "VisualBertForQuestionAnswering"
PRETRAINING = "VisualBertForPreTraining"


def is_hf_visualbert(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def _swap_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flip(0).contiguous()  # [match, no match] <-> [no match, match]


def _rules(depth: int, prefix: str, mlm: bool, itm: bool, qa: bool) -> list[Rule]:
    rules = [
        rename("bert.token_embedding.weight", f"{prefix}embeddings.word_embeddings.weight"),
        rename("bert.positional_embedding", f"{prefix}embeddings.position_embeddings.weight"),
        rename("bert.type_embedding.weight", f"{prefix}embeddings.token_type_embeddings.weight"),
        *module("bert.embed_norm", f"{prefix}embeddings.LayerNorm"),
        rename("visual_type_embedding.weight", f"{prefix}embeddings.visual_token_type_embeddings.weight"),
        rename("visual_position_embedding.weight", f"{prefix}embeddings.visual_position_embeddings.weight"),
        *module("visual_projection", f"{prefix}embeddings.visual_projection"),
        *module("pooler", f"{prefix}pooler.dense"),
    ]
    for index in range(depth):
        rules += block_rules(f"bert.transformer.blocks.{index}", f"{prefix}encoder.layer.{index}", BERT_BLOCK)
    if mlm:
        rules += module("mlm_head.dense", "cls.predictions.transform.dense")
        rules += module("mlm_head.norm", "cls.predictions.transform.LayerNorm")
        rules.append(rename("mlm_bias", "cls.predictions.bias"))
    if itm:
        rules += [Rule(f"heads.itm.{name}", (f"cls.seq_relationship.{name}",), join=_swap_rows,
                       split=lambda t: (_swap_rows(t),)) for name in ("weight", "bias")]
    if qa:
        rules += module("heads.answer.logit_fc.0", "cls")
    return rules


def config_from_hf(hf: dict, qa: bool, where: str) -> dict:
    """A vlmkit `visualbert` config dict from an HF VisualBertConfig dict."""
    if hf.get("bypass_transformer"):
        raise UserError(f"{where}: bypass_transformer=true is not supported; only the plain single stream")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act '{act}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    width = hf.get("hidden_size", 768)
    answers: list[str] = []
    if qa:
        labels = hf.get("id2label") or {}
        count = hf.get("num_labels", len(labels) or 2)
        answers = [str(labels.get(str(i), labels.get(i, f"LABEL_{i}"))) for i in range(count)]
    return {
        "vision": None, "geometry": False, "visual_dim": hf.get("visual_embedding_dim", 512),
        "text": {"vocab_size": hf.get("vocab_size", 30522), "context_length": hf.get("max_position_embeddings", 512),
                 "width": width, "depth": hf.get("num_hidden_layers", 12), "heads": hf.get("num_attention_heads", 12),
                 "mlp_ratio": mlp_ratio(width, hf.get("intermediate_size", 3072), where), "activation": ACTIVATIONS[act],
                 "causal": False, "pool": "cls", "eos_token_id": None, "pad_token_id": hf.get("pad_token_id") or 0,
                 "prenorm": False, "embed_norm": True, "type_vocab_size": hf.get("type_vocab_size", 2),
                 "norm_eps": float(hf.get("layer_norm_eps", 1e-12))},
        "answers": answers, "answer_head": "linear", "answer_pool": "last_text" if qa else "pooler",
    }


def load(directory: Path, dtype: torch.dtype | None = None):
    """A vlmkit `visualbert` (no image tower) from an HF VisualBERT folder, in eval mode, tokenizer attached."""
    from vlmkit.interop.common import attach_preprocessing
    from vlmkit.io import load_state_dict_strict
    from vlmkit.models.registry import get_family

    config_file = directory / "config.json"
    hf = read_json(config_file)
    weights = find_hf_weights(directory)
    state = cast_floats(read_weights(weights), dtype)
    prefix = "visual_bert." if any(key.startswith("visual_bert.") for key in state) else ""
    qa, mlm = "cls.weight" in state, "cls.predictions.bias" in state
    itm = "cls.seq_relationship.weight" in state
    config = config_from_hf(hf, qa, str(config_file))
    model = get_family("visualbert").from_config_dict(config)  # random init: heads the file lacks keep it
    depth = count_layers(state, f"{prefix}encoder.layer.")
    if depth != config["text"]["depth"]:
        raise UserError(f"{weights} holds {depth} encoder layers but {config_file} says num_hidden_layers="
                        f"{config['text']['depth']}; the folder is inconsistent")
    fmt = Format(FORMAT_NAME, _rules(depth, prefix, mlm, itm, qa), skip=_skip, check_skipped=_check_skipped(state, prefix))
    converted = to_ours(state, fmt, model.state_dict(), str(weights))
    fresh = sorted(key for key in model.state_dict() if key not in converted)
    load_state_dict_strict(model, {**model.state_dict(), **converted}, str(weights), FORMAT_NAME)
    heads = _module_names(fresh)
    print(f"vlmkit: note: {weights.name} has no weights for {', '.join(heads)} (vlmkit heads HF VisualBERT lacks); "
          f"they keep a fresh initialisation", file=sys.stderr)
    attach_preprocessing(model, directory, image_size=None)
    return model.eval()


def _module_names(keys) -> list[str]:
    """The modules `keys` belong to, for a note ("heads.reasoning", "mlm_head", "mask_feature")."""
    return sorted({".".join(key.split(".")[:2]) if key.startswith("heads.") else key.split(".")[0] for key in keys})


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer"
    if key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        return "the MLM decoder, tied to the word embeddings and the prediction bias"
    return None


def _check_skipped(state: dict, prefix: str):
    def check(key: str, tensor: torch.Tensor) -> None:
        if key.endswith("position_ids"):
            check_position_ids(key, tensor)
        tied = {"cls.predictions.decoder.weight": f"{prefix}embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}.get(key)
        if tied is not None and tied in state and not torch.equal(tensor, state[tied]):
            raise UserError(f"{key} differs from {tied}; vlmkit's VisualBERT ties the MLM decoder to them, as HF does")
    return check


def export(model, directory: Path) -> None:
    """Write VisualBertForQuestionAnswering (a linear answer head at the last text token) or
    VisualBertForPreTraining; vlmkit-only heads are left out with a note."""
    from vlmkit.interop.common import write_folder

    config = model.config
    if config.vision is not None:
        raise UserError("HF VisualBERT has no image tower (it reads detector features), so this visualbert with a "
                        "backbone cannot be written as HF; save it with format='vlmkit'")
    text = config.text
    if text.activation not in TO_HF_ACTIVATION:
        raise UserError(f"activation '{text.activation}' has no HF name; save with format='vlmkit'")
    qa = config.answer_head == "linear" and config.answer_pool == "last_text" and bool(config.answers)
    fmt = Format(FORMAT_NAME, _rules(text.depth, "visual_bert.", mlm=not qa, itm=not qa, qa=qa))
    covered = {rule.ours for rule in fmt.rules}
    state = model.state_dict()
    left_out = _module_names([key for key in state if key not in covered])
    state = to_theirs({key: value for key, value in state.items() if key in covered}, fmt)
    if not qa:
        state["cls.predictions.decoder.weight"] = state["visual_bert.embeddings.word_embeddings.weight"].clone()
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    hf = {
        "architectures": [QA if qa else PRETRAINING], "model_type": MODEL_TYPE, "vocab_size": text.vocab_size,
        "hidden_size": text.width, "visual_embedding_dim": config.embeds_dim, "num_hidden_layers": text.depth,
        "num_attention_heads": text.heads, "intermediate_size": int(round(text.width * text.mlp_ratio)),
        "hidden_act": TO_HF_ACTIVATION[text.activation], "max_position_embeddings": text.context_length,
        "type_vocab_size": text.type_vocab_size, "layer_norm_eps": text.norm_eps, "pad_token_id": text.pad_token_id,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "bypass_transformer": False,
        "special_visual_initialize": True, "tie_word_embeddings": True, "dtype": "float32",
    }
    if qa:
        hf["id2label"] = {str(i): answer for i, answer in enumerate(config.answers)}
        hf["label2id"] = {answer: i for i, answer in enumerate(config.answers)}
    if left_out:
        print(f"vlmkit: note: HF VisualBERT has no place for {', '.join(left_out)}; left out", file=sys.stderr)
    write_folder(model, directory, hf, state, FORMAT_NAME)
