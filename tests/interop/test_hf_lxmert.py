"""HF transformers LXMERT folders: fp32 parity on load (language, vision, pooled, QA logits, pre-training heads),
strict keys, export back."""
import json

import pytest
import torch

import vlmkit
from vlmkit.errors import UserError

from interop_helpers import randomise_, transformers

TOLERANCE = 1e-5
VOCAB, FEAT, REGIONS, ANSWERS, OBJECTS, ATTRIBUTES = 90, 20, 6, 7, 11, 5


def _hf_config(**changes):
    """A tiny LxmertConfig: every stack present, an MLP ratio that is not 4, visual features not the width."""
    return transformers.LxmertConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=56, l_layers=2, r_layers=2,
        x_layers=2, visual_feat_dim=FEAT, visual_pos_dim=4, max_position_embeddings=24, num_qa_labels=ANSWERS,
        num_object_labels=OBJECTS, num_attr_labels=ATTRIBUTES, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0), **changes})


def _save(cls, folder, seed, **changes):
    torch.manual_seed(seed)
    hf = cls(_hf_config(**changes)).eval()
    randomise_(hf, seed)
    hf.save_pretrained(folder)
    return cls.from_pretrained(folder).eval()  # what the folder holds, as HF reads it


def _inputs():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB - 3, (3, 9), generator=generator)
    ids[:, 0] = 1  # [CLS]-like
    ids[0, 6:] = 0  # a padded row: pad id 0, masked out on both sides
    attention = (ids != 0).long()
    feats = torch.rand(3, REGIONS, FEAT, generator=generator)
    corners = torch.rand(3, REGIONS, 2, 2, generator=generator).sort(dim=2).values
    boxes = corners.transpose(2, 3).reshape(3, REGIONS, 4)  # normalised [x0, y0, x1, y1]
    return ids, attention, feats, boxes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_lxmert")
    return _save(transformers.LxmertModel, folder, seed=1), folder


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_lxmert_qa")
    return _save(transformers.LxmertForQuestionAnswering, folder, seed=2), folder


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_lxmert_pretraining")
    return _save(transformers.LxmertForPreTraining, folder, seed=4), folder


def _differences(hf_out, ours, ids, feats, boxes, visual_mask=None):
    language, vision, pooled = ours.encode(ids, feats, boxes, visual_mask=visual_mask)
    real = ids != 0  # padded positions are garbage on both sides and never read
    return ((language - hf_out.language_output)[real].abs().max().item(),
            (vision - hf_out.vision_output).abs().max().item(),
            (pooled - hf_out.pooled_output).abs().max().item())


def test_hf_lxmert_model_loads_strictly_with_the_same_outputs(base):
    hf, folder = base
    ours = vlmkit.load(folder)
    assert ours.family == "lxmert" and ours.heads.answer is None and not ours.config.pretraining_heads
    assert ours.capabilities == ()  # no image tower: it reads features, as HF
    ids, attention, feats, boxes = _inputs()
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes)
        differences = _differences(hf_out, ours, ids, feats, boxes)
        # a visual mask (padded regions) is honoured the same way on both sides
        visual_mask = torch.ones(3, REGIONS, dtype=torch.bool)
        visual_mask[1, 4:] = False
        hf_masked = hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes,
                       visual_attention_mask=visual_mask.long())
        masked = ours.encode(ids, feats, boxes, visual_mask=visual_mask)[2]
    assert hf_out.pooled_output.abs().mean() > 0.05  # not a degenerate comparison
    assert max(differences) < TOLERANCE, differences
    assert (masked - hf_masked.pooled_output).abs().max() < TOLERANCE
    assert (masked[1] - hf_out.pooled_output[1]).abs().max() > 1e-4  # the mask changed something


def test_hf_lxmert_question_answering_loads_with_the_same_scores_and_exports_back(qa, tmp_path):
    hf, folder = qa
    ours = vlmkit.load(folder)
    assert len(ours.config.answers) == ANSWERS
    ids, attention, feats, boxes = _inputs()
    with torch.no_grad():
        hf_scores = hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes).question_answering_score
        scores = ours.answer_logits(ids, feats, boxes)
    assert (scores - hf_scores).abs().max() < TOLERANCE
    # export back: HF reads our folder into the same scores, and every tensor is bit-identical
    ours.save_pretrained(tmp_path / "out", format="hf")
    again = transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "out").eval()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LxmertForQuestionAnswering"]
    original = hf.state_dict()
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=attention, visual_feats=feats,
                                 visual_pos=boxes).question_answering_score, hf_scores)


