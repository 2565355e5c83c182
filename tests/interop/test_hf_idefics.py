"""A random-initialised tiny HF IdeficsForVisionText2Text, saved with save_pretrained, loads into the
`flamingo` family with logits within 1e-5 of HF's (and unsupported IDEFICS options are one UserError each).

Tiny shapes: CLIP-style vision 16 px / patch 8 / width 32 / 2 layers; a 2-layer resampler with 4
latents; a Llama decoder width 64 / 4 layers / 4 heads with a gated cross-attention layer before
layers 0 and 2 (cross_layer_interval 2). Every weight is perturbed (`randomise_`) and the gates opened,
so neither a swapped tensor nor a closed gate can hide.
"""
import json

import pytest
import torch

import vlmkit
from vlmkit.errors import UserError

from interop_helpers import randomise_, transformers

VOCAB, IMAGE, FAKE = 100, 101, 100  # IDEFICS adds <fake_token_around_image> (100) then <image> (101)


def hf_config(**overrides):
    config = transformers.IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=2, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=64, cross_layer_interval=2, use_resampler=True,
        vision_config={"embed_dim": 32, "image_size": 16, "patch_size": 8, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "intermediate_size": 64},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 4, "resampler_depth": 2, "resampler_n_heads": 2,
                          "resampler_head_dim": 8},
        **overrides)
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(hf_config()).eval()
    randomise_(model, seed=1)
    with torch.no_grad():
        for layer in model.model.gated_cross_attn_layers:  # open the gates (zero at init)
            layer.alpha_cross_attn.fill_(0.7)
            layer.alpha_dense.fill_(-0.4)
    out = tmp_path_factory.mktemp("idefics")
    model.save_pretrained(out)
    return out, model


def _inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 14), generator=generator)
    ids[:, 0] = 1
    ids[0, [2, 3, 4]] = torch.tensor([FAKE, IMAGE, FAKE])  # image 1 after a little text
    ids[0, [8, 9, 10]] = torch.tensor([FAKE, IMAGE, FAKE])  # image 2
    ids[1, [1, 2, 3]] = torch.tensor([FAKE, IMAGE, FAKE])  # one image; its second image slot is padding
    pixels = torch.randn(2, 2, 3, 16, 16, generator=generator)
    # IDEFICS's processor mask: each token sees the most recent <image> at or before it (none before the first).
    latest = (ids == IMAGE).long().cumsum(dim=1)  # (B, T)
    image_attention_mask = torch.nn.functional.one_hot(latest, num_classes=3)[:, :, 1:]  # (B, T, 2)
    return ids, pixels, image_attention_mask


def test_random_idefics_loads_with_logits_within_1e5(folder):
    directory, hf = folder
    ids, pixels, image_attention_mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=image_attention_mask).logits  # (B, T, V+2)
    model = vlmkit.load(directory)
    assert model.family == "flamingo" and model.config.media_token_id == IMAGE and model.config.end_of_chunk_id == FAKE
    assert model.config.cross_attention_layers == [0, 2]
    with torch.no_grad():
        ours = model.logits(model.hidden(ids, model.media(pixels)))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < 1e-5, (ours - expected).abs().max()
    assert expected.abs().max() > 0.1  # real logits, not zeros
    # The gates matter here: closing them changes the logits (the comparison above is not the bare LM's).
    with torch.no_grad():
        for block in model.gated.values():
            block.attn_gate.zero_()
        assert (model.logits(model.hidden(ids, model.media(pixels))) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    ({"use_resampler": False, "perceiver_config": {"use_resampler": False}}, "no Perceiver Resampler"),
    ({"qk_layer_norms": True}, "query/key norms"),
    ({"alpha_type": "vector"}, "per-channel gates"),
])
def test_idefics_options_flamingo_lacks_are_one_clear_error(folder, tmp_path, overrides, message):
    directory, _ = folder
    config = json.loads((directory / "config.json").read_text())
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(UserError, match=message):
        vlmkit.load(tmp_path)


def test_idefics_exports_back_bit_identical_and_hf_gives_the_same_logits(folder, tmp_path):
    directory, hf = folder
    model = vlmkit.load(directory)
    model.save_pretrained(tmp_path / "out", format="hf")
    again = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path / "out").eval()
    original, exported = hf.state_dict(), again.state_dict()
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
    ids, pixels, image_attention_mask = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=image_attention_mask).logits
        logits = again(input_ids=ids, pixel_values=pixels, image_attention_mask=image_attention_mask).logits
    assert (logits - expected).abs().max() < 1e-5
    assert vlmkit.load(tmp_path / "out").config == model.config  # and back into vlmkit: the same flamingo config


def test_convert_cli_writes_idefics(folder, tmp_path, capsys):
    from vlmkit.cli import main

    directory, hf = folder
    assert main(["convert", str(directory), str(tmp_path / "hf"), "--to", "hf"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["family"] == "flamingo"
    again = transformers.IdeficsForVisionText2Text.from_pretrained(tmp_path / "hf").eval()
    assert all(torch.equal(tensor, again.state_dict()[key]) for key, tensor in hf.state_dict().items())


@pytest.mark.parametrize("overrides, message", [
    ({"cross_attention_offset": 1}, "cross_attention_offset 1"),
    ({"cross_attention_norm": "layernorm", "cross_attention_gated_mlp": False, "cross_attention_activation": "gelu"},
     "a cross-attention block with layernorm and a plain MLP"),
    ({"resampler": {"activation": "gelu"}}, "resampler activation 'gelu'"),
    ({"vision": {"conv_stem": [8]}}, "conv stem"),
    ({"lm": {"positions": "learned", "norm": "layernorm", "gated_mlp": False, "bias": True, "activation": "gelu_tanh",
             "tie_embeddings": True}, "cross_attention_activation": "gelu_tanh"}, "GPT-2 style"),
    ({"lm": {"norm": "layernorm"}}, "a non-Llama language model without RMSNorm "),  # a mix of the two styles
    ({"vision_tokens": "patches"}, "vision_tokens 'patches'"),
    ({"extra_tokens": ["<image>", "<|endofchunk|>"]}, "extra_tokens"),
])
def test_flamingo_idefics_cannot_express_is_one_line_and_writes_nothing(folder, tmp_path, overrides, message):
    directory, _ = folder
    config = vlmkit.load(directory).config_dict()["config"]
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    from vlmkit.models.registry import get_family

    model = get_family("flamingo").from_config_dict(config)
    with pytest.raises(UserError, match=message) as error:
        model.save_pretrained(tmp_path / "out", format="hf")
    assert "\n" not in str(error.value) and "format='vlmkit'" in str(error.value)
    assert not (tmp_path / "out").exists()
