"""Frozen: a trained vision encoder prompts a frozen LM. The LM never changes; images sit inside texts."""
import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The built-in data (small), an LM pretrained on its texts, and Frozen trained on top of it."""
    from vlmkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("frozen")
    generate(root / "data", n=80, seed=3, progress=False)
    data = str(root / "data" / "train.jsonl")
    lm, frozen = root / "lm", root / "frozen"
    small = ["batch_size=8", "warmup_steps=2", "log_every=5", "threads=1"]
    assert main(["train", "--recipe", "lm-tiny", "--data", data, "--out", str(lm), "steps=20", "save_every=20",
                 "vocab_size=700", "model.lm.depth=2", *small]) == 0
    assert main(["train", "--recipe", "frozen-tiny", "--data", data, "--out", str(frozen), "steps=12", "save_every=12",
                 f"init_text={lm}", "init_image=null", *small]) == 0  # the recipe's CLIP vision start: not here
    return {"data": root / "data", "lm": lm, "frozen": frozen}


def test_the_lm_is_bit_identical_after_training_and_the_vision_side_learned(runs):
    lm, frozen = vlmkit.load(runs["lm"]), vlmkit.load(runs["frozen"])
    trained = frozen.lm.state_dict()
    for key, tensor in lm.lm.state_dict().items():
        assert torch.equal(trained[key], tensor), key
    assert not any(p.requires_grad for p in frozen.lm.parameters())
    losses = [json.loads(line)["loss"] for line in (runs["frozen"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert frozen.tokenizer.vocab_size == lm.tokenizer.vocab_size  # the LM's tokenizer came along


def test_interleaved_prompt_is_prefix_text_prefix_text(runs):
    model = vlmkit.load(runs["frozen"])
    pixels = torch.randn(2, 3, 64, 64)
    row = model._interleaved([(pixels[0], "Question: what? Answer: red "), (pixels[1], "Question: and this? Answer:")])
    k, tokenizer = model.config.num_prefix_tokens, model.tokenizer
    first = [tokenizer.bos_id] + tokenizer.encode("Question: what? Answer: red ", add_special_tokens=False)
    second = tokenizer.encode("Question: and this? Answer:", add_special_tokens=False)
    prefixes = model.image_prefix(pixels)  # (2, k, D)
    embed = lambda ids: model.lm.embed_tokens(torch.tensor([ids]))[0]  # noqa: E731
    expected = torch.cat([prefixes[0], embed(first), prefixes[1], embed(second)])
    assert row.shape == (2 * k + len(first) + len(second), model.config.lm.width)
    assert torch.equal(row, expected)


def test_few_shot_answers_decode_the_same_with_and_without_the_cache(runs):
    model = vlmkit.load(runs["frozen"])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, generator=generator)
    examples = [[], [(pixels[2], "how many objects are there?", "2")],
                [(pixels[0], "what color is the star?", "red"), (pixels[1], "is there a circle?", "yes")]]
    questions = ["what color is the circle?", "how many objects are there?", "what shape is it?"]
    cached = model.answer_in_context(pixels, questions, examples)
    assert cached == model.answer_in_context(pixels, questions, examples, use_cache=False)
    assert model.answer(pixels[:1], questions[:1]) == cached[:1]  # no examples = plain answering
    with pytest.raises(vlmkit.UserError, match="one of each per row"):
        model.answer_in_context(pixels, questions, examples[:2])


def test_vqa_with_in_context_examples_and_perplexity_from_the_command_line(runs, capsys):
    test = str(runs["data"] / "test.jsonl")
    train = str(runs["data"] / "train.jsonl")
    assert main(["eval", "vqa", "--model", str(runs["frozen"]), "--data", test, "--shots", "1", "--support", train]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shots"] == 1 and 0.0 <= result["accuracy"] <= 1.0 and result["n"] > 0
    assert main(["eval", "vqa", "--model", str(runs["frozen"]), "--data", test, "--shots", "2"]) == 2
    assert "--support" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--model", str(runs["lm"]), "--data", test]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"perplexity", "tokens", "texts", "truncated"} and result["tokens"] > result["texts"] > 0
    assert 1.0 < result["perplexity"] < model_vocab(runs["lm"])  # learned something: below chance
    assert main(["eval", "perplexity", "--model", str(runs["frozen"]), "--data", test]) == 2  # no ScoresText
    assert "score text likelihood" in capsys.readouterr().err


def model_vocab(run) -> int:
    return json.loads((run / "config.json").read_text())["config"]["lm"]["vocab_size"]
