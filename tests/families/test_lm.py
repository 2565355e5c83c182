"""The decoder-only LM substrate (RMSNorm, rotary positions, grouped-query attention, SwiGLU) and the
text-only `lm` family: layers against their definitions and HF, decoding, text-only training."""
import json

import pytest
import torch

import vlmkit
from vlmkit.encoders.config import LMConfig, lm_config_gpt2, lm_config_llama
from vlmkit.encoders.lm import DecoderLM
from vlmkit.layers.attention import Attention, KVCache, reference_attention
from vlmkit.layers.masks import causal_mask

transformers = pytest.importorskip("transformers")

TEXTS = ["a red circle on the left", "a blue square", "two shapes: a green triangle and a yellow star",
         "a photo of a purple star", "three shapes", "an orange circle below a grey square"]


def _llama_lm(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    config = LMConfig(**lm_config_llama(vocab_size=60, context_length=32, width=32, depth=2, heads=4, kv_heads=2, mlp_hidden=40,
                                        **overrides))
    return DecoderLM.from_config(config).eval()


def test_rmsnorm_is_hf_llama_rmsnorm_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from vlmkit.layers.norm import RMSNorm

    ours, theirs = RMSNorm(16, eps=1e-6), LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 16).to(dtype)
        assert torch.equal(ours(x), theirs(x)), dtype


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_attention_is_the_definition_with_repeated_heads(masked):
    torch.manual_seed(0)
    attn = Attention(32, 4, kv_heads=2, qkv_bias=False, out_bias=False).eval()
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)  # one fused projection
    x = torch.randn(2, 7, 32)
    mask = (torch.arange(7)[None, None, None, :] >= torch.tensor([0, 3])[:, None, None, None]) & causal_mask(7) if masked else None
    out = attn(x, mask=mask, is_causal=not masked)
    q, k, v = attn.qkv(x).split([32, 16, 16], dim=-1)
    q, k, v = (t.view(2, 7, -1, 8).transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h reads kv head h // 2
    expected = reference_attention(q, k, v, mask=mask, is_causal=not masked)
    expected = attn.out(expected.transpose(1, 2).reshape(2, 7, 32))
    rows = slice(None) if not masked else (slice(1, None))
    assert torch.allclose(out[rows, 3:], expected[rows, 3:], atol=1e-5)


def test_gated_mlp_is_down_of_silu_gate_times_up():
    from vlmkit.layers.mlp import MLP

    torch.manual_seed(0)
    mlp = MLP(8, 12, "silu", bias=False, gated=True)
    x = torch.randn(3, 8)
    gate, up = mlp.fc1.weight[:12], mlp.fc1.weight[12:]  # fc1 rows are [gate; up]
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ mlp.fc2.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_rotary_stack_has_no_position_table_and_sees_relative_positions():
    lm = _llama_lm()
    assert "positional_embedding" not in dict(lm.named_parameters())
    tokens = torch.randint(0, 60, (1, 6))
    with torch.no_grad():
        # Only relative positions matter: shifting them all changes nothing, a gap between two tokens does.
        assert torch.allclose(lm(tokens), lm(tokens, position_offset=7), atol=1e-4)
        gapped = torch.tensor([[0, 1, 2, 9, 10, 11]])
        assert not torch.allclose(lm(tokens)[:, 3:], lm(tokens, position_ids=gapped)[:, 3:], atol=1e-3)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_cached_steps_and_left_padding_match_the_full_forward(style):
    lm = _llama_lm() if style == "llama" else DecoderLM.from_config(LMConfig(**lm_config_gpt2(
        vocab_size=60, context_length=32, width=32, depth=2, heads=4))).eval()
    tokens = torch.randint(1, 60, (3, 9))
    with torch.no_grad():
        full = lm(tokens)
        cache = KVCache()
        steps = [lm(tokens[:, :4], cache=cache)] + [lm(tokens[:, t : t + 1], cache=cache) for t in range(4, 9)]
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        if style == "llama":  # grouped-query attention caches only its 2 kv heads
            assert cache.layers["block0.self"].key.shape == (3, 2, 9, 8)
        row = tokens[:1, :5]
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
        real = torch.arange(8)[None] >= 3
        logits = lm(padded, attention_mask=real, position_offset=torch.tensor([-3]))
        assert torch.allclose(logits[:, 3:], lm(row), atol=1e-5)


def test_full_size_configurations_have_transformers_parameter_counts():
    from vlmkit.models.registry import build_model, named_config

    hf_configs = {
        "gpt2": transformers.GPT2Config(),
        "tinyllama-1.1b": transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    }
    for name, hf_config in hf_configs.items():
        with torch.device("meta"):
            ours = build_model(*named_config(name))
            theirs = transformers.AutoModelForCausalLM.from_config(hf_config)
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters()), name
    assert count == 1_100_048_384  # TinyLlama-1.1B


def test_token_nll_gives_the_training_loss(tmp_path):
    torch.manual_seed(0)
    model = vlmkit.create_model("lm-tiny").eval()
    batch = model.dummy_batch(4)
    nll, count = model.token_nll(batch["tokens"])
    assert torch.allclose(nll.sum() / count.sum(), model(batch).loss, atol=1e-6)
    assert count.tolist() == [3.0, 7.0, 11.0, 15.0]  # real targets through the end token


