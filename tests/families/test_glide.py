"""GLIDE's own behaviour: caption dropout really drops the caption, guidance is the classifier-free
formula through the model, the moving average of the weights follows its formula and is what sampling
uses, seeded sampling is reproducible, bad options are one-line errors, `vlmkit imagine` runs on a
saved GLIDE run (one tiny untrained 16 px model for these), and a short training run learns to draw the
prompted colour, more so with guidance."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.diffusion import guided_eps
from vlmkit.errors import UserError

TEXTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "one red star on a plain background"]


@pytest.fixture(scope="module")
def glide(tmp_path_factory):
    """A small untrained GLIDE whose zero-initialised layers are made random (so every input matters), saved."""
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.config import apply_overrides
    from vlmkit.tokenizers import train_clip_bpe

    tokenizer = train_clip_bpe(TEXTS * 4, vocab_size=600, context_length=16)
    family, config = named_config("glide-tiny")
    cls = get_family(family)
    config = apply_overrides(cls.adapt_config_to_tokenizer(config, tokenizer),
                             {"unet.image_size": 16, "text.width": 32, "text.depth": 1, "diffusion_steps": 100, "sample_steps": 6})
    torch.manual_seed(0)
    model = cls.from_config_dict(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    model.reset_ema()  # the average starts as the weights, randomised ones included
    model.tokenizer, model.transform = tokenizer, ImageTransform(16)
    run = tmp_path_factory.mktemp("glide") / "run"
    model.save_pretrained(run)
    return model.eval(), run


def test_a_dropped_caption_is_not_seen_and_a_kept_one_is(glide):
    model, _ = glide
    batch = model.dummy_batch(4, seed=1)
    other = dict(batch, tokens=model.tokenize(["a yellow star"] * 4))
    with torch.no_grad():
        dropped = [model({**b, "drop_caption": torch.ones(4, dtype=torch.bool)}).loss for b in (batch, other)]
        kept = [model({**b, "drop_caption": torch.zeros(4, dtype=torch.bool)}).loss for b in (batch, other)]
    assert torch.allclose(dropped[0], dropped[1], rtol=1e-6, atol=0)  # the empty caption: the tokens make no difference
    assert not torch.allclose(kept[0], kept[1], rtol=1e-4, atol=0)  # a kept caption conditions the prediction
    model.train()
    try:  # training draws the dropout itself, in about the configured share of rows
        torch.manual_seed(0)
        shares = [model({k: v for k, v in model.dummy_batch(50).items() if k != "drop_caption"}).logs["dropped"] for _ in range(4)]
    finally:
        model.eval()
    assert 0.1 < float(torch.stack(shares).mean()) < 0.3


def test_guided_eps_through_the_model_is_the_formula(glide):
    model, _ = glide
    tokens = model.tokenize(["a red circle", "a blue square"])
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([5, 80])
    with torch.no_grad():
        conditional = model.predict_eps(x, t, *model.conditioning(tokens, torch.zeros(2, dtype=torch.bool)))
        unconditional = model.predict_eps(x, t, *model.conditioning(tokens, torch.ones(2, dtype=torch.bool)))
        for scale in (0.0, 1.0, 3.0):
            got = model.guided_eps_fn(tokens, scale)(x, t)
            assert (got - guided_eps(conditional, unconditional, scale)).abs().max() < 1e-4, scale
    assert not torch.allclose(conditional, unconditional, atol=1e-4)


def test_the_moving_average_follows_its_formula_and_is_what_sampling_uses(glide):
    model = copy.deepcopy(glide[0])
    trained, averaged = model._ema_pairs()
    assert len(trained) == len(averaged) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(not a.requires_grad for a in averaged) and all(torch.equal(t, a) for t, a in zip(trained, averaged))
    prompts = ["a red circle", "a blue square"]
    same = model.imagine(prompts, seed=3, steps=3, weights="online")
    assert torch.equal(same, model.imagine(prompts, seed=3, steps=3))  # average = weights: the same images
    before = [a.clone() for a in averaged]
    for n, decay in enumerate((1 / 10, 2 / 11)):  # warm-up: min(0.9999, (1 + n) / (10 + n))
        with torch.no_grad():
            for t in trained:
                t.add_(0.05 * torch.randn_like(t))
        model.after_optimizer_step()
        for t, a, old in zip(trained, averaged, before):
            assert torch.allclose(a, decay * old + (1 - decay) * t, atol=1e-6)
        before = [a.clone() for a in averaged]
        assert int(model.ema_updates) == n + 1
    online, ema = model.imagine(prompts, seed=3, steps=3, weights="online"), model.imagine(prompts, seed=3, steps=3)
    assert not torch.equal(online, ema)
    tokens, keep = model.tokenize(["a red circle"]), torch.zeros(1, dtype=torch.bool)
    x, t = torch.zeros(1, 3, 16, 16), torch.tensor([50])
    with torch.no_grad():
        eps = model.predict_eps(x, t, *model.conditioning(tokens, keep))
        eps_ema = model.diffusion.eps_from_v(x, t, model.ema_unet(x, t, *model.conditioning(tokens, keep, ema=True)))
        assert torch.equal(model.guided_eps_fn(tokens, 1.0)(x, t), eps_ema)  # sampling's default: the average
        assert torch.equal(model.guided_eps_fn(tokens, 1.0, ema=False)(x, t), eps)
    assert not torch.equal(eps, eps_ema)
    with pytest.raises(UserError, match="weights 'best' is not 'ema'"):
        model.imagine(prompts, weights="best")


def test_seeded_sampling_is_reproducible(glide):
    model, _ = glide
    prompts = ["a red circle", "a blue square"]
    first = model.imagine(prompts, seed=7, guidance=3.0, steps=4)
    assert first.shape == (2, 3, 16, 16) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, model.imagine(prompts, seed=7, guidance=3.0, steps=4))
    assert not torch.equal(first, model.imagine(prompts, seed=8, guidance=3.0, steps=4))
    ddpm = model.imagine(prompts, seed=7, guidance=3.0, steps=4, sampler="ddpm")
    assert not torch.equal(first, ddpm) and torch.equal(ddpm, model.imagine(prompts, seed=7, guidance=3.0, steps=4, sampler="ddpm"))


@pytest.mark.parametrize("options, message", [
    ({"temperature": 1.0}, "does not take the option 'temperature'"),
    ({"guidance": -0.5}, "guidance -0.5 is negative"),
    ({"steps": 0}, "steps 0 samples nothing"),
    ({"sampler": "euler"}, "sampler 'euler' is not one of ddpm, ddim"),
])
def test_bad_options_are_user_errors(glide, options, message):
    model, _ = glide
    with pytest.raises(UserError, match=message):
        model.imagine(["a red circle"], **options)
    with pytest.raises(UserError, match="a prompt is empty"):
        model.imagine([" "])


def test_imagine_cli_on_a_saved_run(glide, tmp_path, capsys):
    _, run = glide
    loaded = vlmkit.load(run)
    assert loaded.imagine_options == ("guidance", "steps", "sampler", "eta", "weights")
    assert int(loaded.ema_updates) == 0 and all(torch.equal(t, a) for t, a in zip(*loaded._ema_pairs()))  # saved with it
    out = tmp_path / "grid.png"
    assert main(["imagine", "a red circle", "--model", str(run), "--out", str(out), "--n", "2", "--steps", "3",
                 "--guidance", "2", "--seed", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.exists() and len(result["images"]) == 2 and all((tmp_path / f"grid-00{i}.png").exists() for i in range(2))
    assert main(["imagine", "a red circle", "--model", str(run), "--out", str(tmp_path / "x.png"), "--temperature", "1"]) == 2
    assert "the 'glide' model family does not take --temperature" in capsys.readouterr().err
    assert main(["imagine", "a red circle", "--model", str(run), "--out", str(tmp_path / "o.png"), "--n", "1", "--steps", "2",
                 "--weights", "online"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["weights"] == "online"


def test_a_short_run_learns_to_draw_the_prompted_colour_and_guidance_sharpens_it(tmp_path):
    """Learning through the trainer, end to end (about 20 s): 150 steps on solid red / green / blue
    16 px images; then the conditional samples take the prompt's colour, more so when guided."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rows = []
    for index in range(60):
        name = list(colours)[index % 3]
        Image.new("RGB", (16, 16), colours[name]).save(tmp_path / f"{index}.png")
        rows.append({"image": f"{index}.png", "texts": [f"a {name} image", f"all {name}"], "label": name})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["train", "--recipe", "glide-tiny", "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "run"),
                 "steps=150", "batch_size=16", "threads=1", "vocab_size=600", "save_every=1000", "warmup_steps=10", "lr=0.002",
                 "model.unet.image_size=16", "model.unet.channels=16", "model.text.width=32", "model.text.depth=1"]) == 0
    model = vlmkit.load(tmp_path / "run")
    prompts = [f"a {name} image" for name in colours]
    wanted = torch.arange(3)  # red -> channel 0, green -> 1, blue -> 2
    mean = {scale: model.imagine(prompts, seed=0, guidance=scale, steps=10).mean((2, 3)) for scale in (1.0, 3.0)}  # (3, RGB)
    for scale, colour in mean.items():
        assert torch.equal(colour.argmax(1), wanted), (scale, colour)
    assert mean[3.0][wanted, wanted].mean() > mean[1.0][wanted, wanted].mean()  # guidance: further towards the prompt