def _pretraining_differences(hf, ours, ids, attention, feats, boxes):
    """name -> max |ours - HF| of the MLM, ITM, masked-region and answer heads' outputs on the same inputs."""
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes)
        vision = hf.lxmert(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes).vision_output
        theirs = {"mlm": hf_out.prediction_logits, "itm": hf_out.cross_relationship_score,
                  **hf.obj_predict_head(vision)}  # HF's own region head on its own encoder's output
        if hf.config.task_qa:
            theirs["answer"] = hf_out.question_answering_score
        ours_out = ours.pretraining_logits(ids, feats, boxes)
    assert set(ours_out) == set(theirs), (set(ours_out), set(theirs))
    real = ids != 0  # padded positions are garbage on both sides and never read
    assert theirs["mlm"][real].abs().mean() > 0.05 and theirs["obj"].abs().mean() > 0.05  # not degenerate
    return {name: ((ours_out[name] - tensor)[real] if name == "mlm" else ours_out[name] - tensor).abs().max().item()
            for name, tensor in theirs.items()}


def _assert_round_trip(hf, ours, folder):
    """HF -> vlmkit -> HF: the same class, config flags and bit-identical tensors."""
    ours.save_pretrained(folder, format="hf")
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["LxmertForPreTraining"]
    for flag in ("task_qa", "task_obj_predict", "visual_obj_loss", "visual_attr_loss", "visual_feat_loss"):
        assert written[flag] == getattr(hf.config, flag), flag
    again = transformers.LxmertForPreTraining.from_pretrained(folder).eval()
    again_state, original = again.state_dict(), hf.state_dict()
    assert set(again_state) == set(original)
    for key, tensor in again_state.items():
        assert torch.equal(tensor, original[key]), key


def test_hf_lxmert_pretraining_loads_every_head_with_the_same_outputs_and_exports_back(pretraining, tmp_path):
    hf, folder = pretraining
    ours = vlmkit.load(folder)
    config = ours.config
    assert config.pretraining_heads and ours.heads.reasoning is None and len(config.answers) == ANSWERS
    assert (config.num_object_labels, config.num_attr_labels) == (OBJECTS, ATTRIBUTES)
    ids, attention, feats, boxes = _inputs()
    differences = _pretraining_differences(hf, ours, ids, attention, feats, boxes)
    assert set(differences) == {"mlm", "itm", "feat", "obj", "attr", "answer"}
    assert max(differences.values()) < TOLERANCE, differences
    _assert_round_trip(hf, ours, tmp_path / "out")


def test_hf_lxmert_pretraining_without_the_attribute_and_qa_heads_loads_without_them(tmp_path):
    hf = _save(transformers.LxmertForPreTraining, tmp_path / "in", seed=5, visual_attr_loss=False, task_qa=False)
    ours = vlmkit.load(tmp_path / "in")
    assert ours.heads.answer is None and set(ours.region_head.decoders) == {"feat", "obj"}
    ids, attention, feats, boxes = _inputs()
    differences = _pretraining_differences(hf, ours, ids, attention, feats, boxes)
    assert max(differences.values()) < TOLERANCE, differences
    _assert_round_trip(hf, ours, tmp_path / "out")
    # the loaded model trains: every head it carries is in the loss
    ours.train()
    batch = {"tokens": ids, "mlm_labels": torch.where(ids > 4, ids, -100), "itm_labels": torch.tensor([1, 0, 1]),
             "visual_feats": feats, "visual_pos": boxes, "region_labels": torch.randint(OBJECTS, (3, REGIONS))}
    ours.training_options = ours.training_class()
    out = ours(batch)
    assert {"mlm_loss", "itm_loss", "feat_loss", "obj_loss"} <= set(out.logs) and torch.isfinite(out.loss)


@pytest.mark.parametrize("changes, flag", [({"visual_feat_loss": False}, "visual_feat_loss"),
                                           ({"task_obj_predict": False}, "task_obj_predict")])
def test_hf_lxmert_pretraining_without_the_feature_head_is_refused_in_one_line(tmp_path, changes, flag):
    _save(transformers.LxmertForPreTraining, tmp_path, seed=6, **changes)
    with pytest.raises(UserError, match=flag):
        vlmkit.load(tmp_path)


def test_an_untied_mlm_decoder_is_refused(pretraining, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = pretraining
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    state["cls.predictions.decoder.weight"] = state["lxmert.embeddings.word_embeddings.weight"] + 1.0
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="cls.predictions.decoder.weight differs"):
        vlmkit.load(tmp_path)