def test_gpt2_style_bos_equal_to_eos_is_trained_through_the_second_end_token():
    model = vlmkit.create_model("gpt2-tiny", **{"lm.bos_token_id": 9, "lm.eos_token_id": 9, "lm.pad_token_id": 9})
    tokens = torch.tensor([[9, 5, 6, 9, 9, 9]])
    targets, mask = model._targets(tokens)
    assert mask.tolist() == [[True, True, True, False, False]]


def test_text_only_records_train_load_and_generate(tmp_path):
    from vlmkit.cli import main

    data = tmp_path / "texts.jsonl"
    records = [{"texts": [text]} for text in TEXTS] + [{"qa": [{"question": "what color is the star?", "answer": "yellow"}]},
                                                        {"statements": [{"text": "there is a red circle", "label": True}]}]
    data.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    run = tmp_path / "run"
    assert main(["train", "--recipe", "lm-tiny", "--data", str(data), "--out", str(run), "steps=3", "batch_size=4",
                 "warmup_steps=1", "save_every=3", "vocab_size=600", "model.lm.depth=2",
                 "model.lm.context_length=40"]) == 0
    model = vlmkit.load(run)
    assert model.tokenizer.context_length == model.config.lm.context_length == 40  # the override reaches the tokenizer
    assert model.family == "lm" and model.config.lm.vocab_size == model.tokenizer.vocab_size
    assert model.config.lm.eos_token_id == model.tokenizer.eos_id
    texts = model.generate_text(["a red", "what color is the star?"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
    assert texts == model.generate_text(["a red", "what color is the star?"], max_new_tokens=4, use_cache=False)
    from vlmkit.data.formats import read_records

    dataset = model.training_dataset(read_records(data, require_image=False, require_text=False), None, model.tokenizer, seed=0)
    assert len(dataset) == len(TEXTS) + 2 and ["Question: what color is the star? Answer: yellow"] in dataset.texts
    batch = dataset.collate([dataset[0], dataset[1]])["tokens"]
    assert batch[:, 0].tolist() == [model.tokenizer.bos_id] * 2 and model.tokenizer.eos_id in batch[1].tolist()


def test_records_without_images_are_still_an_error_for_image_families(tmp_path):
    from vlmkit.data.formats import read_records

    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "a red circle"}) + "\n")
    with pytest.raises(vlmkit.UserError, match="has no \"image\" path"):
        read_records(data)
    assert read_records(data, require_image=False) == [{"texts": ["a red circle"]}]


def test_lm_tiny_learns_the_captions():
    """A short real training run: the next-token loss on the texts falls well below chance."""
    from vlmkit.models.lm import LanguageModel, TextDataset
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(TEXTS, vocab_size=600, context_length=32)
    config = LanguageModel.adapt_config_to_tokenizer(
        {"lm": lm_config_llama(width=64, depth=2, heads=4, kv_heads=2, mlp_hidden=128, context_length=32)}, tokenizer)
    torch.manual_seed(0)
    model = LanguageModel.from_config_dict(config)
    batch = TextDataset(TEXTS, tokenizer, model.config.lm).collate(TEXTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(batch).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 5.5 and loss.item() < 1.0, (first, loss.item())


def test_record_documents_pack_each_scene_into_context_sized_documents():
    from vlmkit.models.lm import LanguageModel, TextDataset, record_documents, record_lm_texts
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(TEXTS, vocab_size=600, context_length=32)
    records = [{"texts": TEXTS[:4], "qa": [{"question": "what color is the star?", "answer": "yellow"}]}, {"texts": TEXTS[4:]}]
    documents = record_documents(records, tokenizer, budget=20, seed=0)
    assert documents == record_documents(records, tokenizer, budget=20, seed=0)  # seeded
    assert sorted(text for document in documents for text in document) == sorted(record_lm_texts(records))  # each once
    assert all(sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in d) <= 20 or len(d) == 1 for d in documents)
    assert len(documents) < len(record_lm_texts(records))  # several texts share a document
    # A document is [bos] t1 [eos] t2 [eos] ...: every sentence ends as it would alone, and all are trained on.
    config = LanguageModel.adapt_config_to_tokenizer({"lm": lm_config_llama(width=32, depth=1, heads=4, context_length=32)}, tokenizer)
    model = LanguageModel.from_config_dict(config)
    document = next(d for d in documents if len(d) > 1)
    batch = TextDataset([document, document[0]], tokenizer, model.config.lm).collate([document, document[0]])
    tokens, lengths = batch["tokens"], batch["lengths"]
    assert tokens[0, : lengths[0]].tolist().count(tokenizer.eos_id) == len(document)
    targets, mask = model._targets(tokens, lengths)
    assert mask.sum(dim=1).tolist() == [int(lengths[0]) - 1, int(lengths[1]) - 1]
    assert targets[0][mask[0]][-1] == tokenizer.eos_id
