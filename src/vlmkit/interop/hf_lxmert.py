"""HF transformers LXMERT folders (`LxmertModel`, `LxmertForQuestionAnswering`, `LxmertForPreTraining`), both ways.

One declarative mapping onto the `lxmert` family: BERT embeddings (`lxmert.embeddings.*`), the
visual feature encoder (`lxmert.encoder.visn_fc.{visn_fc, visn_layer_norm, box_fc, box_layer_norm}`),
the language layers (`lxmert.encoder.layer.{i}`, BERT's layout: q, k, v fused into our qkv), the
object-relationship layers (`lxmert.encoder.r_layers.{i}`, the same layout), the cross-modality
layers (`lxmert.encoder.x_layers.{i}`: ONE `visual_attention` module, query/key/value + output
dense + LayerNorm, serves both directions, which is our `CoAttentionBlock(shared_cross=True)`'s
`cross` / `norm_cross`; `lang_self_att` / `visn_self_att`; `lang_inter`/`lang_output` and
`visn_inter`/`visn_output` FFNs), the pooler, and for the QA model `answer_head.logit_fc.{0,2,3}`.
`LxmertForPreTraining` adds its heads, each onto the family's own:
- `cls.predictions.{transform.dense, transform.LayerNorm, bias}` -> `mlm_head.{dense, norm, bias}`; the
  decoder is tied to the word embeddings in both (a file that holds a different decoder is refused);
- `cls.seq_relationship` -> `heads.itm` as is (both: 1 = match, LXMERT's `matched_label`);
- `obj_predict_head.{transform.dense, transform.LayerNorm}` -> `region_head.{dense, norm}` and
  `obj_predict_head.decoder_dict.{feat, obj, attr}` -> `region_head.decoders.{feat, obj, attr}`, per
  `visual_losses` (`visual_obj_loss` / `visual_attr_loss` off: `num_object_labels` / `num_attr_labels`
  0, no such decoder); a file without the feature decoder or the whole head (`visual_feat_loss` or
  `task_obj_predict` false) is refused, since the family's pre-training always regresses features;
- `answer_head.logit_fc.{0,2,3}` (`task_qa`) -> `heads.answer`, as for the QA model.
Such a model has no reasoning head (`reasoning_head` false). HF's `visual_loss_normalizer` and
`task_*` switches are training settings, not weights; vlmkit's `training` section has its own.

HF's LXMERT takes the region features and normalised boxes directly (`visual_feats`,
`visual_pos`), as the `lxmert` family does, so a loaded model needs no region encoder. A loaded
LxmertModel / LxmertForQuestionAnswering has no pre-training heads (`pretraining_heads` false); a
QA (or `task_qa`) folder's answers are named `answer_0 ...` (HF's config keeps only `num_qa_labels`).
Export writes `LxmertForPreTraining` when the model has pre-training heads (with `answer_head` when it
has an answer head), else `LxmertForQuestionAnswering` with an answer head, else `LxmertModel`; the
reasoning head and an image tower, which no HF class holds, are left out with a note on stderr.
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
BASE, QA, PRETRAINING = "LxmertModel", "LxmertForQuestionAnswering", "LxmertForPreTraining"
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}
# LxmertConfig defaults, for configs that leave keys out.
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
            "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2, "l_layers": 9, "x_layers": 5,
            "r_layers": 5, "visual_feat_dim": 2048, "visual_pos_dim": 4, "num_qa_labels": 9500, "pad_token_id": 0,
            "num_object_labels": 1600, "num_attr_labels": 400, "task_obj_predict": True, "task_qa": True,
            "visual_obj_loss": True, "visual_attr_loss": True, "visual_feat_loss": True, "tie_word_embeddings": True}
TIED_DECODER = "cls.predictions.decoder.weight"


def is_hf_lxmert(config: dict) -> bool:
    return config.get("model_type") == "lxmert"


def config_from_hf(hf: dict[str, Any], architecture: str, where: str) -> dict[str, Any]:
    """A vlmkit `lxmert` config dict from an HF `LxmertConfig` dict, with the heads `architecture` holds."""
    hf = {**DEFAULTS, **{key: value for key, value in hf.items() if value is not None}}
    if hf["hidden_act"] not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    pretraining = architecture == PRETRAINING
    if pretraining and not (hf["task_obj_predict"] and hf["visual_feat_loss"]):
        flag = "task_obj_predict" if not hf["task_obj_predict"] else "visual_feat_loss"
        raise UserError(f"{where}: {flag} is false, so this LxmertForPreTraining has no feature-regression head "
                        f"(obj_predict_head.decoder_dict.feat), which vlmkit's lxmert pre-training always carries")
    has_answers = architecture == QA or (pretraining and hf["task_qa"])
    return {
        "vocab_size": hf["vocab_size"], "context_length": hf["max_position_embeddings"],
        "type_vocab_size": hf["type_vocab_size"], "width": hf["hidden_size"], "heads": hf["num_attention_heads"],
        "mlp_ratio": mlp_ratio(hf["hidden_size"], hf["intermediate_size"], where),
        "activation": ACTIVATIONS[hf["hidden_act"]], "norm_eps": 1e-12,  # HF LXMERT hard-codes its LayerNorm eps
        "l_layers": hf["l_layers"], "r_layers": hf["r_layers"], "x_layers": hf["x_layers"],
        "visual_feat_dim": hf["visual_feat_dim"], "visual_pos_dim": hf["visual_pos_dim"],
        "pad_token_id": hf["pad_token_id"] or 0, "pretraining_heads": pretraining, "reasoning_head": False,
        "num_object_labels": hf["num_object_labels"] if pretraining and hf["visual_obj_loss"] else 0,
        "num_attr_labels": hf["num_attr_labels"] if pretraining and hf["visual_attr_loss"] else 0,
        "answers": [f"answer_{index}" for index in range(hf["num_qa_labels"])] if has_answers else [],
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
    if config.pretraining_heads:
        rules += module("mlm_head.dense", "cls.predictions.transform.dense")
        rules += module("mlm_head.norm", "cls.predictions.transform.LayerNorm")
        rules += [rename("mlm_head.bias", "cls.predictions.bias"), *module("heads.itm", "cls.seq_relationship")]
        rules += module("region_head.dense", "obj_predict_head.transform.dense")
        rules += module("region_head.norm", "obj_predict_head.transform.LayerNorm")
        decoders = {"feat": True, "obj": config.num_object_labels, "attr": config.num_attr_labels}
        rules += [rule for name, present in decoders.items() if present
                  for rule in module(f"region_head.decoders.{name}", f"obj_predict_head.decoder_dict.{name}")]
    return Format(FORMAT_NAME, rules, skip=_skip, check_skipped=_check_skipped)


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer that old transformers versions saved"
    return None


def _check_skipped(key: str, tensor: torch.Tensor) -> None:
    check_position_ids(key, tensor)


def _untie(state: dict[str, torch.Tensor], hf: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """`state` without the MLM decoder, which must be (or, with tied weights, be left to be) the word embeddings."""
    decoder = state.get(TIED_DECODER)
    if decoder is None:
        if hf.get("tie_word_embeddings") is False:
            raise UserError(f"{where}: tie_word_embeddings is false but the file holds no {TIED_DECODER}; "
                            "vlmkit's LXMERT ties the MLM decoder to the word embeddings")
        return state
    if not torch.equal(decoder, state["lxmert.embeddings.word_embeddings.weight"]):
        raise UserError(f"{where}: {TIED_DECODER} differs from lxmert.embeddings.word_embeddings.weight; vlmkit's "
                        "LXMERT ties the MLM decoder to the word embeddings, as HF does by default")
    return {key: value for key, value in state.items() if key != TIED_DECODER}


def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """A vlmkit `lxmert` model from an HF LxmertModel / LxmertForQuestionAnswering / LxmertForPreTraining
    folder, strictly: every tensor mapped onto the family's backbone and heads, or the load refused."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs

    reject_kwargs(unused, FORMAT_NAME)
    hf, architecture, weights, state = read_hf_folder(directory, (BASE, QA, PRETRAINING), dtype)
    config = config_from_hf(hf, architecture, str(directory / "config.json"))
    if architecture == PRETRAINING:
        state = _untie(state, hf, str(weights))
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
    architecture = PRETRAINING if config.pretraining_heads else QA if config.answers else BASE
    hf = {
        "architectures": [architecture], "model_type": "lxmert", "vocab_size": config.vocab_size,
        "hidden_size": config.width, "num_attention_heads": config.heads,
        "intermediate_size": int(config.width * config.mlp_ratio), "hidden_act": TO_HF_ACTIVATION[config.activation],
        "max_position_embeddings": config.context_length, "type_vocab_size": config.type_vocab_size,
        "l_layers": config.l_layers, "x_layers": config.x_layers, "r_layers": config.r_layers,
        "visual_feat_dim": config.visual_feat_dim, "visual_pos_dim": config.visual_pos_dim,
        "num_qa_labels": max(len(config.answers), 1), "pad_token_id": config.pad_token_id,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dtype": "float32",
    }
    if architecture == PRETRAINING:
        decoders = model.region_head.decoders
        hf.update({
            "task_mask_lm": True, "task_matched": True, "task_obj_predict": True, "task_qa": bool(config.answers),
            "visual_feat_loss": True, "visual_obj_loss": "obj" in decoders, "visual_attr_loss": "attr" in decoders,
            "num_object_labels": decoders["obj"].out_features if "obj" in decoders else DEFAULTS["num_object_labels"],
            "num_attr_labels": decoders["attr"].out_features if "attr" in decoders else DEFAULTS["num_attr_labels"],
            "tie_word_embeddings": True,
        })
    return hf


