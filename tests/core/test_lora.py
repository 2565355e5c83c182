"""LoRA adapters (layers/lora.py) and PEFT's adapter layout (interop/peft.py), checked against the real `peft`.

The PEFT parity tests build a tiny HF `LlamaForCausalLM` and a fused twin of it written here
(one `attn.qkv` with grouped-query slices, one `mlp.fc1` holding gate and up), copy HF's weights
into the twin, and compare logits both ways: our LoRA saved in PEFT's layout and loaded with
`peft.PeftModel.from_pretrained`, and a PEFT-made adapter loaded into our twin.
"""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlmkit
from vlmkit.errors import UserError
from vlmkit.layers.attention import Attention
from vlmkit.layers.lora import (LoRALinear, apply_lora, declare_slices, load_lora_state_dict, lora_state_dict, merge_lora)


def _randomize_adapters(model, seed=0, std=0.3):
    """Fresh adapters are the identity (B = 0); give B values so every comparison below can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def test_slice_delta_lands_on_its_rows_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    layer = nn.Module()
    layer.qkv = base
    reference = nn.Linear(8, 24)
    reference.load_state_dict(base.state_dict())
    apply_lora(layer, ["qkv:q,v"], rank=2, alpha=6.0)
    _randomize_adapters(layer)
    x = torch.randn(3, 5, 8)
    out, plain = layer.qkv(x), reference(x)
    assert torch.equal(out[..., 8:16], plain[..., 8:16])  # k rows untouched
    adapted = layer.qkv
    for name, rows in (("q", slice(0, 8)), ("v", slice(16, 24))):
        expected = plain[..., rows] + 3.0 * x @ adapted.lora_A[name].weight.T @ adapted.lora_B[name].weight.T
        torch.testing.assert_close(out[..., rows], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[..., :8], plain[..., :8], atol=1e-3)
    assert layer.qkv.weight is base.weight  # the base tensor is adopted, keeping its key


def test_fresh_adapters_are_identity_freeze_the_rest_and_keep_base_keys():
    torch.manual_seed(0)
    model = vlmkit.create_model("virtex-tiny")
    batch = model.dummy_batch(2, 0)
    keys = set(model.state_dict())
    model.eval()
    before = model(batch).loss
    apply_lora(model, ["qkv:q,v", "mlp.fc1"], rank=4, alpha=8.0)
    assert model(batch).loss == before  # B = 0: the adapted model is the base model
    assert keys < set(model.state_dict())
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert any(name.endswith("attn.qkv.lora_A.q.weight") for name in trainable)
    assert any(name.endswith("mlp.fc1.lora_B.all.weight") for name in trainable)
    model.train()
    model(batch).loss.backward()
    assert all(parameter.grad is not None for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if not parameter.requires_grad)


def test_merge_folds_the_deltas_and_restores_the_plain_layout():
    torch.manual_seed(0)
    model = vlmkit.create_model("clip-tiny")
    model.eval()
    keys = set(model.state_dict())
    apply_lora(model, ["qkv:q,v", "attn.out", "fc2"], rank=4, alpha=4.0, trainable=["logit_scale"])
    _randomize_adapters(model, std=0.1)
    assert model.logit_scale.requires_grad and not model.get_parameter(next(iter(keys - {"logit_scale"}))).requires_grad
    batch = model.dummy_batch(2, 0)
    with torch.no_grad():
        adapted = model.encode_image(batch["pixels"]), model.encode_text(batch["tokens"])
    adapters = lora_state_dict(model)
    merge_lora(model)
    assert set(model.state_dict()) == keys
    assert not any(isinstance(module, LoRALinear) for module in model.modules())
    with torch.no_grad():
        merged = model.encode_image(batch["pixels"]), model.encode_text(batch["tokens"])
    for a, b in zip(adapted, merged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The adapters alone load back into a freshly adapted model.
    fresh = apply_lora(vlmkit.create_model("clip-tiny"), ["qkv:q,v", "attn.out", "fc2"], rank=4, alpha=4.0)
    load_lora_state_dict(fresh, adapters)
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in adapters.items())
    with pytest.raises(UserError, match="missing keys"):
        load_lora_state_dict(fresh, dict(list(adapters.items())[1:]))


def test_attention_query_subset_sees_the_adapter():
    """Attention's num_queries shortcut slices the fused weight; an adapted qkv must not be bypassed."""
    torch.manual_seed(0)
    attention = Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    holder = nn.Module()
    holder.attn = attention
    apply_lora(holder, ["attn.qkv:q,k,v"], rank=2, alpha=2.0)
    _randomize_adapters(holder)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, num_queries=1), attention(x)[:, :1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets, message", [
    (["nothing.here"], "names no nn.Linear"),
    (["mlp.fc1:gate"], "has no slice gate"),
    (["qkv:q:v"], "has no slice"),
    (["qkv:q,", ], "is not PATTERN"),
])
def test_bad_targets_are_user_errors(targets, message):
    model = vlmkit.create_model("virtex-tiny")
    with pytest.raises(UserError, match=message):
        apply_lora(model, targets)


