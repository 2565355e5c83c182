"""Two-stream fusion encoders (ViLBERT, LXMERT) and MMCA: the co-attention layer against its formula,
MMCA's similarity and loss against theirs, and every fusion task through the families' datasets."""
import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.layers.attention import reference_attention
from vlmkit.layers.masks import padding_mask
from vlmkit.layers.transformer import CoAttentionBlock
from vlmkit.losses import hinge_triplet_loss, hinge_triplet_loss_from_scores


def _attend(attention, x, context, real=None):
    """softmax(QK^T / sqrt(d) + mask) V of a cross-attention module, written out."""
    query = attention._heads(attention.q(x), 1)[0]
    key, value = attention._heads(attention.kv(context), 2)
    mask = None if real is None else padding_mask(real)
    out = reference_attention(query, key, value, mask=mask)
    return attention.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _self(attention, x, real=None):
    query, key, value = attention._heads(attention.qkv(x), 3)
    out = reference_attention(query, key, value, mask=None if real is None else padding_mask(real))
    return attention.out(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("shared", [False, True])
def test_co_attention_block_is_its_formula_both_directions_reading_the_inputs(shared):
    torch.manual_seed(0)
    width_b = 32 if shared else 24
    block = CoAttentionBlock(32, 4, other_dim=width_b, other_heads=4, self_attention=shared, shared_cross=shared).eval()
    a, b = torch.randn(2, 5, 32), torch.randn(2, 7, width_b)
    real_a = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    real_b = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    cross_a, norm_a = (block.cross, block.norm_cross) if shared else (block.cross_a, block.norm_cross_a)
    cross_b, norm_b = (block.cross, block.norm_cross) if shared else (block.cross_b, block.norm_cross_b)
    with torch.no_grad():
        got_a, got_b = block(a, b, mask_a=padding_mask(real_a), mask_b=padding_mask(real_b))
        a1 = norm_a(a + _attend(cross_a, a, b, real_b))  # a's queries on b's keys / values
        b1 = norm_b(b + _attend(cross_b, b, a, real_a))  # b reads the block's input a, not a1
        if shared:
            a1 = block.norm1_a(a1 + _self(block.attn_a, a1, real_a))
            b1 = block.norm1_b(b1 + _self(block.attn_b, b1, real_b))
        want_a = block.norm2_a(a1 + block.mlp_a(a1))
        want_b = block.norm2_b(b1 + block.mlp_b(b1))
    assert torch.allclose(got_a, want_a, atol=1e-5) and torch.allclose(got_b, want_b, atol=1e-5)
    # a padded key of the other stream changes nothing
    b_changed = b.clone()
    b_changed[1, 4:] = 100.0
    with torch.no_grad():
        again_a, _ = block(a, b_changed, mask_a=padding_mask(real_a), mask_b=padding_mask(real_b))
    assert torch.allclose(again_a, got_a, atol=1e-5)
    if shared:  # one module (and its norm) for both directions, as HF's LxmertXLayer.visual_attention
        assert not hasattr(block, "cross_a") and sum("cross" in name for name, _ in block.named_children()) == 2
    with pytest.raises(ValueError, match="same width"):
        CoAttentionBlock(32, 4, other_dim=24, shared_cross=True)


def test_hinge_loss_from_scores_is_the_feature_version():
    torch.manual_seed(0)
    images, texts = torch.randn(6, 8), torch.randn(6, 8)
    loss, scores = hinge_triplet_loss(images, texts, margin=0.3)
    assert torch.equal(hinge_triplet_loss_from_scores(scores, margin=0.3), loss)
    positive = scores.diagonal()
    by_hand = 0.0
    for i in range(6):  # VSE++: each pair's hardest wrong text plus its hardest wrong image
        others = [j for j in range(6) if j != i]
        by_hand += max(max(0.3 - positive[i] + scores[i, j] for j in others).item(), 0.0)
        by_hand += max(max(0.3 - positive[i] + scores[j, i] for j in others).item(), 0.0)
    assert abs(loss.item() - by_hand) < 1e-5


@pytest.fixture(scope="module")
def mmca():
    torch.manual_seed(0)
    return vlmkit.create_model("mmca-tiny").eval()


def test_mmca_similarity_is_i0c0_plus_alpha_i1c1_of_each_pair_and_trains_on_the_hardest_negatives(mmca):
    batch = mmca.dummy_batch(4)
    pixels, tokens = batch["pixels"], batch["tokens"]
    with torch.no_grad():
        scores = mmca.similarity(pixels, tokens)  # (4, 4)
        i0, c0 = F.normalize(mmca.encode_image(pixels), dim=-1), F.normalize(mmca.encode_text(tokens), dim=-1)
        regions = mmca.image_match_features(pixels)
        for i in range(4):
            for j in range(4):  # the cross module on the single pair (image i, text j), batch of one
                words, real = mmca.words(tokens[j : j + 1])
                i1, c1 = mmca.inter(regions[i : i + 1], words, real)
                want = (i0[i] @ c0[j]) + mmca.config.alpha * F.cosine_similarity(i1, c1)[0]
                assert torch.allclose(scores[i, j], want, atol=1e-5), (i, j)
        # the retrieval re-ranking score (cosine + match_scores) is S itself
        rerank = (i0 * c0).sum(-1) + mmca.match_scores(regions, tokens)
        assert torch.allclose(rerank, scores.diagonal(), atol=1e-5)
        probability = mmca.match(pixels, tokens)
        assert torch.allclose(probability, (scores.diagonal() / (1 + mmca.config.alpha) + 1) / 2, atol=1e-5)
        loss = mmca(batch).loss
    assert torch.allclose(loss, hinge_triplet_loss_from_scores(scores, margin=0.2), atol=1e-5)
    assert scores.std() > 1e-3  # not a constant similarity


def test_mmca_warms_up_on_every_negative_before_the_hardest_and_saves_its_place(tmp_path):
    model = vlmkit.create_model("mmca-tiny").eval()
    model.training_options = model.parse_training_options({"hardest_after": 2})
    batch = model.dummy_batch(4)
    with torch.no_grad():
        scores = model.similarity(batch["pixels"], batch["tokens"])
        for update in range(3):
            output = model(batch)
            hardest = update >= 2
            assert float(output.logs["hardest"]) == float(hardest)
            want = hinge_triplet_loss_from_scores(scores, margin=0.2, hardest=hardest)
            assert torch.allclose(output.loss, want, atol=1e-5), update
            model.after_optimizer_step()
    assert int(model.updates.count) == 3
    model.save_pretrained(tmp_path / "run")  # the count travels with the weights (exact resume)
    assert int(vlmkit.load(tmp_path / "run").updates.count) == 3


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from vlmkit.data.formats import read_records
    from vlmkit.data.synthetic import generate

    folder = tmp_path_factory.mktemp("twostream_data")
    generate(folder, n=12, seed=0, progress=False)
    return read_records(folder / "train.jsonl")


@pytest.mark.parametrize("name", ["lxmert-tiny", "vilbert-tiny"])
def test_every_fusion_task_trains_through_the_family_dataset_and_answers(name, records):
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.tokenizers import train_wordpiece
    from vlmkit.data.records import record_texts

    tokenizer = train_wordpiece(record_texts(records, statements=True), vocab_size=200, context_length=24)
    family_name, config = named_config(name)
    family = get_family(family_name)
    config = family.adapt_config_to_data(family.adapt_config_to_tokenizer(config, tokenizer), records)
    assert config["answers"] and config["region_classes"]  # from the records' qa and objects
    torch.manual_seed(0)
    model = family.from_config_dict(config)
    model.tokenizer, model.transform = tokenizer, ImageTransform(image_size=64)
    seen = {}
    for task in ("pretrain", "vqa", "reasoning", "retrieval"):
        model.set_training_options({"task": task})
        dataset = model.training_dataset(records, ImageTransform(image_size=64, train=True), tokenizer, seed=0)
        batch = dataset.collate([dataset[i] for i in range(4)])
        model.train()
        output = model(batch)
        assert torch.isfinite(output.loss), task
        output.loss.backward()
        seen[task] = set(output.logs)
    assert {"mlm_loss", "itm_loss"} <= seen["pretrain"] and "vqa_loss" in seen["vqa"]
    assert "reasoning_loss" in seen["reasoning"] and "itm_loss" in seen["retrieval"]
    model.eval()
    pixels = model.preprocess([records[0]["image"], records[1]["image"]])
    regions = model.region_inputs(records[:2])
    assert regions["region_mask"].any()  # the records' boxes are read
    answers = model.answer(pixels, ["what color is the circle?"] * 2, regions=regions)
    assert len(answers) == 2 and all(answer in config["answers"] for answer in answers)
    truth = model.verify(pixels, ["there is a circle"] * 2, regions=regions)
    match = model.match(pixels, model.tokenize(["a red circle", "a blue square"]), regions=regions)
    assert truth.shape == match.shape == (2,) and ((0 <= match) & (match <= 1)).all()
    # retrieval through the matching head alone (no embeddings): every pair scored
    from vlmkit.tasks.retrieval import evaluate_retrieval

    result = evaluate_retrieval(model, records[:3])
    assert result["n_images"] == 3 and 0 <= result["i2t_r1"] <= 1
    # the boxes matter: the same question over the grid fallback gives other logits
    with torch.no_grad():
        with_boxes = model._pooled(pixels, model.tokenize(["a circle"] * 2), regions) if hasattr(model, "_pooled") \
            else model._fused(pixels, model.tokenize(["a circle"] * 2), regions)
        without = model._pooled(pixels, model.tokenize(["a circle"] * 2), None) if hasattr(model, "_pooled") \
            else model._fused(pixels, model.tokenize(["a circle"] * 2), None)
    assert (with_boxes - without).abs().max() > 1e-5
