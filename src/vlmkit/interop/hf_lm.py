"""HF transformers `GPT2LMHeadModel` and `LlamaForCausalLM` folders <-> the `lm` family, both ways.

A folder holds `config.json` (model_type "gpt2" or "llama"), `model.safetensors` (or sharded, or
`pytorch_model.bin`) and usually `tokenizer.json` (+ `tokenizer_config.json`). The key layouts:

- GPT-2 keeps its projections as Conv1D (`x @ W + b`, weight (in, out)): every one is transposed
  into our Linear. `c_attn` is already a fused [q; k; v]. Old files carry `attn.bias` (the causal
  tril) and `attn.masked_bias` buffers, and sometimes a copy of the tied `lm_head.weight`: each is
  checked to be what it must be, then skipped.
- Llama keeps q, k, v (k and v smaller under grouped-query attention) and gate, up as separate
  Linears: they are fused into our `attn.qkv` ([q; k; v]) and `mlp.fc1` ([gate; up]). Old files
  carry `rotary_emb.inv_freq`, checked against the config's theta and skipped.

Options vlmkit does not implement (rope scaling, a non-silu Llama activation, GPT-2's
layer-index attention scaling, cross-attention ...) are a UserError naming the option.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from vlmkit.encoders.config import lm_config_gpt2, lm_config_llama
from vlmkit.errors import UserError
from vlmkit.interop.mapping import Format, Rule, fused, module, rename, transposed

FORMAT_NAME = "HF transformers causal LM (GPT2LMHeadModel / LlamaForCausalLM)"
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# HF activation names <-> vlmkit's (HF's "gelu_new" is the tanh approximation).
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu",
               "relu": "relu", "silu": "silu"}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}
# GPT2Config / LlamaConfig defaults, for configs that leave keys out.
GPT2_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
                 "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "bos_token_id": 50256,
                 "eos_token_id": 50256, "pad_token_id": None, "tie_word_embeddings": True}
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": None, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": None}


def is_hf_lm(config: dict) -> bool:
    """Whether an HF config.json describes a GPT-2 or Llama model (any head; `load` checks the head)."""
    return config.get("model_type") in ARCHITECTURES


# ---- config ------------------------------------------------------------------------------------
def _token_id(value: Any, vocab_size: int) -> int | None:
    """One special id from an HF config value (an int, a list of them, or null); ids outside the vocabulary are dropped."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


def _special_ids(hf: dict, vocab_size: int) -> dict[str, int | None]:
    bos, eos = _token_id(hf["bos_token_id"], vocab_size), _token_id(hf["eos_token_id"], vocab_size)
    pad = _token_id(hf["pad_token_id"], vocab_size)
    # No pad token (GPT-2, Llama): pad with the end token, as HF's generate does; padding is masked anyway.
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad if pad is not None else (eos if eos is not None else 0)}


def _reject(where: str, problems: dict[str, bool]) -> None:
    for problem, present in problems.items():
        if present:
            raise UserError(f"{where} uses {problem}, which vlmkit's LM does not implement; only the standard architecture loads")


