"""DALL-E: the decoder mask inside the model, KV-cached sampling, bad options, training on a frozen dVAE run."""
import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.errors import UserError
from vlmkit.layers.masks import text_to_image_mask
from vlmkit.tokenizers import train_clip_bpe

T = 24  # dalle-tiny's text tokens
CAPTIONS = ["a red circle", "a blue square on the left", "a green star", "one yellow triangle on a plain background"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = vlmkit.create_model("dalle-tiny", **{"vision.hidden": 8, "width": 64, "depth": 2}).eval()
    tokenizer = train_clip_bpe(CAPTIONS * 10, vocab_size=600)
    tokenizer.context_length = model.config.text.context_length
    model.config.text.eos_token_id, model.config.text.vocab_size = tokenizer.eos_id, tokenizer.vocab_size
    model.text_embedding = torch.nn.Embedding(tokenizer.vocab_size + T, 64)  # fitted to the tokenizer, as the trainer does
    model.text_head = torch.nn.Linear(64, tokenizer.vocab_size, bias=False)
    model.tokenizer = tokenizer
    return model


def test_the_model_runs_under_the_papers_decoder_mask(model):
    batch = model.dummy_batch(2)
    codes = model.vae.encode(batch["pixels"])
    x = model.embed(model.text_inputs(batch["tokens"]), codes[:, :-1])  # (2, T + 63, D)
    explicit = model.hidden(x, mask=text_to_image_mask(T, 63))
    assert torch.allclose(model.hidden(x), explicit, atol=1e-5)  # is_causal (what training runs) == the mask
    # Image position j's prediction ignores every later image token: change code 10 on, nothing before moves.
    changed = codes.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 512
    y = model.embed(model.text_inputs(batch["tokens"]), changed[:, :-1])
    before, after = model.hidden(x), model.hidden(y)
    assert torch.allclose(before[:, : T + 10], after[:, : T + 10], atol=1e-6)
    assert not torch.allclose(before[:, T + 10], after[:, T + 10], atol=1e-4)


def test_text_pads_get_their_own_ids_and_the_loss_weights_apply(model):
    batch = model.dummy_batch(2)
    ids = model.text_inputs(batch["tokens"])
    vocab = model.config.text.vocab_size
    pads = ids >= vocab
    assert pads.any() and torch.equal(ids[pads] - vocab, torch.arange(T).expand(2, -1)[pads])
    out = model(batch)
    logs = {key: float(value) for key, value in out.logs.items()}
    assert float(out.loss.detach()) == pytest.approx(logs["text_loss"] / 8 + 7 * logs["image_loss"] / 8, rel=1e-5)
    assert out.logits.shape == (2, 64, 512)


def test_cached_sampling_draws_the_same_tokens_as_uncached(model):
    prompts = ["a red circle", "a blue square on the left"]
    cached = model.sample_tokens(prompts, seed=3, top_k=20, temperature=0.8)
    uncached = model.sample_tokens(prompts, seed=3, top_k=20, temperature=0.8, use_cache=False)
    assert cached.shape == (2, 64) and torch.equal(cached, uncached)
    assert not torch.equal(cached, model.sample_tokens(prompts, seed=4, top_k=20, temperature=0.8))
    greedy = model.sample_tokens(prompts, seed=3, top_k=1)  # top_k 1: the argmax, whatever the seed
    assert torch.equal(greedy, model.sample_tokens(prompts, seed=9, top_k=1))
    images = model.imagine(prompts, seed=3)
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images, model.imagine(prompts, seed=3))


@pytest.mark.parametrize("options,needle", [
    ({"temperature": 0.0}, "temperature 0.0 must be above 0"),
    ({"top_k": 0}, "top_k 0 must be a whole number of at least 1"),
    ({"guidance": 3.0}, "takes no option guidance"),
])
def test_bad_sampling_options_are_one_sentence(model, options, needle):
    with pytest.raises(UserError, match=needle):
        model.imagine(["a red circle"], **options)


def test_an_empty_prompt_is_refused(model):
    with pytest.raises(UserError, match="prompt is empty"):
        model.imagine(["a red circle", "  "])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dVAE run (random weights are enough here), a CLIP run and a data folder."""
    from vlmkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("dalle")
    generate(root / "synth", n=30, seed=5, progress=False)
    torch.manual_seed(1)
    vlmkit.create_model("dvae-tiny", **{"vision.hidden": 8}).save_pretrained(root / "dvae")
    vlmkit.create_model("clip-tiny").save_pretrained(root / "clip")
    return root


def _train(runs, out, *extra):
    return main(["train", "--recipe", "dalle-tiny", "--data", str(runs / "synth" / "train.jsonl"), "--out", str(out),
                 "steps=3", "batch_size=4", "warmup_steps=1", "save_every=3", "model.width=64", "model.depth=1",
                 *extra])


def test_dalle_trains_on_a_frozen_dvae_run_and_imagines(runs, tmp_path, capsys):
    run = tmp_path / "dalle"
    assert _train(runs, run, f"init_image={runs / 'dvae'}") == 0
    dvae, dalle = vlmkit.load(runs / "dvae"), vlmkit.load(run)
    for name, tensor in dvae.vae.state_dict().items():  # copied in and never trained
        assert torch.equal(tensor, dalle.vae.state_dict()[name]), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["image_loss"] == row["image_loss"] for row in rows)
    capsys.readouterr()
    out = tmp_path / "samples" / "grid.png"
    assert main(["imagine", "a red circle", "--model", str(run), "--out", str(out), "--n", "2", "--top-k", "8"]) == 0
    assert out.exists() and (tmp_path / "samples" / "grid-001.png").exists()


def test_an_image_tower_that_is_not_a_dvae_is_one_line(runs, tmp_path, capsys):
    assert _train(runs, tmp_path / "bad", f"init_image={runs / 'clip'}") == 2
    err = capsys.readouterr().err.strip()
    assert "init_image is not a discrete VAE" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad" / "config.json").exists()