# What HF's classes have no place for: the reasoning head and an image tower (HF reads features).
NOT_IN_HF = ("heads.reasoning.", "visual.")


def export(model, directory: Path) -> None:
    """Write an HF LxmertForPreTraining (with pre-training heads), LxmertForQuestionAnswering (with a QA
    head only) or LxmertModel folder; the MLM decoder is left to HF's tying, as HF itself saves it."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    hf_config = config_to_hf(model)
    state = model.state_dict()
    left_out = sorted({".".join(key.split(".")[:2]) if key.startswith("heads.") else key.split(".")[0]
                       for key in state if key.startswith(NOT_IN_HF)})
    if left_out:
        print(f"vlmkit: note: HF's {hf_config['architectures'][0]} has no place for this model's reasoning head "
              f"or image tower ({', '.join(left_out)}); they are left out of the export (HF reads region features, "
              f"which this model's image tower computes: model.visual_features(batch))", file=sys.stderr)
        state = {key: value for key, value in state.items() if not key.startswith(NOT_IN_HF)}
    prefix = "" if hf_config["architectures"] == [BASE] else "lxmert."  # a bare LxmertModel saves its keys unprefixed
    state = to_theirs(state, lxmert_format(model.config, prefix=prefix))
    write_folder(model, Path(directory), hf_config, state, FORMAT_NAME)
