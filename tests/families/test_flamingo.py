"""Flamingo: Perceiver Resampler + gated cross-attention on a frozen LM, interleaved few-shot prompts."""
import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.encoders.resampler import PerceiverResampler
from vlmkit.layers.gated_cross_attention import GatedCrossAttentionBlock
from vlmkit.models.flamingo import Flamingo
from vlmkit.models.registry import named_config


def tiny_model(**overrides) -> Flamingo:
    _, config = named_config("flamingo-tiny")
    torch.manual_seed(0)
    return Flamingo.from_config_dict({**config, **overrides})


def test_resampler_gives_a_fixed_number_of_tokens_whatever_the_input_count():
    resampler = PerceiverResampler(dim=32, depth=2, heads=2, head_dim=8, num_latents=5).eval()
    for count in (1, 7, 64):
        assert resampler(torch.randn(3, count, 32)).shape == (3, 5, 32)
    # The latents attend to [features ; latents]: with features the output differs from without them.
    features = torch.randn(1, 4, 32)
    assert not torch.allclose(resampler(features), resampler(features[:, :1]))


def test_gated_block_is_the_identity_at_init_and_not_once_the_gates_open():
    block = GatedCrossAttentionBlock(dim=16, context_dim=8, heads=2, mlp_hidden=32)
    x, media = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    from vlmkit.layers.masks import media_mask

    locations = torch.zeros(2, 5, dtype=torch.bool)
    locations[:, 2] = True
    mask, attends_any = media_mask(locations, 3, 2)
    assert torch.equal(block(x, media, mask, attends_any), x)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    out = block(x, media, mask, attends_any)
    assert torch.equal(out[:, :2], x[:, :2])  # before the first image: no cross-attention (ff gate still 0)
    assert not torch.allclose(out[:, 2:], x[:, 2:])


def test_at_init_the_logits_equal_the_frozen_lms_exactly():
    model = tiny_model().eval()
    batch = model.dummy_batch()
    tokens, _ = model.caption_layout(batch["tokens"])  # [bos] <image> caption ...
    tokens = torch.cat([tokens, tokens[:, 1:]], dim=1)  # two images a row
    vocab = model.config.lm.vocab_size
    pixels = torch.stack([batch["pixels"], batch["pixels"].flip(0)], dim=1)  # (B, 2, 3, H, W)
    logits = model.logits(model.hidden(tokens, model.media(pixels)))  # images in, gates at 0
    assert torch.equal(logits[..., :vocab], model.lm(inputs_embeds=model.embed(tokens)))
    text_only = torch.randint(3, vocab, (2, 9))
    assert torch.equal(model.logits(model.hidden(text_only, model.media(torch.zeros(2, 0, 3, 64, 64))))[..., :vocab],
                       model.lm(text_only))
    with torch.no_grad():
        for block in model.gated.values():
            block.attn_gate.fill_(0.5)
    opened = model.logits(model.hidden(tokens, model.media(pixels)))
    assert not torch.allclose(opened[..., :vocab], logits[..., :vocab])


