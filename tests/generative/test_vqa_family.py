"""The VQA / reasoning classifier: answer vocabulary, soft scores, and its spatial-relation option
(the soft-argmax pointer, grounding targets, the offset readout)."""
import json

import pytest
import torch


def _records(synth_data, n):
    records = [json.loads(line) for line in (synth_data / "train.jsonl").read_text().splitlines()[:n]]
    for record in records:
        record["image"] = str(synth_data / record["image"])
    return records


def test_vqa_answer_vocabulary_comes_from_the_training_answers():
    from vlmkit.models.vqa import VQAClassifier

    records = [{"qa": [{"question": "q", "answer": "Two", "type": "count"}, {"question": "q", "answer": "yes", "type": "yesno"}]},
               {"qa": [{"question": "q", "answers": ["yes", "yes", "no"], "type": "yesno"}]}]
    config = VQAClassifier.adapt_config_to_data({"max_answers": 2}, records)
    assert config["answers"] == ["yes", "2"]  # normalised ("Two" -> "2"), most frequent first, capped
    assert VQAClassifier.adapt_config_to_data({}, [{"statements": [{"text": "t", "label": True}]}]) == {}  # no qa: unchanged


def test_a_vqa_model_without_answers_is_a_clear_error():
    import vlmkit
    from vlmkit.errors import UserError
    from vlmkit.models.vqa import VQAClassifier, VQAConfig

    assert VQAConfig().answers == ()  # no built-in vocabulary
    with pytest.raises(UserError, match=r"pass answers=\[\.\.\.\] .* or train it on records with 'qa'"):
        vlmkit.create_model("vqa-tiny")
    model = vlmkit.create_model("vqa-tiny", **VQAClassifier.example_config)
    assert model.config.answers == tuple(VQAClassifier.example_config["answers"])
    assert model.answer_head.fc2.out_features == len(VQAClassifier.example_config["answers"])


def test_soft_scores_follow_vqa_v2():
    from vlmkit.models.vqa import soft_scores

    assert soft_scores(["yes"] * 2 + ["no"] * 8) == {"yes": pytest.approx(2 / 3), "no": 1.0}
    assert soft_scores(["Two"]) == {"2": 1.0}


def test_soft_argmax_pointer_points_at_the_matching_cell():
    from vlmkit.models.vqa import SoftArgmaxPointer, grid_centres

    assert grid_centres(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # row-major (x, y)
    pointer = SoftArgmaxPointer(4, 4, grid_size=2, dim=4)
    with torch.no_grad():
        pointer.query.weight.copy_(torch.eye(4) * 20), pointer.key.weight.copy_(torch.eye(4) * 20)
        pointer.query.bias.zero_(), pointer.key.bias.zero_()
    grid = torch.eye(4)[None]  # (1, 4 cells, 4): cell i holds feature i
    points, weights = pointer(torch.eye(4)[None, [2, 1]], grid)  # queries for cells 2 and 1
    assert torch.allclose(points[0], torch.tensor([[0.25, 0.75], [0.75, 0.25]]), atol=1e-3)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 2))


def test_offset_readout_reads_the_slots_positions():
    """With the slots on tokens 1 and 2, the offset is the difference of those tokens' points."""
    from vlmkit.models.vqa import OffsetReadout

    readout = OffsetReadout(dim=4, vocab_size=10)
    tokens = torch.zeros(1, 4, 4)
    tokens[0, 1, 0] = tokens[0, 2, 1] = 1.0  # token 1 is "first", token 2 "second"
    with torch.no_grad():
        readout.slots.weight.copy_(torch.tensor([[50.0, 0, 0, 0], [0, 50.0, 0, 0]]))
        readout.slots.bias.zero_()
    points = torch.tensor([[[0.5, 0.5], [0.2, 0.7], [0.9, 0.1], [0.0, 0.0]]])
    real = torch.tensor([[True, True, True, False]])
    feature, offset = readout(tokens, points, torch.tensor([[1, 2, 3, 0]]), real)
    assert torch.allclose(offset, torch.tensor([[0.2 - 0.9, 0.7 - 0.1]]), atol=1e-4)
    assert feature.shape == (1, 4)
    # padding never takes part: moving the padded token's point changes nothing
    points[0, 3] = torch.tensor([1.0, 1.0])
    assert torch.allclose(readout(tokens, points, torch.tensor([[1, 2, 3, 0]]), real)[1], offset)


def test_grounding_targets_mark_the_named_tokens_after_the_crop(tokenizer, synth_data):
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.vqa import QuestionStatementDataset, VQATraining

    records = _records(synth_data, 40)
    transform = ImageTransform(64, train=True)
    options = VQATraining(statement_fraction=0.5, grounding_fraction=0.5, ground_mentions=True)
    dataset = QuestionStatementDataset(records, transform, tokenizer, ("yes", "no"), options)
    batch = dataset.collate([dataset[i] for i in range(len(records))])
    assert batch["is_grounding"].any() and (~batch["is_grounding"]).any()
    for row in batch["is_grounding"].nonzero().flatten().tolist():
        text, index = batch["texts"][row], batch["indices"][row].item()
        name = text.removeprefix("the ")
        box = next(item["box"] for item in records[index]["objects"] if item["name"] == name)
        image = dataset._image_cache[index]
        expected = transform.output_point(image.width, image.height, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2,
                                          dataset.transform_rng(index))
        real = batch["tokens"][row] != tokenizer.pad_id
        assert batch["point_mask"][row].sum() == real.sum() - 2  # every token of the phrase but start/end
        assert torch.allclose(batch["point_targets"][row][batch["point_mask"][row]], torch.tensor(expected))
    mentions = [row for row, text in enumerate(batch["texts"]) if not batch["is_grounding"][row]
                and any(item["name"] in text for item in records[batch["indices"][row].item()]["objects"])]
    assert mentions and all(batch["point_mask"][row].any() for row in mentions)
    # With grounding off (the defaults) nothing is marked.
    plain = QuestionStatementDataset(records, transform, tokenizer, ("yes", "no"), VQATraining(statement_fraction=0.5))
    assert not plain.collate([plain[i] for i in range(8)])["point_mask"].any()