def test_overlapping_slices_and_double_adaptation_are_refused():
    layer = nn.Module()
    layer.fc = nn.Linear(4, 8)
    layer.fc.lora_slices = {"a": (0, 5), "b": (3, 8)}
    with pytest.raises(UserError, match="overlap"):
        apply_lora(layer, ["fc:a,b"])
    apply_lora(layer, ["fc:a"])
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(layer, ["fc:b"])


# ---- PEFT parity on a tiny Llama --------------------------------------------------------------
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HEADS, KV_HEADS, HEAD_DIM, WIDTH, HIDDEN, VOCAB, DEPTH = 4, 2, 8, 32, 48, 128, 2


def _hf_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=HIDDEN, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's 0.02 init makes every logit ~0; larger weights make the comparison mean something
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    return model


class FusedLlama(nn.Module):
    """Llama with vlmkit's fused layout: layers.N.attn.qkv (q, k, v slices), layers.N.mlp.fc1 (gate, up)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList()
        for _ in range(DEPTH):
            layer = nn.Module()
            layer.norm1, layer.norm2 = nn.RMSNorm(WIDTH, eps=1e-6), nn.RMSNorm(WIDTH, eps=1e-6)
            layer.attn = nn.ModuleDict({"qkv": nn.Linear(WIDTH, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False),
                                        "out": nn.Linear(HEADS * HEAD_DIM, WIDTH, bias=False)})
            declare_slices(layer.attn.qkv, q=HEADS * HEAD_DIM, k=KV_HEADS * HEAD_DIM, v=KV_HEADS * HEAD_DIM)
            layer.mlp = nn.ModuleDict({"fc1": nn.Linear(WIDTH, 2 * HIDDEN, bias=False), "fc2": nn.Linear(HIDDEN, WIDTH, bias=False)})
            declare_slices(layer.mlp.fc1, gate=HIDDEN, up=HIDDEN)
            self.layers.append(layer)
        self.norm = nn.RMSNorm(WIDTH, eps=1e-6)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens):
        batch, length = tokens.shape
        inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        angles = torch.arange(length).float()[:, None] * inv_freq  # (T, Dh/2)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # (T, Dh)

        def rotate(t):  # HF's rotate_half convention
            first, second = t.chunk(2, dim=-1)
            return t * cos + torch.cat([-second, first], -1) * sin

        x = self.embed(tokens)  # (B, T, D)
        for layer in self.layers:
            q, k, v = layer.attn.qkv(layer.norm1(x)).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
            q = rotate(q.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2))  # (B, H, T, Dh)
            k = rotate(k.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)).repeat_interleave(HEADS // KV_HEADS, 1)
            v = v.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, -1)
            x = x + layer.attn.out(attended)
            gate, up = layer.mlp.fc1(layer.norm2(x)).chunk(2, -1)
            x = x + layer.mlp.fc2(F.silu(gate) * up)
        return self.lm_head(self.norm(x))  # (B, T, V)


def _fused_from_hf(hf):
    ours = FusedLlama()
    state = {"embed.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight, "lm_head.weight": hf.lm_head.weight}
    for index, block in enumerate(hf.model.layers):
        attn, mlp = block.self_attn, block.mlp
        state |= {
            f"layers.{index}.norm1.weight": block.input_layernorm.weight,
            f"layers.{index}.norm2.weight": block.post_attention_layernorm.weight,
            f"layers.{index}.attn.qkv.weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            f"layers.{index}.attn.out.weight": attn.o_proj.weight,
            f"layers.{index}.mlp.fc1.weight": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            f"layers.{index}.mlp.fc2.weight": mlp.down_proj.weight,
        }
    ours.load_state_dict({key: value.detach().clone() for key, value in state.items()}, strict=True)
    return ours.eval()


HF_NAMES = {("attn.qkv", "q"): "self_attn.q_proj", ("attn.qkv", "k"): "self_attn.k_proj", ("attn.qkv", "v"): "self_attn.v_proj",
            ("attn.out", "all"): "self_attn.o_proj", ("mlp.fc1", "gate"): "mlp.gate_proj", ("mlp.fc1", "up"): "mlp.up_proj",
            ("mlp.fc2", "all"): "mlp.down_proj"}


def translate(path, slice_name):
    """The toy twin's name translator: (our module path, slice) -> HF Llama module path, or None."""
    found = re.fullmatch(r"layers\.(\d+)\.(attn\.qkv|attn\.out|mlp\.fc1|mlp\.fc2)", path)
    name = found and HF_NAMES.get((found.group(2), slice_name))
    return f"model.layers.{found.group(1)}.{name}" if name else None


TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def test_fused_twin_matches_hf_llama():
    hf = _hf_llama()
    with torch.no_grad():
        torch.testing.assert_close(_fused_from_hf(hf)(TOKENS), hf(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    from vlmkit.interop.peft import ADAPTER_CONFIG, save_peft_adapter

    hf = _hf_llama()
    ours = apply_lora(_fused_from_hf(hf), ["attn.qkv:q,v", "mlp.fc1:gate,up", "attn.out"], rank=4, alpha=8.0)
    _randomize_adapters(ours, std=0.2)
    save_peft_adapter(ours, tmp_path / "adapter", translate, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"]) == ("LORA", 4, 8.0, "none")
    assert "model.layers.1.self_attn.v_proj" in config["target_modules"] and len(config["target_modules"]) == 5 * DEPTH
    with torch.no_grad():
        base = hf(TOKENS).logits
        loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        expected = ours(TOKENS)
        torch.testing.assert_close(loaded(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the adapters change the outputs, so the match means something
    merge_lora(ours)
    assert ours.layers[0].attn.qkv.lora_slices["v"] == (48, 64)  # the declared layout survives the merge
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_into_our_twin_with_the_same_outputs(tmp_path):
    from vlmkit.interop.peft import load_peft_adapter, save_peft_adapter

    hf = _hf_llama()
    ours = _fused_from_hf(hf)
    with torch.no_grad():
        base = hf(TOKENS).logits
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(hf, config).eval()
    adapted.save_pretrained(tmp_path / "peft")
    load_peft_adapter(ours, tmp_path / "peft", translate)
    assert set(ours.layers[0].attn.qkv.slices) == {"q", "k"} and set(ours.layers[0].mlp.fc1.slices) == {"up"}
    with torch.no_grad():
        expected = adapted(input_ids=TOKENS).logits
        torch.testing.assert_close(ours(TOKENS), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2
    # And back out again: the round trip gives PEFT's own tensors under PEFT's own keys.
    from vlmkit.io import load_safetensors

    save_peft_adapter(ours, tmp_path / "again", translate)
    original, again = load_safetensors(tmp_path / "peft" / "adapter_model.safetensors"), load_safetensors(tmp_path / "again" / "adapter_model.safetensors")
    assert set(original) == set(again) and all(torch.equal(original[key], again[key]) for key in original)


def test_untranslatable_layers_and_foreign_options_are_user_errors(tmp_path):
    from vlmkit.interop.peft import ADAPTER_CONFIG, load_peft_adapter, save_peft_adapter

    ours = apply_lora(FusedLlama(), ["lm_head"], rank=2)
    with pytest.raises(UserError, match="no HF counterpart"):
        save_peft_adapter(ours, tmp_path / "a", translate)
    ours = apply_lora(FusedLlama(), ["attn.out"], rank=2)
    save_peft_adapter(ours, tmp_path / "b", translate)
    config_path = tmp_path / "b" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_peft_adapter(FusedLlama(), tmp_path / "b", translate)
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="no layer of this model"):
        load_peft_adapter(FusedLlama(), tmp_path / "b", lambda path, name: None)
