"""HF transformers LXMERT folders (`LxmertModel`, `LxmertForQuestionAnswering`), both ways.

One declarative mapping onto the `lxmert` family: BERT embeddings (`lxmert.embeddings.*`), the
visual feature encoder (`lxmert.encoder.visn_fc.{visn_fc, visn_layer_norm, box_fc, box_layer_norm}`),
the language layers (`lxmert.encoder.layer.{i}`, BERT's layout: q, k, v fused into our qkv), the
object-relationship layers (`lxmert.encoder.r_layers.{i}`, the same layout), the cross-modality
layers (`lxmert.encoder.x_layers.{i}`: ONE `visual_attention` module, query/key/value + output
dense + LayerNorm, serves both directions, which is our `CoAttentionBlock(shared_cross=True)`'s
`cross` / `norm_cross`; `lang_self_att` / `visn_self_att`; `lang_inter`/`lang_output` and
`visn_inter`/`visn_output` FFNs), the pooler, and for the QA model `answer_head.logit_fc.{0,2,3}`.

HF's LXMERT takes the region features and normalised boxes directly (`visual_feats`,
`visual_pos`), as the `lxmert` family does, so a loaded model needs no region encoder. A loaded
folder has no pre-training heads (`pretraining_heads` false) and, for the QA model, answers named
`answer_0 ...` (HF's config keeps only `num_qa_labels`); its answer head is the fusion encoders'
`heads.answer` (the same `logit_fc` layout). Export writes `LxmertForQuestionAnswering` when the
model has an answer head, else `LxmertModel`; the pre-training, ITM and reasoning heads and an image
tower, which neither class holds, are left out with a note on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.bert import BERT_BLOCK
from vlmkit.interop.hf_clip import mlp_ratio
from vlmkit.interop.mapping import Format, Rule, block_rules, check_position_ids, fused, module, rename

FORMAT_NAME = "HF transformers LXMERT"
BASE, QA = "LxmertModel", "LxmertForQuestionAnswering"
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# LxmertConfig defaults, for configs that leave keys out.
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2, "l_layers": 9, "x_layers": 5,
            "r_layers": 5, "visual_feat_dim": 2048, "visual_pos_dim": 4, "num_qa_labels": 9500, "pad_token_id": 0}


def is_hf_lxmert(config: dict) -> bool:
    return config.get("model_type") == "lxmert"


def config_from_hf(hf: dict[str, Any], architecture: str, where: str) -> dict[str, Any]:
    """A vlmkit `lxmert` config dict from an HF `LxmertConfig` dict, with the heads `architecture` holds."""
    hf = {**DEFAULTS, **{key: value for key, value in hf.items() if value is not None}}
    if hf["hidden_act"] not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return {
        "vocab_size": hf["vocab_size"], "context_length": hf["max_position_embeddings"],
        "type_vocab_size": hf["type_vocab_size"], "width": hf["hidden_size"], "heads": hf["num_attention_heads"],
        "mlp_ratio": mlp_ratio(hf["hidden_size"], hf["intermediate_size"], where),
        "activation": ACTIVATIONS[hf["hidden_act"]], "norm_eps": 1e-12,  # HF LXMERT hard-codes its LayerNorm eps
        "l_layers": hf["l_layers"], "r_layers": hf["r_layers"], "x_layers": hf["x_layers"],
        "visual_feat_dim": hf["visual_feat_dim"], "visual_pos_dim": hf["visual_pos_dim"],
        "pad_token_id": hf["pad_token_id"] or 0, "pretraining_heads": False, "num_object_labels": 0,
        "answers": [f"answer_{index}" for index in range(hf["num_qa_labels"])] if architecture == QA else [],
    }


def _bert_layers(ours: str, theirs: str, depth: int) -> list[Rule]:
    rules = []
    for index in range(depth):
        rules += block_rules(f"{ours}.{index}", f"{theirs}.{index}", BERT_BLOCK)
    return rules


def _self_attention(ours_attn: str, ours_norm: str, theirs: str) -> list[Rule]:
    """An `LxmertSelfAttentionLayer` (self.{query,key,value}, output.{dense,LayerNorm}) -> our attention + its norm."""
    rules = [fused(f"{ours_attn}.qkv.{param}", tuple(f"{theirs}.self.{part}.{param}" for part in ("query", "key", "value")))
             for param in ("weight", "bias")]
    return rules + module(f"{ours_attn}.out", f"{theirs}.output.dense") + module(ours_norm, f"{theirs}.output.LayerNorm")


def _cross_layer(ours: str, theirs: str) -> list[Rule]:
    """One `LxmertXLayer` -> our `CoAttentionBlock(self_attention=True, shared_cross=True)`."""
    rules = module(f"{ours}.cross.q", f"{theirs}.visual_attention.att.query")
    rules += [fused(f"{ours}.cross.kv.{param}", (f"{theirs}.visual_attention.att.key.{param}",
                                                  f"{theirs}.visual_attention.att.value.{param}"))
              for param in ("weight", "bias")]
    rules += module(f"{ours}.cross.out", f"{theirs}.visual_attention.output.dense")
    rules += module(f"{ours}.norm_cross", f"{theirs}.visual_attention.output.LayerNorm")
    for stream, name in (("a", "lang"), ("b", "visn")):
        rules += _self_attention(f"{ours}.attn_{stream}", f"{ours}.norm1_{stream}", f"{theirs}.{name}_self_att")
        rules += module(f"{ours}.mlp_{stream}.fc1", f"{theirs}.{name}_inter.dense")
        rules += module(f"{ours}.mlp_{stream}.fc2", f"{theirs}.{name}_output.dense")
        rules += module(f"{ours}.norm2_{stream}", f"{theirs}.{name}_output.LayerNorm")
    return rules


def lxmert_format(config, prefix: str = "lxmert.") -> Format:
    """The HF key layout of a vlmkit `lxmert` config (its backbone under `prefix`, plus the QA head when it has one)."""
    p = prefix
    rules = [
        rename("text.token_embedding.weight", f"{p}embeddings.word_embeddings.weight"),
        rename("text.positional_embedding", f"{p}embeddings.position_embeddings.weight"),
        rename("text.type_embedding.weight", f"{p}embeddings.token_type_embeddings.weight"),
        *module("text.embed_norm", f"{p}embeddings.LayerNorm"),
        *module("regions.feat_fc", f"{p}encoder.visn_fc.visn_fc"),
        *module("regions.feat_norm", f"{p}encoder.visn_fc.visn_layer_norm"),
        *module("regions.box_fc", f"{p}encoder.visn_fc.box_fc"),
        *module("regions.box_norm", f"{p}encoder.visn_fc.box_layer_norm"),
        *_bert_layers("text.transformer.blocks", f"{p}encoder.layer", config.l_layers),
        *_bert_layers("relation.blocks", f"{p}encoder.r_layers", config.r_layers),
        *module("pooler.dense", f"{p}pooler.dense"),
    ]
    for index in range(config.x_layers):
        rules += _cross_layer(f"cross.{index}", f"{p}encoder.x_layers.{index}")
    if config.answers:
        rules += [rule for index in (0, 2, 3) for rule in module(f"heads.answer.logit_fc.{index}", f"answer_head.logit_fc.{index}")]
    return Format(FORMAT_NAME, rules, skip=_skip, check_skipped=_check_skipped)


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer that old transformers versions saved"
    return None


def _check_skipped(key: str, tensor: torch.Tensor) -> None:
    check_position_ids(key, tensor)


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A vlmkit `lxmert` model from an HF LxmertModel / LxmertForQuestionAnswering folder, strictly."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, architecture, weights, state = read_hf_folder(directory, (BASE, QA), dtype)
    config = config_from_hf(hf, architecture, str(directory / "config.json"))
    if architecture == BASE and not any(key.startswith("lxmert.") for key in state):
        state = {f"lxmert.{key}": value for key, value in state.items()}  # a bare LxmertModel saves without the prefix
    model = build_and_load("lxmert", config, state, lambda built: lxmert_format(built.config), str(weights))
    attach_preprocessing(model, directory, image_size=None, context_length=config["context_length"])
    return model


# ---- export ------------------------------------------------------------------------------------
def config_to_hf(model) -> dict[str, Any]:
    """The HF `LxmertConfig` dict (config.json) of a vlmkit `lxmert` model."""
    config = model.config
    if config.activation not in TO_HF_ACTIVATION:
        raise UserError(f"activation '{config.activation}' has no HF LXMERT name; save with format='vlmkit'")
    if abs(config.norm_eps - 1e-12) > 1e-15:
        raise UserError(f"HF's LXMERT fixes LayerNorm eps at 1e-12 but this model uses {config.norm_eps}; save with format='vlmkit'")
    return {
        "architectures": [QA if config.answers else BASE], "model_type": "lxmert", "vocab_size": config.vocab_size,
        "hidden_size": config.width, "num_attention_heads": config.heads,
        "intermediate_size": int(config.width * config.mlp_ratio), "hidden_act": TO_HF_ACTIVATION[config.activation],
        "max_position_embeddings": config.context_length, "type_vocab_size": config.type_vocab_size,
        "l_layers": config.l_layers, "x_layers": config.x_layers, "r_layers": config.r_layers,
        "visual_feat_dim": config.visual_feat_dim, "visual_pos_dim": config.visual_pos_dim,
        "num_qa_labels": max(len(config.answers), 1), "pad_token_id": config.pad_token_id,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dtype": "float32",
    }


# What HF's classes have no place for: the pre-training heads and an image tower (HF reads features).
NOT_IN_HF = ("mlm_head.", "heads.itm.", "heads.reasoning.", "region_head.", "visual.")


def export(model, directory: Path) -> None:
    """Write an HF LxmertForQuestionAnswering (with a QA head) or LxmertModel folder."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    hf_config = config_to_hf(model)
    state = model.state_dict()
    left_out = sorted({key.split(".", 1)[0] for key in state if key.startswith(NOT_IN_HF)})
    if left_out:
        print(f"vlmkit: note: HF's {hf_config['architectures'][0]} has no place for this model's pre-training heads "
              f"or image tower ({', '.join(left_out)}); they are left out of the export (HF reads region features, "
              f"which this model's image tower computes: model.visual_features(batch))", file=sys.stderr)
        state = {key: value for key, value in state.items() if not key.startswith(NOT_IN_HF)}
    prefix = "lxmert." if model.heads.answer is not None else ""  # a bare LxmertModel saves its own keys unprefixed
    state = to_theirs(state, lxmert_format(model.config, prefix=prefix))
    write_folder(model, Path(directory), hf_config, state, FORMAT_NAME)
