"""HF BERT-family folders (BertModel, and sentence-transformers models built on one) as text encoders.

A sentence-transformers folder lists its modules in `modules.json`: the Transformer (a BertModel
folder, at the root or in `0_Transformer/`), a Pooling module (`1_Pooling/config.json`: mean or
[CLS]) and optionally Normalize. vlmkit reads the same files into a `text_encoder` model whose
`embed_texts` equals `SentenceTransformer.encode(..., normalize_embeddings=True)`; the tokenizer
keeps the folder's `max_seq_length` (truncation keeps [SEP], as HF's does).

Keys: `bert.` prefixes (BertFor* checkpoints) are removed; BERT's pooler is loaded into the text
encoder's optional pooler; the MLM/NSP heads of pre-training checkpoints (`cls.*`) are left out
with a note on stderr, because a text encoder has no use for them; `embeddings.position_ids` must
be the plain arange buffer it always is. Any other key is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmkit.errors import UserError
from vlmkit.interop.files import cast_floats, find_hf_weights, read_json, read_weights
from vlmkit.interop.hf_clip import mlp_ratio
from vlmkit.interop.mapping import BlockNames, Format, block_rules, check_position_ids, module, rename

FORMAT_NAME = "HF transformers BertModel"
BERT_BLOCK = BlockNames(
    norm1="attention.output.LayerNorm",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    out="attention.output.dense", norm2="output.LayerNorm", fc1="intermediate.dense", fc2="output.dense",
)
BERT_MODEL_TYPES = ("bert",)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"


def is_bert(config: dict) -> bool:
    return config.get("model_type") in BERT_MODEL_TYPES


def config_from_bert(bert: dict[str, Any], pool: str, where: str) -> dict[str, Any]:
    """A vlmkit text_encoder config dict from an HF BertConfig dict."""
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{where}: position_embedding_type '{bert['position_embedding_type']}' is not supported; only 'absolute'")
    if bert.get("is_decoder") or bert.get("add_cross_attention"):
        raise UserError(f"{where} describes a BERT decoder; vlmkit reads BERT encoders only")
    act = bert.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise UserError(f"{where}: hidden_act '{act}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    width = bert.get("hidden_size", 768)
    return {
        "text": {
            "vocab_size": bert.get("vocab_size", 30522), "context_length": bert.get("max_position_embeddings", 512),
            "width": width, "depth": bert.get("num_hidden_layers", 12), "heads": bert.get("num_attention_heads", 12),
            "mlp_ratio": mlp_ratio(width, bert.get("intermediate_size", 3072), where), "activation": ACTIVATIONS[act],
            "causal": False, "pool": pool, "eos_token_id": None, "pad_token_id": bert.get("pad_token_id") or 0,
            "prenorm": False, "embed_norm": True, "type_vocab_size": bert.get("type_vocab_size", 2),
            "norm_eps": float(bert.get("layer_norm_eps", 1e-12)),
        },
        "pooler": True,  # switched off below when the checkpoint has no pooler weights
    }


def _skip(key: str) -> str | None:
    if key.endswith("position_ids"):
        return "a constant arange buffer"
    if key.startswith("cls."):
        return "a pre-training head (MLM/NSP) that a text encoder does not use"
    return None


def _check_skipped(key: str, tensor: torch.Tensor) -> None:
    if key.endswith("position_ids"):
        check_position_ids(key, tensor)


def bert_format(model) -> Format:
    """The BertModel key layout of a vlmkit text encoder."""
    config = model.config
    rules = [
        rename("text.token_embedding.weight", "embeddings.word_embeddings.weight"),
        rename("text.positional_embedding", "embeddings.position_embeddings.weight"),
        *module("text.embed_norm", "embeddings.LayerNorm"),
    ]
    if config.text.type_vocab_size:
        rules.append(rename("text.type_embedding.weight", "embeddings.token_type_embeddings.weight"))
    for index in range(config.text.depth):
        rules += block_rules(f"text.transformer.blocks.{index}", f"encoder.layer.{index}", BERT_BLOCK)
    if config.pooler:
        rules += module("pooler", "pooler.dense")
    return Format(FORMAT_NAME, rules, skip=_skip, check_skipped=_check_skipped)


def _normalise_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip BertFor*'s `bert.` prefix and rename TF-era LayerNorm gamma/beta, as HF's loader does."""
    notes = []
    if any(key.startswith("bert.") for key in state):
        state = {key[len("bert."):] if key.startswith("bert.") else key: value for key, value in state.items()}
    renamed = {}
    for key, value in state.items():
        if key.endswith(".gamma") or key.endswith(".beta"):
            key = key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias")
        renamed[key] = value
    heads = sorted(key for key in renamed if key.startswith("cls."))
    if heads:
        notes.append(f"left out {len(heads)} pre-training head tensors (cls.*), which a text encoder does not use")
    return renamed, notes