def test_a_pretrained_vlmkit_lxmert_exports_its_heads_and_notes_what_hf_cannot_hold(tmp_path, capsys):
    torch.manual_seed(0)
    model = vlmkit.create_model("lxmert-tiny", answers=["yes", "no", "2"]).eval()
    model.save_pretrained(tmp_path, format="hf")
    note = capsys.readouterr().err
    assert "heads.reasoning" in note and "visual" in note and "mlm_head" not in note
    hf = transformers.LxmertForPreTraining.from_pretrained(tmp_path).eval()
    batch = model.dummy_batch(2)
    tokens = batch["tokens"]
    with torch.no_grad():
        visual = model.visual_features(batch)  # our image tower's region features, what HF is given
        hf_out = hf(input_ids=tokens, attention_mask=(tokens != 0).long(), visual_feats=visual["feats"],
                    visual_pos=visual["pos"], visual_attention_mask=visual["mask"].long())
        ours = model.pretraining_logits(tokens, visual["feats"], visual["pos"], visual["mask"])
    real = tokens != 0
    assert (ours["answer"] - hf_out.question_answering_score).abs().max() < TOLERANCE
    assert (ours["itm"] - hf_out.cross_relationship_score).abs().max() < TOLERANCE
    assert (ours["mlm"] - hf_out.prediction_logits)[real].abs().max() < TOLERANCE


def test_a_checkpoint_with_a_missing_tensor_is_a_clear_error(base, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = base
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    state.pop(next(key for key in state if "x_layers.1.visual_attention.att.key.weight" in key))
    save_file(state, broken / "model.safetensors")
    with pytest.raises(UserError, match="x_layers.1.visual_attention.att.key.weight"):
        vlmkit.load(broken)


def test_the_pretraining_losses_run_the_heads_on_labelled_positions_only_with_the_all_position_values(pretraining):
    """The training forward runs the MLM head on the masked tokens and the region head on the masked regions
    only; its losses equal the same losses computed from every position's logits (HF's MLM logits, the
    family's own region outputs), and the gradient reaches every head."""
    import torch.nn.functional as F

    from vlmkit.encoders.fusion import IGNORE
    from vlmkit.encoders.twostream import mask_regions

    hf, folder = pretraining
    ours = vlmkit.load(folder)
    ids, attention, feats, boxes = _inputs()
    matched = torch.tensor([1, 0, 1])
    mlm_labels = torch.full_like(ids, IGNORE)
    mlm_labels[0, 2], mlm_labels[2, 3], mlm_labels[2, 5] = ids[0, 2], ids[2, 3], ids[2, 5]
    tokens = ids.masked_fill(mlm_labels != IGNORE, 4)
    objects = torch.randint(OBJECTS, (3, REGIONS), generator=torch.Generator().manual_seed(5))
    attributes = torch.randint(ATTRIBUTES, (3, REGIONS), generator=torch.Generator().manual_seed(6))
    batch = {"tokens": tokens, "mlm_labels": mlm_labels, "itm_labels": matched, "visual_feats": feats,
             "visual_pos": boxes, "region_labels": objects, "region_attr_labels": attributes, "batch_seed": 11}
    ours.train()
    out = ours(batch)
    out.loss.backward()
    masked = mask_regions(matched.bool()[:, None].expand(3, REGIONS), 0.15,
                          torch.Generator().manual_seed(11))
    assert masked.any() and not masked[1].any()  # only matched pairs' regions
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=attention, visual_feats=feats.masked_fill(masked[..., None], 0.0),
                       visual_pos=boxes).prediction_logits  # (B, L, V) at every position
        full = ours.pretraining_logits(tokens, feats.masked_fill(masked[..., None], 0.0), boxes)
    mlm = F.cross_entropy(hf_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE)
    assert out.logs["mlm_loss"] == pytest.approx(mlm.item(), abs=1e-5)
    assert out.logs["feat_loss"] == pytest.approx(F.smooth_l1_loss(full["feat"][masked], feats[masked]).item(), abs=1e-6)
    for name, labels in (("obj", objects), ("attr", attributes)):
        expected = F.cross_entropy(full[name][masked], labels[masked])  # KL to a one-hot = cross-entropy
        assert out.logs[f"{name}_loss"] == pytest.approx(expected.item(), abs=1e-5)
    for head in (ours.mlm_head, ours.region_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