def test_pair_offsets_and_balanced_question_types(tokenizer, synth_data):
    from collections import Counter

    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.vqa import QuestionStatementDataset, VQATraining

    records = _records(synth_data, 200)
    transform = ImageTransform(64)  # eval transform: box centres map without a random crop
    options = VQATraining(statement_fraction=0.0, ground_mentions=True, balance_question_types=True)
    dataset = QuestionStatementDataset(records, transform, tokenizer, ("yes", "no"), options)
    samples = [dataset[i] for i in range(len(records))]
    batch = dataset.collate(samples)
    relation_rows = [row for row, sample in enumerate(samples) if " left of " in sample["text"] or " right of " in sample["text"]
                     or " above " in sample["text"] or " below " in sample["text"]]
    assert relation_rows and batch["has_offset"][relation_rows].all()
    for row in relation_rows:
        text, record = samples[row]["text"], records[batch["indices"][row].item()]
        named = sorted((text.index(f"the {o['name']}"), o["box"]) for o in record["objects"] if f"the {o['name']}" in text)
        (_, first), (_, second) = named[:2]
        image = dataset._image_cache[batch["indices"][row].item()]
        a = transform.output_point(image.width, image.height, (first[0] + first[2]) / 2, (first[1] + first[3]) / 2)
        b = transform.output_point(image.width, image.height, (second[0] + second[2]) / 2, (second[1] + second[3]) / 2)
        assert torch.allclose(batch["pair_offsets"][row], torch.tensor([a[0] - b[0], a[1] - b[1]]), atol=1e-6)
    assert not batch["has_offset"][[row for row, s in enumerate(samples) if s["text"].startswith("how many objects")]].any()

    # balanced: over many epochs each type of a multi-type record comes up about equally often
    def uneven(record):  # several types, some with more questions than others
        counts = Counter(q["type"] for q in record["qa"])
        return len(counts) >= 4 and max(counts.values()) >= 2 * min(counts.values())

    record = next(r for r in records if uneven(r))
    single = QuestionStatementDataset([record], transform, tokenizer, ("yes", "no"),
                                      VQATraining(statement_fraction=0.0, balance_question_types=True))
    drawn = Counter()
    for epoch in range(600):
        single.set_epoch(epoch)
        drawn[next(q["type"] for q in record["qa"] if q["question"] == single[0]["text"])] += 1
    types = {q["type"] for q in record["qa"]}
    assert set(drawn) == types and min(drawn.values()) > 600 / len(types) * 0.7


def test_vqa_grounding_and_offset_losses_train_and_round_trip(tokenizer, tmp_path, tiny_model):
    from vlmkit.models.registry import get_family

    model = tiny_model("vqa-tiny", tokenizer, **{"training.grounding_fraction": 0.5, "training.ground_mentions": True,
                                                 "training.offset_weight": 1.0}).train()
    batch = model.dummy_batch(3)
    batch["point_mask"] = torch.zeros(3, batch["tokens"].shape[1], dtype=torch.bool)
    batch["point_mask"][0, 1:3] = True
    batch["point_targets"] = torch.full((3, batch["tokens"].shape[1], 2), 0.2)
    batch["has_offset"] = torch.tensor([True, False, True])
    batch["pair_offsets"] = torch.tensor([[0.4, -0.1], [0.0, 0.0], [-0.3, 0.2]])
    output = model(batch)
    assert {"grounding_loss", "offset_loss", "vqa_loss", "reasoning_loss", "loss"} <= set(output.logs)
    assert all(torch.is_tensor(value) and not value.requires_grad for value in output.logs.values())  # detached
    output.loss.backward()
    readout = model.offset_readout
    assert model.pointer.query.weight.grad.abs().sum() > 0 and readout.slots.weight.grad.abs().sum() > 0
    assert readout.words.weight.grad.abs().sum() > 0
    model.eval().save_pretrained(tmp_path)
    loaded = get_family(model.family).from_pretrained(tmp_path)  # the grid is rebuilt, not left on `meta`
    pixels, questions = batch["pixels"], ["is the red circle left of the blue square?"] * 3
    assert model.answer(pixels, questions) == loaded.answer(pixels, questions)
    _, points, offset = loaded.fused(pixels, loaded.tokenize(questions))
    assert torch.isfinite(points).all() and points.min() >= 0 and points.max() <= 1
    assert offset.shape == (3, 2) and offset.abs().max() <= 1


def test_the_spatial_relation_option_is_off_by_default_and_checked(tokenizer, tiny_model):
    from vlmkit.errors import UserError

    plain = tiny_model("vqa-tiny", tokenizer, pointer=False, offset_readout=False)
    assert plain.pointer is None and plain.offset_readout is None
    _, points, offset = plain.fused(plain.dummy_batch(2)["pixels"], plain.dummy_batch(2)["tokens"])
    assert points is None and offset is None
    with pytest.raises(UserError, match="offset_readout"):
        tiny_model("vqa-tiny", tokenizer, offset_readout=False, **{"training.offset_weight": 1.0})
    with pytest.raises(UserError, match="pointer"):
        tiny_model("vqa-tiny", tokenizer, pointer=False, offset_readout=False, **{"training.ground_mentions": True})
    with pytest.raises(UserError, match="set pointer: true"):
        tiny_model("vqa-tiny", tokenizer, pointer=False)  # the readout without the pointer