def _sentence_transformers(directory: Path) -> tuple[Path, str | None, int | None]:
    """(transformer folder, pooling mode or None, max_seq_length or None) of a sentence-transformers folder."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return directory, None, None
    try:
        import json

        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise UserError(f"{modules_file} is not valid JSON ({error}); re-export the model") from None
    transformer, pool, max_length = directory, None, None
    for entry in modules:
        kind, path = entry.get("type", ""), directory / entry.get("path", "")
        if kind == ST_TRANSFORMER:
            transformer = path
            settings = path / "sentence_bert_config.json"
            if settings.is_file():
                max_length = read_json(settings).get("max_seq_length")
        elif kind == ST_POOLING:
            pool = _pooling_mode(read_json(path / "config.json"), path / "config.json")
        elif kind != ST_NORMALIZE:  # Normalize needs no weights: embed_texts always normalises
            raise UserError(
                f"{modules_file} lists a {kind} module, which vlmkit does not implement; "
                f"only Transformer, Pooling (mean or cls) and Normalize are supported"
            )
    return transformer, pool, max_length


def _pooling_mode(config: dict, where: Path) -> str:
    modes = {key[len("pooling_mode_"):] for key, value in config.items() if key.startswith("pooling_mode_") and value is True}
    if modes == {"mean_tokens"}:
        return "mean"
    if modes == {"cls_token"}:
        return "cls"
    raise UserError(f"{where} asks for pooling {sorted(modes)}; vlmkit supports mean_tokens or cls_token alone")


def load(directory: Path, pool: str | None = None, dtype: torch.dtype | None = None):
    """A vlmkit text encoder from an HF BertModel or sentence-transformers folder, tokenizer attached.

    Pooling comes from `pool` ("mean" | "cls"), else the sentence-transformers Pooling config, else
    [CLS] (what BERT's own pooler reads). `max_seq_length` becomes the tokenizer's length.
    """
    from vlmkit.interop.common import attach_preprocessing, build_and_load

    transformer, st_pool, max_length = _sentence_transformers(directory)
    if pool is not None and pool not in ("mean", "cls"):
        raise UserError(f"pool '{pool}' is not a BERT pooling; use 'mean' or 'cls'")
    config_file = transformer / "config.json"
    config = config_from_bert(read_json(config_file), pool or st_pool or "cls", str(config_file))
    weights = find_hf_weights(transformer)
    state, notes = _normalise_keys(cast_floats(read_weights(weights), dtype))
    config["pooler"] = "pooler.dense.weight" in state

    def make_format(model) -> Format:
        fmt = bert_format(model)
        fmt.notes = notes
        return fmt

    model = build_and_load("text_encoder", config, state, make_format, str(weights))
    attach_preprocessing(model, transformer, image_size=None, context_length=max_length)
    return model


# ---- export ------------------------------------------------------------------------------------
def export(model, directory: Path) -> None:
    """Write a BertModel folder that is also a sentence-transformers model (Pooling [+ Normalize])."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    text = model.config.text
    if text.causal or text.prenorm or not text.embed_norm or model.config.embed_dim or text.pool not in ("mean", "cls"):
        raise UserError("only a BERT-style text encoder (post-LN, embedding norm, no projection, mean/cls pooling) can be saved as HF BERT")
    if text.activation not in TO_HF_ACTIVATION:
        raise UserError(f"activation '{text.activation}' has no HF BERT name; save with format='vlmkit'")
    state = to_theirs(model.state_dict(), bert_format(model))
    bert = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": text.vocab_size, "hidden_size": text.width,
        "num_hidden_layers": text.depth, "num_attention_heads": text.heads, "intermediate_size": int(text.width * text.mlp_ratio),
        "hidden_act": TO_HF_ACTIVATION[text.activation], "max_position_embeddings": text.context_length,
        "type_vocab_size": text.type_vocab_size, "layer_norm_eps": text.norm_eps, "pad_token_id": text.pad_token_id,
        "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "dtype": "float32",
    }
    pooling = {"word_embedding_dimension": text.width, "pooling_mode_cls_token": text.pool == "cls",
               "pooling_mode_mean_tokens": text.pool == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE}]
    max_length = model.tokenizer.context_length if model.tokenizer is not None else text.context_length
    extra = {"modules.json": modules, "1_Pooling/config.json": pooling,
             "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False}}
    write_folder(model, directory, bert, state, FORMAT_NAME, extra_files=extra)
    (Path(directory) / "2_Normalize").mkdir(exist_ok=True)