def config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """A vlmkit `lm` family config dict from an HF GPT2Config / LlamaConfig dict (config.json)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        hf = {**GPT2_DEFAULTS, **hf}
        _reject(where, {
            "cross-attention (add_cross_attention)": bool(hf.get("add_cross_attention")),
            "unscaled attention (scale_attn_weights false)": hf.get("scale_attn_weights", True) is False,
            "attention scaled by the layer index (scale_attn_by_inverse_layer_idx)": bool(hf.get("scale_attn_by_inverse_layer_idx")),
        })
        activation = hf["activation_function"]
        if activation not in ACTIVATIONS:
            raise UserError(f"{where} activation_function '{activation}' is not supported; supported: {', '.join(ACTIVATIONS)}")
        lm = lm_config_gpt2(
            vocab_size=hf["vocab_size"], context_length=hf["n_positions"], width=hf["n_embd"], depth=hf["n_layer"],
            heads=hf["n_head"], mlp_hidden=hf["n_inner"], activation=ACTIVATIONS[activation],
            norm_eps=float(hf["layer_norm_epsilon"]), tie_embeddings=bool(hf["tie_word_embeddings"]),
            **_special_ids(hf, hf["vocab_size"]),
        )
        return {"lm": lm}
    if kind == "llama":
        hf = {**LLAMA_DEFAULTS, **hf}
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling")
        width, heads = hf["hidden_size"], hf["num_attention_heads"]
        mlp_bias = hf["attention_bias"] if hf["mlp_bias"] is None else hf["mlp_bias"]
        _reject(where, {
            f"rope scaling ({scaling or rope})": bool(scaling) and (scaling.get("rope_type") or scaling.get("type")) != "default"
            or rope.get("rope_type", "default") != "default",
            f"hidden_act '{hf['hidden_act']}' (only silu)": hf["hidden_act"] != "silu",
            f"head_dim {hf.get('head_dim')} (not hidden_size / num_attention_heads)": hf.get("head_dim") not in (None, width // heads),
            "attention_bias and mlp_bias that differ": bool(hf["attention_bias"]) != bool(mlp_bias),
            "pretraining_tp > 1": (hf.get("pretraining_tp") or 1) > 1,
        })
        kv_heads = hf["num_key_value_heads"] or heads
        lm = lm_config_llama(
            vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], width=width,
            depth=hf["num_hidden_layers"], heads=heads, kv_heads=None if kv_heads == heads else kv_heads,
            mlp_hidden=hf["intermediate_size"], norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), bias=bool(hf["attention_bias"]),
            tie_embeddings=bool(hf["tie_word_embeddings"]), **_special_ids(hf, hf["vocab_size"]),
        )
        return {"lm": lm}
    raise UserError(f"{where} describes model_type '{kind}', not gpt2 or llama")


# ---- key layouts ---------------------------------------------------------------------------------
def _check_equal(expected: Callable[[], torch.Tensor], what: str) -> Callable[[str, torch.Tensor], None]:
    def check(key: str, tensor: torch.Tensor) -> None:
        want = expected()
        if tuple(tensor.shape) != tuple(want.shape) or not torch.allclose(tensor.float(), want.float(), rtol=1e-4, atol=1e-6):
            raise UserError(f"checkpoint key {key} is not {what}, which vlmkit assumes; this checkpoint is not supported")
    return check


def _check_scalar(key: str, tensor: torch.Tensor) -> None:
    """GPT-2's `masked_bias`: the one fill value of masked scores (-1e4), which SDPA's boolean masks replace."""
    if tensor.numel() != 1:
        raise UserError(f"checkpoint key {key} is not the scalar buffer vlmkit assumes; this checkpoint is not supported")


def _checks(checks: dict[str, Callable[[str, torch.Tensor], None]], pick: Callable[[str], str | None]):
    """Format.skip / check_skipped from `pick(key)` -> the name of the check that covers it (or None)."""
    return (lambda key: pick(key)), (lambda key, tensor: checks[pick(key)](key, tensor))


def gpt2_format(config, state: dict[str, torch.Tensor] | None = None) -> Format:
    """The GPT2LMHeadModel key layout of an `lm` config (learned positions, Conv1D projections)."""
    lm = config.lm
    rules: list[Rule] = [
        rename("lm.token_embedding.weight", "transformer.wte.weight"),
        rename("lm.positional_embedding", "transformer.wpe.weight"),
        *module("lm.final_norm", "transformer.ln_f"),
    ]
    for index in range(lm.depth):
        ours, theirs = f"lm.transformer.blocks.{index}", f"transformer.h.{index}"
        rules += module(f"{ours}.norm1", f"{theirs}.ln_1") + module(f"{ours}.norm2", f"{theirs}.ln_2")
        for mine, conv in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            rules += [transposed(f"{ours}.{mine}.weight", f"{theirs}.{conv}.weight"), rename(f"{ours}.{mine}.bias", f"{theirs}.{conv}.bias")]
    if not lm.tie_embeddings:
        rules.append(rename("lm.lm_head.weight", "lm_head.weight"))
    state = state or {}
    n = lm.context_length
    checks = {
        "tril": _check_equal(lambda: torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n), "the causal mask buffer"),
        "masked_bias": _check_scalar,
        "tied": _check_equal(lambda: state["transformer.wte.weight"], "a copy of transformer.wte.weight (the tied head)"),
    }

    def pick(key: str) -> str | None:
        if key.startswith("transformer.h.") and key.endswith(".attn.bias"):
            return "tril"
        if key.startswith("transformer.h.") and key.endswith(".attn.masked_bias"):
            return "masked_bias"
        if key == "lm_head.weight" and lm.tie_embeddings and "transformer.wte.weight" in state:
            return "tied"
        return None

    skip, check = _checks(checks, pick)
    return Format(ARCHITECTURES["gpt2"], rules, skip=skip, check_skipped=check)


def llama_format(config, state: dict[str, torch.Tensor] | None = None, prefix: str = "model.",
                 head: str = "lm_head.weight") -> Format:
    """The LlamaForCausalLM key layout of an `lm` config (q/k/v and gate/up fused into ours).

    `prefix` is where the decoder's keys sit and `head` the untied head's key: `model.` and
    `lm_head.weight` in a LlamaForCausalLM, `language_model.model.` and
    `language_model.lm_head.weight` in a Llava hub checkpoint.
    """
    from vlmkit.layers.rotary import inverse_frequencies

    lm = config.lm
    head_dim = lm.width // lm.heads
    q_rows, kv_rows = lm.heads * head_dim, lm.num_kv_heads * head_dim
    params = ("weight", "bias") if lm.bias else ("weight",)
    rules: list[Rule] = [
        rename("lm.token_embedding.weight", f"{prefix}embed_tokens.weight"),
        rename("lm.final_norm.weight", f"{prefix}norm.weight"),
    ]
    for index in range(lm.depth):
        ours, theirs = f"lm.transformer.blocks.{index}", f"{prefix}layers.{index}"
        rules += [rename(f"{ours}.norm1.weight", f"{theirs}.input_layernorm.weight"),
                  rename(f"{ours}.norm2.weight", f"{theirs}.post_attention_layernorm.weight")]
        for param in params:
            attn, mlp = f"{theirs}.self_attn", f"{theirs}.mlp"
            rules += [
                fused(f"{ours}.attn.qkv.{param}", tuple(f"{attn}.{p}_proj.{param}" for p in "qkv"), (q_rows, kv_rows, kv_rows)),
                rename(f"{ours}.attn.out.{param}", f"{attn}.o_proj.{param}"),
                fused(f"{ours}.mlp.fc1.{param}", (f"{mlp}.gate_proj.{param}", f"{mlp}.up_proj.{param}")),
                rename(f"{ours}.mlp.fc2.{param}", f"{mlp}.down_proj.{param}"),
            ]
    if not lm.tie_embeddings:
        rules.append(rename("lm.lm_head.weight", head))
    state = state or {}
    embeddings = f"{prefix}embed_tokens.weight"
    checks = {
        "inv_freq": _check_equal(lambda: inverse_frequencies(head_dim, lm.rope_theta), f"the rotary frequencies of theta {lm.rope_theta}"),
        "tied": _check_equal(lambda: state[embeddings], f"a copy of {embeddings} (the tied head)"),
    }

    def pick(key: str) -> str | None:
        if key.startswith(f"{prefix}layers.") and key.endswith(".self_attn.rotary_emb.inv_freq"):
            return "inv_freq"
        if key == head and lm.tie_embeddings and embeddings in state:
            return "tied"
        return None

    skip, check = _checks(checks, pick)
    return Format(ARCHITECTURES["llama"], rules, skip=skip, check_skipped=check)


def lm_format(config, state: dict[str, torch.Tensor] | None = None) -> Format:
    """The HF layout of an `lm` config: GPT-2's or Llama's, whichever style it has (else a UserError)."""
    return gpt2_format(config, state) if hf_style(config.lm) == "gpt2" else llama_format(config, state)


# ---- loading -------------------------------------------------------------------------------------
def load(directory: Path, dtype: torch.dtype | None = None, **unused):
    """An `lm` family model from an HF GPT2LMHeadModel / LlamaForCausalLM folder, with its tokenizer."""
    from vlmkit.interop.common import attach_preprocessing, build_and_load, read_hf_folder, reject_kwargs
    from vlmkit.interop.files import read_json

    reject_kwargs(unused, FORMAT_NAME)
    where = str(directory / "config.json")
    kind = read_json(directory / "config.json").get("model_type")
    if kind not in ARCHITECTURES:  # the head is checked next, against the model type's architecture
        raise UserError(f"{directory} holds a {kind or 'untyped'} model (config.json 'model_type'); vlmkit loads "
                        f"{' and '.join(ARCHITECTURES.values())} folders")
    hf, _, weights, state = read_hf_folder(directory, ARCHITECTURES[kind], dtype)
    config = config_from_hf(hf, where)
    model = build_and_load("lm", config, state, lambda built: lm_format(built.config, state), str(weights))
    lm = model.config.lm
    attach_preprocessing(model, directory, image_size=None, context_length=lm.context_length)
    if model.tokenizer is not None:
        # A tokenizer.json without a tokenizer_config names no specials: take the model's.
        tokenizer = model.tokenizer
        tokenizer.bos_id = lm.bos_token_id if tokenizer.bos_id is None else tokenizer.bos_id
        tokenizer.eos_id = lm.eos_token_id if tokenizer.eos_id is None else tokenizer.eos_id
    return model


# ---- export --------------------------------------------------------------------------------------
def _gpt2_needs(lm) -> dict[str, bool]:
    """What GPT2LMHeadModel needs of an LM config, each with whether it holds."""
    return {"learned positions": lm.positions == "learned", "LayerNorm": lm.norm == "layernorm",
            "a plain MLP": not lm.gated_mlp, "biases": lm.bias, "no grouped-query attention": lm.num_kv_heads == lm.heads,
            f"a supported activation (not {lm.activation})": lm.activation in TO_HF_ACTIVATION}


def llama_needs(lm) -> dict[str, bool]:
    """What LlamaForCausalLM needs of an LM config, each with whether it holds."""
    return {"rotary positions": lm.positions == "rotary", "RMSNorm": lm.norm == "rmsnorm", "a gated MLP": lm.gated_mlp,
            f"silu (not {lm.activation})": lm.activation == "silu"}


def hf_style(lm) -> str:
    """"gpt2" or "llama": the HF architecture that holds this LM exactly, or a UserError naming the mismatch."""
    gpt2, llama = _gpt2_needs(lm), llama_needs(lm)
    if all(gpt2.values()):
        return "gpt2"
    if all(llama.values()):
        return "llama"
    style = gpt2 if lm.positions == "learned" else llama
    missing = ", ".join(name for name, ok in style.items() if not ok)
    name = "GPT2LMHeadModel" if style is gpt2 else "LlamaForCausalLM"
    raise UserError(f"this LM mixes styles: {name} would need {missing}; save it with format='vlmkit'")


def config_to_hf(config) -> dict[str, Any]:
    """The HF GPT2Config / LlamaConfig dict (config.json) of an `lm` config."""
    lm = config.lm
    ids = {"bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id, "pad_token_id": lm.pad_token_id}
    if hf_style(lm) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": lm.vocab_size,
            "n_positions": lm.context_length, "n_embd": lm.width, "n_layer": lm.depth, "n_head": lm.heads,
            "n_inner": None if lm.hidden == 4 * lm.width else lm.hidden,
            "activation_function": TO_HF_ACTIVATION[lm.activation], "layer_norm_epsilon": lm.norm_eps,
            "resid_pdrop": lm.dropout, "embd_pdrop": lm.dropout, "attn_pdrop": lm.dropout,
            "scale_attn_weights": True, "tie_word_embeddings": lm.tie_embeddings, "dtype": "float32", **ids,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": lm.vocab_size,
        "hidden_size": lm.width, "intermediate_size": lm.hidden, "num_hidden_layers": lm.depth,
        "num_attention_heads": lm.heads, "num_key_value_heads": lm.num_kv_heads, "head_dim": lm.width // lm.heads,
        "hidden_act": "silu", "max_position_embeddings": lm.context_length, "rms_norm_eps": lm.norm_eps,
        "rope_theta": lm.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "attention_bias": lm.bias, "mlp_bias": lm.bias, "attention_dropout": lm.dropout,
        "tie_word_embeddings": lm.tie_embeddings, "dtype": "float32", **ids,
    }


def export(model, directory: Path) -> None:
    """Write an HF GPT2LMHeadModel or LlamaForCausalLM folder: config.json, model.safetensors, tokenizer."""
    from vlmkit.interop.common import write_folder
    from vlmkit.interop.mapping import to_theirs

    hf = config_to_hf(model.config)
    state = to_theirs(model.state_dict(), lm_format(model.config))
    write_folder(model, directory, hf, state, hf["architectures"][0])


_LLAMA_MODULES = {("attn.qkv", "q"): "self_attn.q_proj", ("attn.qkv", "k"): "self_attn.k_proj",
                  ("attn.qkv", "v"): "self_attn.v_proj", ("attn.out", "all"): "self_attn.o_proj",
                  ("mlp.fc1", "gate"): "mlp.gate_proj", ("mlp.fc1", "up"): "mlp.up_proj", ("mlp.fc2", "all"): "mlp.down_proj"}


def llama_peft_translator(ours: str = "lm.", theirs: str = "model.") -> Callable[[str, str], str | None]:
    """(our module path, LoRA slice) -> the LlamaForCausalLM module path PEFT names, for `interop.peft`.

    `ours` is where the LM sits in our model (`lm.` in every family), `theirs` where the decoder
    sits in the HF model (`model.` for LlamaForCausalLM, `model.language_model.` for a Llava in
    transformers v5's in-memory layout). The head is `lm_head` at the HF model's top level.
    """
    # "model." -> "lm_head"; the hub Llava layout "language_model.model." -> "language_model.lm_head".
    head = theirs[: -len("model.")] + "lm_head" if theirs == "model." or theirs.endswith(".model.") else "lm_head"

    def translate(path: str, name: str) -> str | None:
        if not path.startswith(ours):
            return None
        inner = path[len(ours):]
        if inner == "lm_head" and name == "all":
            return head
        parts = inner.split(".")
        if len(parts) < 5 or parts[:2] != ["transformer", "blocks"]:
            return None
        module = _LLAMA_MODULES.get((".".join(parts[3:]), name))
        return None if module is None else f"{theirs}layers.{parts[2]}.{module}"

    return translate
