"""The shared text-to-image task (`vlmkit imagine`, `vlmkit eval text-to-image`) with fake models:
an imaginer whose images show the prompt's colour more purely the higher the guidance, and a judge
that embeds an image as its mean colour and a text as the colour it names. No family is needed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.capabilities import EmbedsImages, EmbedsTexts, Imagines
from vlmkit.cli import main
from vlmkit.errors import UserError
from vlmkit.tasks.imagine import evaluate_text_to_image, imagine, sample

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def _colour_of(text: str) -> torch.Tensor:
    for word, rgb in COLOURS.items():
        if word in text:
            return torch.tensor(rgb)
    return torch.full((3,), 0.5)


class FakeImaginer:
    """Noise blended towards the prompt's colour by min(1, guidance / 3): guidance 0 gives pure noise."""

    family = "fake-diffusion"
    capabilities = (Imagines,)
    imagine_options = ("guidance", "steps", "sampler")

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def imagine(self, prompts, seed: int = 0, guidance: float = 0.0, steps: int = 10, sampler: str = "ddim"):
        self.calls.append({"prompts": list(prompts), "seed": seed, "guidance": guidance, "steps": steps, "sampler": sampler})
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(len(prompts), 3, 8, 8, generator=generator)
        colour = torch.stack([_colour_of(p) for p in prompts]).view(-1, 3, 1, 1).expand_as(noise)
        weight = min(1.0, guidance / 3.0)
        return (1 - weight) * noise + weight * colour


class FakeAutoregressive(FakeImaginer):
    family = "fake-autoregressive"
    imagine_options = ("temperature", "top_k")

    def imagine(self, prompts, seed: int = 0, temperature: float = 1.0, top_k: int | None = None):
        return super().imagine(prompts, seed=seed, guidance=1.5)


class FakeJudge:
    """Image -> its mean colour minus grey; text -> the colour it names minus grey (both normalised)."""

    family = "fake-clip"
    capabilities = (EmbedsImages, EmbedsTexts)

    def embed_images(self, images) -> torch.Tensor:
        means = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).mean(dim=(0, 1)) for image in images])
        return torch.nn.functional.normalize(means - 0.5 + 1e-6, dim=-1)

    def embed_texts(self, texts) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.stack([_colour_of(t) for t in texts]) - 0.5 + 1e-6, dim=-1)


RECORDS = [{"texts": [f"a {colour} square"], "label": f"{colour} square"} for colour in COLOURS for _ in range(8)] + [
    {"texts": ["a red square and a blue star"]}]  # two objects: no label, not judged


@pytest.fixture()
def fakes(monkeypatch):
    models = {"diffusion": FakeImaginer(), "autoregressive": FakeAutoregressive(), "judge": FakeJudge()}

    def load(path, **kwargs):
        if path not in models:
            raise UserError(f"{path} is not a run folder")
        return models[path]

    monkeypatch.setattr(vlmkit, "load", load)
    return models


def test_imagine_writes_a_grid_and_each_image_reproducibly(fakes, tmp_path, capsys):
    out = tmp_path / "samples" / "grid.png"
    argv = ["imagine", "a red square", "a blue star", "--model", "diffusion", "--out", str(out), "--n", "3",
            "--guidance", "1.5", "--steps", "7", "--seed", "5"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [item["prompt"] for item in result["images"]] == ["a red square"] * 3 + ["a blue star"] * 3
    paths = [item["path"] for item in result["images"]]
    assert all(Image.open(path).size == (8, 8) for path in paths) and Image.open(out).format == "PNG"
    call = fakes["diffusion"].calls[-1]
    assert call["guidance"] == 1.5 and call["steps"] == 7 and call["seed"] == 5 and call["sampler"] == "ddim"
    first = [open(path, "rb").read() for path in paths]
    assert main(argv) == 0
    assert [open(path, "rb").read() for path in paths] == first  # same seed, same images
    assert main(argv[:-1] + ["6"]) == 0
    assert [open(path, "rb").read() for path in paths] != first  # another seed, other images


def test_rerank_keeps_the_judges_best_candidates(fakes):
    model, judge = fakes["diffusion"], fakes["judge"]
    kept, scores = imagine(model, ["a red square", "a green square"], n=2, judge=judge, candidates=6, guidance=1.0, seed=3)
    assert kept.shape == (4, 3, 8, 8) and scores.shape == (4,)
    every = sample(model, ["a red square"] * 6 + ["a green square"] * 6, seed=3, guidance=1.0)  # the same candidates
    arrays = list(every.mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    cosine = (judge.embed_images(arrays) * judge.embed_texts(["a red square"] * 6 + ["a green square"] * 6)).sum(-1)
    for row, start in ((0, 0), (2, 6)):
        best = every[start:start + 6][cosine[start:start + 6].topk(2).indices]
        assert torch.equal(kept[row:row + 2], best)  # the judge's two best of the prompt's six, best first
        assert torch.allclose(scores[row:row + 2], cosine[start:start + 6].topk(2).values)
    assert scores[0] >= scores[1] and scores[2] >= scores[3]
    plain, none = imagine(model, ["a red square"], n=2, guidance=1.0, seed=3)
    assert none is None and plain.shape == (2, 3, 8, 8)


def test_eval_judges_each_guidance_scale(fakes, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"image": "x.png", **record}) + "\n" for record in RECORDS))
    assert main(["eval", "text-to-image", "--model", "diffusion", "--judge", "judge", "--data", str(data),
                 "--guidance", "0", "3", "--steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 24 and result["classes"] == 3 and result["chance"] == pytest.approx(1 / 3, abs=1e-3)
    unguided, guided = result["results"]
    assert (unguided["guidance"], guided["guidance"]) == (0.0, 3.0)
    assert guided["judge_accuracy"] == 1.0 and unguided["judge_accuracy"] < 0.7
    assert guided["clip_score"] > unguided["clip_score"] + 30
    assert fakes["diffusion"].calls[-1]["steps"] == 4

    # A family without guidance is judged once; --n-prompts takes the first prompts.
    result = evaluate_text_to_image(fakes["autoregressive"], fakes["judge"], RECORDS, guidance_scales=[0, 3], n_prompts=5)
    assert result["prompts"] == 5 and len(result["results"]) == 1 and result["results"][0]["guidance"] is None


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "-1"], "--guidance -1.0 is negative"),
    (["--steps", "0"], "--steps 0 samples nothing"),
    (["--n", "0"], "--n 0 asks for no image"),
    (["--temperature", "1"], "does not take --temperature"),
    (["--candidates", "3"], "--candidates chooses among samples"),
    (["--rerank", "judge", "--n", "4", "--candidates", "2"], "--candidates 2 is fewer than --n 4"),
    (["--model", "nowhere"], "--model nowhere: nowhere is not a run folder"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(fakes, tmp_path, capsys, extra, message):
    out = tmp_path / "grid.png"
    assert main(["imagine", "a red square", "--model", "diffusion", "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_is_refused(fakes, tmp_path, capsys):
    assert main(["imagine", "  ", "--model", "diffusion", "--out", str(tmp_path / "g.png")]) == 2
    assert "a prompt is empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