def test_cross_attention_blocks_sit_where_configured():
    assert tiny_model().config.cross_attention_layers == [1, 3]  # every 2nd block, OpenFlamingo's placement
    assert tiny_model(cross_attention_offset=0).config.cross_attention_layers == [0, 2]  # IDEFICS's
    with pytest.raises(vlmkit.UserError, match="cross_attention_offset"):
        tiny_model(cross_attention_offset=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The built-in data (small, with interleaved documents), an LM pretrained on its texts, Flamingo on top."""
    from vlmkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("flamingo")
    generate(root / "data", n=60, seed=3, progress=False, interleaved=3)
    data = str(root / "data" / "train.jsonl")
    lm, flamingo, vision = root / "lm", root / "flamingo", root / "vision"
    torch.manual_seed(0)
    vlmkit.create_model("clip-tiny").save_pretrained(vision)  # a (random) CLIP whose ViT becomes the frozen encoder
    small = ["batch_size=8", "warmup_steps=2", "log_every=4", "threads=1"]
    assert main(["train", "--recipe", "lm-tiny", "--data", data, "--out", str(lm), "steps=16", "save_every=16",
                 "vocab_size=600", "model.lm.depth=2", *small]) == 0
    assert main(["train", "--recipe", "flamingo-tiny", "--data", str(root / "data" / "train_interleaved.jsonl"),
                 "--out", str(flamingo), "steps=12", "save_every=12", f"init_text={lm}", f"init_image={vision}", "lr=0.003", *small]) == 0
    return {"data": root / "data", "lm": lm, "flamingo": flamingo, "vision": vision}


def test_only_the_resampler_and_gated_blocks_train_the_lm_and_vision_stay_bit_identical(runs):
    lm, model = vlmkit.load(runs["lm"]), vlmkit.load(runs["flamingo"])
    trained = model.lm.state_dict()
    for key, tensor in lm.lm.state_dict().items():
        assert torch.equal(trained[key], tensor), key
    clip = vlmkit.load(runs["vision"])
    for key, tensor in clip.visual.state_dict().items():
        if key in model.visual.state_dict():  # all but the CLIP projection, which Flamingo does not read
            assert torch.equal(model.visual.state_dict()[key], tensor), key
    assert set(model.visual.state_dict()) == set(clip.visual.state_dict()) - {"proj.weight"}
    assert not any(p.requires_grad for p in [*model.lm.parameters(), *model.visual.parameters()])
    gates = torch.cat([block.attn_gate for block in model.gated.values()])
    assert (gates != 0).all()  # the gates opened: the model learned to look
    losses = [json.loads(line)["loss"] for line in (runs["flamingo"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_few_shot_prompts_decode_the_same_with_and_without_the_cache(runs):
    model = vlmkit.load(runs["flamingo"])
    side = model.config.vision.image_size
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    examples = [[], [(pixels[2], "how many objects are there?", "2")],
                [(pixels[0], "what color is the star?", "red"), (pixels[1], "is there a circle?", "yes")]]
    questions = ["what color is the circle?", "how many objects are there?", "what shape is it?"]
    cached = model.answer_in_context(pixels, questions, examples, max_new_tokens=4)
    assert cached == model.answer_in_context(pixels, questions, examples, max_new_tokens=4, use_cache=False)
    model.cache_media_kv = False  # the visual keys/values recomputed every step give the same text
    assert cached == model.answer_in_context(pixels, questions, examples, max_new_tokens=4)
    model.cache_media_kv = True
    assert model.answer(pixels[:1], questions[:1], max_new_tokens=4) == cached[:1]
    captions = model.caption_in_context(pixels[:2], [[(pixels[2], "a red star")], []], max_new_tokens=6, num_beams=2)
    assert len(captions) == 2 and captions == model.caption_in_context(
        pixels[:2], [[(pixels[2], "a red star")], []], max_new_tokens=6, num_beams=2, use_cache=False)
    reply = model.chat(pixels[:2], [{"role": "user", "content": "<image> is it red? <image> and this one?"}], max_new_tokens=4)
    assert isinstance(reply, str)
    with pytest.raises(vlmkit.UserError, match="2 <image> marker"):
        model.chat(pixels[:1], [{"role": "user", "content": "<image> and <image>?"}])
    with pytest.raises(vlmkit.UserError, match="2 <image> marker"):
        model.generate(pixels[:1], prompt="<image> a photo of <image>")  # one image, two places for it
    assert len(model.generate(pixels[:1], prompt="a photo of <image>", max_new_tokens=3)) == 1


def test_command_line_caption_ask_chat_and_few_shot_evaluation(runs, capsys):
    data, run = runs["data"], str(runs["flamingo"])
    image = str(data / "images" / "test-000000.png")
    assert main(["caption", image, "--model", run, "--max-new-tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["captions"][0]["image"] == image
    assert main(["ask", image, "what color is the circle?", "--model", run, "--max-new-tokens", "3"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out)
    assert main(["chat", image, image, "--model", run, "--message", "<image> one <image> two?", "--json",
                 "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == [image, image]
    test, train = str(data / "test.jsonl"), str(data / "train.jsonl")
    assert main(["eval", "vqa", "--model", run, "--data", test, "--shots", "2", "--support", train, "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shots"] == 2 and 0.0 <= result["accuracy"] <= 1.0 and result["n"] > 0
    assert main(["eval", "caption", "--model", run, "--data", test, "--shots", "1", "--support", train,
                 "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shots"] == 1 and "CIDEr" in result
    assert main(["eval", "caption", "--model", run, "--data", test, "--shots", "1"]) == 2
    assert "--support" in capsys.readouterr().err
    # retrieval-based examples (RICES): the most similar support images (and questions)
    assert main(["eval", "vqa", "--model", run, "--data", test, "--shots", "2", "--support", train,
                 "--examples", "similar", "--max-new-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shots"] == 2 and result["examples"] == "similar" and result["n"] > 0
    assert main(["caption", image, "--model", run, "--shots", "1", "--support", train, "--examples", "similar",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["captions"][0]["image"] == image
    assert main(["caption", image, "--model", run, "--shots", "1"]) == 2  # examples need a support set
    assert "--support" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", run, "--data", test, "--shots", "1", "--support", train,
                 "--retriever", run]) == 2
    assert "--examples similar" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", run, "--data", test, "--shots", "1", "--support", train,
                 "--examples", "similar", "--retriever", run]) == 2  # a Flamingo run embeds no images
    assert "embed images" in capsys.readouterr().err
    assert main(["eval", "caption", "--model", str(runs["lm"]), "--data", test, "--shots", "1", "--support", train]) == 2
    assert "generate text" in capsys.readouterr().err  # an LM alone captions nothing


def test_interleaved_records_and_their_bad_inputs(runs, tmp_path, capsys):
    from vlmkit.data.formats import read_records

    data = runs["data"]
    documents = read_records(data / "train_interleaved.jsonl")
    assert all(len([s for s in d["segments"] if "image" in s]) == 3 for d in documents[:-1])
    assert all(s["image"].startswith(str(data)) for d in documents for s in d["segments"] if "image" in s)
    image = str(data / "images" / "train-000000.png")
    bad = {
        "empty": ({"segments": []}, "empty document"),
        "image_last": ({"segments": [{"image": image}, {"text": "a red star"}, {"image": image}]}, "after its last text"),
        "marker": ({"segments": [{"image": image}, {"text": "<image> a red star"}]}, "inside its text"),
        "no_text": ({"segments": [{"image": image}]}, "without text"),
    }
    for name, (record, message) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        out = tmp_path / f"run-{name}"
        assert main(["train", "--recipe", "flamingo-tiny", "--data", str(path), "--out", str(out), "steps=1",
                     f"init_text={runs['lm']}"]) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() or not any(out.iterdir()), name  # nothing half-written


def test_the_interleaved_option_leaves_the_other_files_byte_identical(tmp_path):
    from vlmkit.data.synthetic import generate

    generate(tmp_path / "plain", n=12, seed=5, progress=False)
    generate(tmp_path / "both", n=12, seed=5, progress=False, interleaved=4)
    for name in ("train.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "both" / name).read_bytes(), name
    lines = (tmp_path / "both" / "train_interleaved.jsonl").read_text().splitlines()
    assert len(lines) == 3 and not (tmp_path / "plain" / "train_interleaved.jsonl").exists()


def test_a_corrupt_image_skips_its_sample_and_is_reported(runs, tmp_path):
    model = vlmkit.load(runs["flamingo"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = str(runs["data"] / "images" / "train-000000.png")
    records = [{"segments": [{"image": good}, {"text": "a red star"}]}, {"segments": [{"image": str(broken)}, {"text": "x"}]}]
    dataset = model.training_dataset(records, model.transform, model.tokenizer, seed=0)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["tokens"].shape[0] == 1 and batch["num_skipped"] == 1 and batch["skipped"] == [str(broken)]
    assert batch["pixels"].shape[:2] == (1, 1) and (batch["labels"] != -100).sum() > 0
