"""HF VisualBERT <-> vlmkit visualbert: random tiny VisualBertModel / ForPreTraining / ForQuestionAnswering
folders load in vlmkit with outputs within 1e-5 on the same visual features and boxes, and export back."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlmkit  # noqa: E402
from vlmkit.encoders.regions import box_geometry  # noqa: E402

FEATURES, WIDTH = 13, 32  # backbone feature width; visual_embeds = [feature ; 7-d box geometry]


def _config(**extra):
    return transformers.VisualBertConfig(vocab_size=61, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, visual_embedding_dim=FEATURES + 7, max_position_embeddings=24,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **extra)


def _inputs():
    """Token ids with padding, region features + boxes (and a padded region) -> both models' inputs."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 61, (3, 9), generator=generator)
    tokens[1, 6:] = 0  # padding
    tokens[2, 4:] = 0
    features = torch.randn(3, 5, FEATURES, generator=generator)
    corners = torch.rand(3, 5, 2, generator=generator) * 32
    boxes = torch.cat([corners, corners + 4 + torch.rand(3, 5, 2, generator=generator) * 28], dim=-1)
    visual_embeds = torch.cat([features, box_geometry(boxes, 64)], dim=-1)  # what vlmkit's visualbert reads
    visual_mask = torch.ones(3, 5, dtype=torch.long)
    visual_mask[2, 3:] = 0
    return tokens, (tokens != 0).long(), visual_embeds, visual_mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, kind, extra in (("model", transformers.VisualBertModel, {}),
                              ("pretraining", transformers.VisualBertForPreTraining, {}),
                              ("qa", transformers.VisualBertForQuestionAnswering,
                               {"num_labels": 4, "id2label": {0: "yes", 1: "no", 2: "red", 3: "2"}})):
        model = kind(_config(**extra)).eval()
        with torch.no_grad():  # non-trivial LayerNorms and biases, so a swapped key shows
            for key, value in model.state_dict().items():
                if "LayerNorm" in key or key.endswith("bias"):
                    value.add_(torch.randn(value.shape) * 0.1)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def test_visualbert_model_matches_hf(folders):
    folder, hf = folders["model"]
    ours = vlmkit.load(folder)
    assert ours.family == "visualbert" and ours.config.vision is None
    tokens, text_mask, embeds, visual_mask = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=text_mask, visual_embeds=embeds, visual_attention_mask=visual_mask)
        mine = ours.forward_features(tokens, embeds, visual_mask.bool())
    real = torch.cat([text_mask, visual_mask], dim=1).bool()
    assert torch.allclose(mine["hidden"][real], theirs.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(mine["pooled"], theirs.pooler_output, atol=1e-5)
    assert (mine["hidden"] - theirs.last_hidden_state).abs()[real].max() < 1e-5


def test_pretraining_heads_match_hf_and_itm_is_swapped(folders):
    folder, hf = folders["pretraining"]
    ours = vlmkit.load(folder)
    tokens, text_mask, embeds, visual_mask = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=text_mask, visual_embeds=embeds, visual_attention_mask=visual_mask)
        mine = ours.forward_features(tokens, embeds, visual_mask.bool())
    real = text_mask.bool()
    assert torch.allclose(mine["mlm_logits"][real], theirs.prediction_logits[:, :tokens.shape[1]][real], atol=1e-5)
    # HF: 0 = match; vlmkit: 1 = match
    assert torch.allclose(mine["itm_logits"], theirs.seq_relationship_logits.flip(-1), atol=1e-5)


def test_question_answering_matches_hf_and_round_trips(folders, tmp_path):
    folder, hf = folders["qa"]
    ours = vlmkit.load(folder)
    assert ours.config.answers == ("yes", "no", "red", "2") and ours.config.answer_pool == "last_text"
    tokens, text_mask, embeds, visual_mask = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=text_mask, visual_embeds=embeds, visual_attention_mask=visual_mask)
        mine = ours.forward_features(tokens, embeds, visual_mask.bool())
    assert torch.allclose(mine["answer_logits"], theirs.logits, atol=1e-5)  # read at the last text token
    ours.save_pretrained(tmp_path / "hf", format="hf")
    again = transformers.VisualBertForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    for key, value in hf.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    reloaded = vlmkit.load(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(reloaded.forward_features(tokens, embeds, visual_mask.bool())["answer_logits"],
                              mine["answer_logits"], atol=1e-6)


def test_pretraining_export_round_trips(folders, tmp_path):
    folder, hf = folders["pretraining"]
    vlmkit.load(folder).save_pretrained(tmp_path / "hf", format="hf")
    again = transformers.VisualBertForPreTraining.from_pretrained(tmp_path / "hf")
    for key, value in hf.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_a_model_with_an_image_tower_is_not_written_as_hf(tmp_path):
    from vlmkit.errors import UserError

    model = vlmkit.create_model("visualbert-tiny")
    with pytest.raises(UserError, match="no image tower"):
        model.save_pretrained(tmp_path / "x", format="hf")
    assert not (tmp_path / "x" / "config.json").exists()
