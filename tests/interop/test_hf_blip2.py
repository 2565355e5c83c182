"""HF Blip2ForConditionalGeneration folders (a tiny Llama LM) load into `blip2_lm` strictly and exactly.

A random tiny HF model (ViT 16 px / patch 8 / width 32 / 2 layers; a 3-layer query-only Q-Former of
width 32 with 4 queries, cross-attention in layers 0 and 2; Llama width 32 / 1 layer / 2 kv heads),
perturbed so no swapped weight can hide, saved with save_pretrained.
"""
import json

import pytest
import torch

import vlmkit
from vlmkit.errors import UserError

from interop_helpers import randomise_, transformers

NUM_QUERIES = 4
IMAGE_TOKEN = 119  # HF's processor writes NUM_QUERIES copies of it in front of the text


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                           patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=100, cross_attention_frequency=2),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=120, max_position_embeddings=64, tie_word_embeddings=False),
        num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    randomise_(model, seed=1)
    path = tmp_path_factory.mktemp("hf_blip2") / "model"
    model.save_pretrained(path)
    return path, model


def test_blip2_loads_strictly_and_its_caption_logits_match_hf(folder):
    path, hf = folder
    model = vlmkit.load(path)
    assert model.family == "blip2_lm"
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    ids = torch.randint(3, 120, (2, 7), generator=generator)
    with torch.no_grad():
        expanded = torch.cat([torch.full((2, NUM_QUERIES), IMAGE_TOKEN), ids], dim=1)
        theirs = hf(pixel_values=pixels, input_ids=expanded).logits[:, -ids.shape[1]:]
        prompt = model.soft_prompt(pixels)  # (B, Nq, D)
        ours = model.lm(inputs_embeds=torch.cat([prompt, model.lm.embed_tokens(ids)], dim=1))[:, NUM_QUERIES:]
        image_ours = model.query_encoder.image_features(pixels)
        image_theirs = hf.vision_model(pixel_values=pixels).last_hidden_state
    assert (image_ours - image_theirs).abs().max() < 1e-5  # ln_vision = post_layernorm
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5


def test_blip2_exports_back_and_hf_reads_the_same_model(folder, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    path, hf = folder
    model = vlmkit.load(path)
    model.save_pretrained(tmp_path / "out", format="hf")
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert torch.equal(vlmkit.load(tmp_path / "out").state_dict()["language_projection.weight"], model.language_projection.weight)
    with pytest.raises(UserError, match="image_token_id"):
        plain = vlmkit.create_model("blip2-tiny-stage2", **{"vision.norm_pre": False, "vision.patch_bias": True})
        plain.save_pretrained(tmp_path / "none", format="hf")
    assert not (tmp_path / "none" / "config.json").exists()


def test_settings_vlmkit_does_not_implement_are_one_sentence(folder, tmp_path):
    import shutil

    path, _ = folder
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    config = json.loads((broken / "config.json").read_text())
    config["qformer_config"]["use_qformer_text_input"] = True
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="use_qformer_text_input"):
        vlmkit.load(broken)
    config["qformer_config"]["use_qformer_text_input"] = False
    config["text_config"]["model_type"] = "opt"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="Llama"):
        vlmkit.load(broken)
