"""HF GPT2LMHeadModel / LlamaForCausalLM folders load into the `lm` family exactly, and export back.

Random tiny HF models (Llama with grouped-query attention and an untied head), perturbed so no
swapped weight can hide, saved with save_pretrained next to a tokenizer.json built with the
`tokenizers` library.
"""
import json
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.errors import UserError
from vlmkit.generation import generate
from vlmkit.io import load_safetensors, save_safetensors

from interop_helpers import CAPTIONS, randomise_, transformers

STYLES = ["gpt2", "llama"]


def _gpt2_tokenizer(folder: Path) -> int:
    """A byte-level BPE like GPT-2's (no specials added by the template), with a tokenizer_config naming them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CAPTIONS * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "model_max_length": 1024}))
    assert tokenizer.token_to_id("<|endoftext|>") == 0  # the trainer puts specials first (GPT-2 has it last)
    return tokenizer.get_vocab_size()


def _llama_tokenizer(folder: Path) -> int:
    """A SentencePiece-style BPE like Llama's (<unk> <s> </s>, metaspace, byte fallback, '<s> $A' template); no tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CAPTIONS * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def _hf_config(style: str, vocab: int):
    if style == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    rope_theta=500.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                    attn_implementation="eager")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{style: (folder, HF model in eval mode)}, built once."""
    out = {}
    for style in STYLES:
        folder = tmp_path_factory.mktemp(style)
        vocab = (_gpt2_tokenizer if style == "gpt2" else _llama_tokenizer)(folder)
        torch.manual_seed(0)
        hf = transformers.GPT2LMHeadModel(_hf_config(style, vocab)) if style == "gpt2" else transformers.LlamaForCausalLM(_hf_config(style, vocab))
        randomise_(hf, seed=1)
        hf.save_pretrained(folder)
        out[style] = (folder, hf.eval())
    return out


def _batch(vocab: int, seed: int = 0):
    tokens = torch.randint(3, vocab - 1, (3, 10), generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([10, 6, 3])
    real = torch.arange(10)[None] < lengths[:, None]  # (B, T)
    return tokens, real


@pytest.mark.parametrize("style", STYLES)
def test_logits_match_transformers_with_right_padding(style, folders):
    folder, hf = folders[style]
    model = vlmkit.load(folder)
    assert model.family == "lm" and model.config.lm.positions == ("learned" if style == "gpt2" else "rotary")
    tokens, real = _batch(model.config.lm.vocab_size)
    tokens = tokens.masked_fill(~real, model.config.lm.pad_token_id)
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=real.long()).logits
        ours = model.lm(tokens, attention_mask=real)
        unmasked = model.lm(tokens)
    assert (ours - expected)[real].abs().max() < 1e-5
    assert torch.allclose(unmasked[real], ours[real], atol=1e-5)  # right padding never reaches a real token


@pytest.mark.parametrize("style", STYLES)
def test_logits_match_transformers_with_left_padding_and_positions(style, folders):
    folder, hf = folders[style]
    model = vlmkit.load(folder)
    tokens, real = _batch(model.config.lm.vocab_size, seed=1)
    real = real.flip(1)  # left padding
    num_pad = (~real).sum(1)
    position_ids = (real.long().cumsum(1) - 1).clamp(min=0)  # what HF's generate gives left-padded rows
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=real.long(), position_ids=position_ids).logits
        by_offset = model.lm(tokens, attention_mask=real, position_offset=-num_pad)
        by_ids = model.lm(tokens, attention_mask=real, position_ids=position_ids)
    assert (by_offset - expected)[real].abs().max() < 1e-5
    assert (by_ids - expected)[real].abs().max() < 1e-5


@pytest.mark.parametrize("style", STYLES)
def test_inputs_embeds_give_the_logits_of_their_tokens(style, folders):
    model = vlmkit.load(folders[style][0])
    tokens, _ = _batch(model.config.lm.vocab_size)
    with torch.no_grad():
        from_tokens = model.lm(tokens, position_offset=2)
        from_embeds = model.lm(inputs_embeds=model.lm.embed_tokens(tokens), position_offset=2)
        hidden, states = model.lm(tokens, output_hidden_states=True, return_hidden=True)
    assert torch.equal(from_tokens, from_embeds)
    assert len(states) == model.config.lm.depth + 1 and hidden.shape == (3, 10, model.config.lm.width)
    with pytest.raises(ValueError, match="exactly one"):
        model.lm(tokens, inputs_embeds=model.lm.embed_tokens(tokens))


@pytest.mark.parametrize("style", STYLES)
def test_export_round_trip_loads_in_transformers_with_equal_logits(style, folders, tmp_path):
    folder, hf = folders[style]
    model = vlmkit.load(folder)
    model.save_pretrained(tmp_path, format="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == type(hf).__name__
    tokens, real = _batch(model.config.lm.vocab_size, seed=2)
    with torch.no_grad():
        assert (back(input_ids=tokens).logits - hf(input_ids=tokens).logits).abs().max() < 1e-5
    again = vlmkit.load(tmp_path)  # and our own loader reads the exported folder back
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    assert again.tokenizer.encode("a red circle") == model.tokenizer.encode("a red circle")


@pytest.mark.parametrize("style", STYLES)
def test_cached_uncached_and_transformers_greedy_decoding_agree(style, folders):
    folder, hf = folders[style]
    model = vlmkit.load(folder)
    prompts = ["a red circle above", "two", "the big purple square is"]
    tokens, num_pad = model.prompt_tokens(prompts)
    outputs = [generate(model.decoding_step(num_pad), tokens, eos_token_id=model.config.lm.eos_token_id,
                        pad_token_id=model.config.lm.pad_token_id, max_new_tokens=8, use_cache=use_cache).tokens
               for use_cache in (True, False)]
    assert torch.equal(outputs[0], outputs[1])
    real = torch.arange(tokens.shape[1])[None] >= num_pad[:, None]
    with torch.no_grad():
        expected = hf.generate(input_ids=tokens, attention_mask=real.long(), max_new_tokens=8, do_sample=False,
                               pad_token_id=model.config.lm.pad_token_id)[:, tokens.shape[1]:]
    eos = model.config.lm.eos_token_id
    for ours, theirs in zip(outputs[0].tolist(), expected.tolist()):
        cut = theirs.index(eos) + 1 if eos in theirs else len(theirs)
        assert ours[:cut] == theirs[:cut]
    assert model.generate_text(prompts, max_new_tokens=6) == model.generate_text(prompts, max_new_tokens=6, use_cache=False)


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("style", STYLES)
def test_a_missing_key_is_a_clear_error(style, folders, tmp_path):
    folder = _copy(folders[style][0], tmp_path)
    state = dict(load_safetensors(folder / "model.safetensors"))
    dropped = "transformer.h.1.mlp.c_fc.weight" if style == "gpt2" else "model.layers.1.self_attn.k_proj.weight"
    del state[dropped]
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(UserError, match=dropped.replace(".", r"\.")):
        vlmkit.load(folder)


def test_old_gpt2_buffers_are_checked_and_skipped(folders, tmp_path):
    folder = _copy(folders["gpt2"][0], tmp_path)
    state = dict(load_safetensors(folder / "model.safetensors"))
    n = 32
    for index in range(2):
        state[f"transformer.h.{index}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{index}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()  # a tied head stored twice
    save_safetensors(state, folder / "model.safetensors")
    reference = vlmkit.load(folders["gpt2"][0])
    loaded = vlmkit.load(folder)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key])
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, n, n, dtype=torch.uint8)  # not causal: refuse
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(UserError, match="causal mask buffer"):
        vlmkit.load(folder)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2ForSequenceClassification"]}, "GPT2ForSequenceClassification"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral'"),
])
def test_unsupported_architectures_and_options_are_one_clear_line(change, message, folders, tmp_path):
    folder = _copy(folders["gpt2"][0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as error:
        vlmkit.load(folder)
    assert "\n" not in str(error.value)


def test_tokenizers_keep_the_checkpoint_special_ids(folders):
    gpt2, llama = vlmkit.load(folders["gpt2"][0]), vlmkit.load(folders["llama"][0])
    end = gpt2.tokenizer.token_to_id("<|endoftext|>")
    assert gpt2.tokenizer.bos_id == gpt2.tokenizer.eos_id == end == gpt2.config.lm.eos_token_id
    assert (llama.tokenizer.bos_id, llama.tokenizer.eos_id) == (1, 2) == (llama.config.lm.bos_token_id, llama.config.lm.eos_token_id)
    assert llama.tokenizer.decode(llama.tokenizer.encode("a red circle")) == "a red circle"
    assert gpt2.tokenizer.decode(gpt2.tokenizer.encode("a red circle")) == "a red circle"
