"""DALL-E's discrete VAE: the KL term against its formula, the schedules, shapes, a short training run."""
import math

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.encoders.dvae import cosine_anneal, kl_to_uniform, linear_warmup, map_pixels, unmap_pixels


def test_kl_to_uniform_equals_its_formula():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 3, generator=generator) * 3  # (B, K, h, w)
    kl = kl_to_uniform(logits)
    assert kl.shape == (2, 3, 3)
    for b, i, j in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        q = torch.softmax(logits[b, :, i, j].double(), dim=0)
        by_hand = sum(float(p) * math.log(float(p) / (1 / 5)) for p in q)  # sum_k q_k log(q_k / (1/K))
        assert float(kl[b, i, j]) == pytest.approx(by_hand, rel=1e-5)
    assert torch.allclose(kl_to_uniform(torch.zeros(1, 7, 2, 2)), torch.zeros(1, 2, 2), atol=1e-6)  # q uniform: 0
    one_hot = torch.full((1, 7, 1, 1), -1e4)
    one_hot[0, 2] = 0.0
    assert float(kl_to_uniform(one_hot)) == pytest.approx(math.log(7), rel=1e-5)  # a sure code: log K
    # torch's kl_div with the uniform prior as its input (DALLE-pytorch's formulation) agrees.
    flat = logits.permute(0, 2, 3, 1).reshape(-1, 5).log_softmax(-1)
    reference = torch.nn.functional.kl_div(torch.full_like(flat, -math.log(5)), flat, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(kl.flatten(), reference, atol=1e-6)


def test_schedules_anneal_and_warm_up():
    assert cosine_anneal(0, 1.0, 1 / 16, 100) == pytest.approx(1.0)
    assert cosine_anneal(50, 1.0, 1 / 16, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert cosine_anneal(100, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)
    assert cosine_anneal(10_000, 1.0, 1 / 16, 100) == pytest.approx(1 / 16)  # then fixed
    values = [cosine_anneal(step, 1.0, 0.1, 40) for step in range(41)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing over the annealing
    assert [linear_warmup(step, 6.6, 10) for step in (0, 5, 10, 99)] == pytest.approx([0.0, 3.3, 6.6, 6.6])
    assert linear_warmup(3, 2.0, 0) == 2.0 and cosine_anneal(3, 1.0, 0.5, 0) == 0.5


def test_encode_decode_shapes_and_pixel_maps():
    torch.manual_seed(0)
    model = vlmkit.create_model("dvae-tiny").eval()
    pixels = model.dummy_batch(2)["pixels"]  # (2, 3, 32, 32)
    codes = model.vae.encode(pixels)
    assert codes.shape == (2, 64) and codes.dtype == torch.long and int(codes.max()) < 512
    images = model.vae.decode(codes)
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(model.reconstruct(pixels), images)
    assert model.vae.encoder(model.unit_pixels(pixels)).shape == (2, 512, 8, 8)
    x = torch.rand(4, 3, 2, 2)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    assert float(map_pixels(torch.zeros(1))) == pytest.approx(0.1) and float(map_pixels(torch.ones(1))) == pytest.approx(0.9)
    # Evaluation uses the hard argmax codes: deterministic; training draws Gumbel noise.
    batch = {"pixels": pixels}
    assert torch.equal(model(batch).loss, model(batch).loss)
    model.train()
    assert not torch.equal(model(batch).loss, model(batch).loss)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from vlmkit.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n=50, seed=3, progress=False)  # 40 train / 10 test scenes
    return out


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    run = tmp_path_factory.mktemp("dvae") / "run"
    args = ["train", "--recipe", "dvae-tiny", "--data", str(synth / "train.jsonl"), "--out", str(run),
            "steps=30", "batch_size=8", "warmup_steps=2", "save_every=15", "lr=0.003",
            "training.temperature_steps=20", "training.kl_warmup_steps=10", "model.vision.hidden=8"]
    assert main(args) == 0
    return run


def test_training_follows_the_schedules_and_resumes_them(trained):
    import json

    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    temperatures = [row["temperature"] for row in rows]
    assert temperatures[0] == pytest.approx(1.0) and temperatures[-1] == pytest.approx(1 / 16)
    assert [row["kl_weight"] for row in rows][:3] == pytest.approx([0.0, 0.66, 1.32])
    assert rows[-1]["mse"] < rows[0]["mse"]  # it learns something in 30 steps
    model = vlmkit.load(trained)
    assert int(model.updates) == 30  # the schedules' clock is saved with the weights


def test_eval_reconstruction_prints_errors(trained, synth, capsys):
    import json

    assert main(["eval", "reconstruction", "--model", str(trained), "--data", str(synth / "test.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 10
    assert 0 < result["mse"] < 1 and result["psnr"] == pytest.approx(10 * math.log10(1 / result["mse"]))
    assert 0 < result["mean_colour_mse"] < 1 and 0 < result["mae"] < 1


def test_a_model_that_cannot_reconstruct_is_refused(synth, tmp_path, capsys):
    model = vlmkit.create_model("clip-tiny")
    model.save_pretrained(tmp_path / "clip")
    assert main(["eval", "reconstruction", "--model", str(tmp_path / "clip"), "--data", str(synth / "test.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot 'reconstruct images'" in err and len(err.splitlines()) == 1
