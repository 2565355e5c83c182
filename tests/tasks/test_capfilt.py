"""CapFilt: the noisy built-in captions, the caption-and-filter pipeline, and its bad-input contract."""
import json
import re

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.data.synthetic import CLASSES, generate
from vlmkit.errors import MissingCapability, UserError


# ---- data synth --caption-noise -----------------------------------------------------------------
def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The same small dataset clean and with 40% caption noise (one class held out)."""
    clean, noisy = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("noisy")
    generate(clean, n=60, seed=1, holdout=["red triangle"], progress=False)
    summary = generate(noisy, n=60, seed=1, holdout=["red triangle"], progress=False, caption_noise=0.4)
    return clean, noisy, summary


def test_caption_noise_corrupts_exactly_that_fraction_of_train_captions_and_leaves_the_rest(noisy):
    clean_dir, noisy_dir, summary = noisy
    clean, corrupted = _lines(clean_dir / "train.jsonl"), _lines(noisy_dir / "train.jsonl")
    total = sum(len(record["texts"]) for record in clean)
    counts = summary["caption_noise"]
    assert counts["captions"] == total and counts["corrupted"] == round(0.4 * total)
    assert max(counts[kind] for kind in ("color", "shape", "unrelated")) - min(
        counts[kind] for kind in ("color", "shape", "unrelated")) <= 1  # equal thirds
    changed = 0
    for before, after in zip(clean, corrupted):
        notes = {item["text"]: item for item in after.pop("caption_noise", [])}
        present = {obj["name"] for obj in before["objects"]}
        for old, new in zip(before["texts"], after["texts"]):
            if old == new:
                continue
            changed += 1
            note = notes[new]
            assert note["clean"] == old and new != old
            names = set(re.findall(r"(?:%s)" % "|".join(CLASSES), new))
            if note["kind"] in ("color", "shape"):
                assert names - present, (old, new)  # names something the scene does not show
                assert "red triangle" not in names  # never the held-out pair
                assert not re.search(r"\ba [aeiou]|\ban [^aeiou]", new)  # articles follow the new word
            else:
                assert not names
        assert {key: value for key, value in after.items() if key != "texts"} == \
               {key: value for key, value in before.items() if key != "texts"}
    assert changed == counts["corrupted"]
    # The test split, the images and meta's other fields are untouched.
    assert (noisy_dir / "test.jsonl").read_bytes() == (clean_dir / "test.jsonl").read_bytes()
    assert (noisy_dir / "images" / "train-000003.png").read_bytes() == (clean_dir / "images" / "train-000003.png").read_bytes()
    assert json.loads((noisy_dir / "meta.json").read_text())["caption_noise"] == counts


def test_caption_noise_is_seeded_and_checked(tmp_path, noisy):
    _, noisy_dir, _ = noisy
    generate(tmp_path / "again", n=60, seed=1, holdout=["red triangle"], progress=False, caption_noise=0.4)
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (noisy_dir / "train.jsonl").read_bytes()
    generate(tmp_path / "zero", n=60, seed=1, holdout=["red triangle"], progress=False, caption_noise=0.0)
    assert "caption_noise" not in (tmp_path / "zero" / "train.jsonl").read_text()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="--caption-noise .* is not a fraction"):
            generate(tmp_path / "bad", n=60, caption_noise=bad, progress=False)
    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--n", "4", "--caption-noise", "2"]) == 2


# ---- the pipeline ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(noisy, tmp_path_factory):
    """A tiny untrained matcher + captioner run folder, its tokenizer learned from the noisy captions."""
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.config import apply_overrides
    from vlmkit.tokenizers import train_wordpiece

    _, noisy_dir, _ = noisy
    texts = [text for record in _lines(noisy_dir / "train.jsonl") for text in record["texts"]]
    tokenizer = train_wordpiece(texts, vocab_size=300, context_length=32)
    family, config = named_config("blip-tiny")
    cls = get_family(family)
    config = apply_overrides(cls.adapt_config_to_tokenizer(config, tokenizer), {
        "text.width": 64, "text.depth": 1, "vision.width": 64, "vision.depth": 1})
    torch.manual_seed(0)
    model = cls.from_config_dict(config)
    model.tokenizer, model.transform = tokenizer, ImageTransform(64)
    folder = tmp_path_factory.mktemp("blip-run")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(run):
    return vlmkit.load(run)


@pytest.fixture(scope="module")
def records(noisy):
    from vlmkit.data.formats import read_records

    return read_records(noisy[1] / "train.jsonl")[:12]


def test_sampled_captions_are_seeded(model, records):
    from vlmkit.tasks.capfilt import run_capfilt

    def synthetic(seed):
        out, _ = run_capfilt(model, model, records, samples=2, threshold=0.0, seed=seed, batch_size=6, progress=False,
                             max_new_tokens=6)
        return [[item["text"] for item in record["capfilt"] if item["source"] == "synthetic"] for record in out]

    first = synthetic(0)
    assert sum(map(len, first)) > 0 and synthetic(0) == first and synthetic(1) != first


def test_the_filter_keeps_exactly_the_captions_scored_above_the_threshold(model, records):
    from vlmkit.tasks.capfilt import run_capfilt

    everything, summary = run_capfilt(model, model, records, samples=2, threshold=0.0, seed=3, batch_size=5,
                                      progress=False, max_new_tokens=6)
    scored = {(record["image"], item["text"]): item for record in everything for item in record["capfilt"]}
    assert summary["web_captions"]["scored"] == sum(len(set(record["texts"])) for record in records)
    assert len(scored) == summary["web_captions"]["kept"] + summary["synthetic_captions"]["kept"]
    # The score is the model's own match probability for that image and text.
    image, text = next(iter(scored))
    probability = model.match(model.preprocess([image]), model.tokenize([text]))[0].item()
    assert scored[(image, text)]["score"] == pytest.approx(probability, abs=1e-5)
    # Halfway between two neighbouring scores (they are written rounded to 6 decimals).
    values = sorted({item["score"] for item in scored.values()})
    threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    kept, summary = run_capfilt(model, model, records, samples=2, threshold=threshold, seed=3, batch_size=5,
                                progress=False, max_new_tokens=6)
    expected = {key for key, item in scored.items() if item["score"] > threshold}
    assert {(record["image"], text) for record in kept for text in record["texts"]} == expected
    assert 0 < len(expected) < len(scored) and summary["records_without_kept_caption"] == len(records) - len(kept)
    assert set(summary["caption_noise"]) == {"noisy_web", "noisy_web_dropped", "clean_web", "clean_web_kept",
                                             "roc_auc", "kept_precision", "clean_kept", "dropped_by_kind"}
    noise = summary["caption_noise"]
    assert noise["noisy_web"] > 0 and 0.0 <= noise["roc_auc"] <= 1.0
    assert set(noise["dropped_by_kind"]) <= {"color", "shape", "unrelated"}
    assert all(record["label"] == source["label"] for record in kept for source in records
               if source["image"] == record["image"] and "label" in source)


def test_filter_quality_against_hand_counted_pairs():
    from vlmkit.tasks.capfilt import filter_quality, roc_auc

    scores = [0.9, 0.8, 0.8, 0.3, 0.1]
    kinds = [None, None, "color", "shape", None]  # clean at 0.9, 0.8, 0.1; corrupted at 0.8, 0.3
    # clean-over-corrupted pairs: 0.9 beats both, 0.8 ties 0.8 (half) and beats 0.3, 0.1 beats none: 3.5 of 6
    quality = filter_quality(scores, kinds, threshold=0.5)
    assert quality["roc_auc"] == pytest.approx(3.5 / 6)
    assert quality["kept_precision"] == pytest.approx(2 / 3) and quality["clean_kept"] == pytest.approx(2 / 3)
    assert quality["dropped_by_kind"] == {"color": 0.0, "shape": 1.0}
    assert roc_auc([3, 2, 1], [True, True, False]) == 1.0 and roc_auc([1, 2, 3], [True, True, False]) == 0.0
    assert roc_auc([1.0, 1.0], [True, False]) == 0.5 and roc_auc([1, 2], [True, True]) is None
    assert filter_quality([0.1], [None], threshold=0.5)["kept_precision"] is None


def test_hard_negatives_skip_pairs_with_the_same_caption():
    from vlmkit.losses import sample_hard_negatives

    similarity = torch.tensor([[5.0, 4.9, 0.0, 0.0], [4.9, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    same = torch.zeros(4, 4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # rows 0 and 1 carry one caption: each is the other's hardest "negative"
    generator = torch.Generator().manual_seed(0)
    plain = torch.stack([sample_hard_negatives(similarity, generator) for _ in range(200)])
    assert (plain[:, 0] == 1).float().mean() > 0.9  # without the mask the duplicate is nearly always drawn
    draws = torch.stack([sample_hard_negatives(similarity, generator, same) for _ in range(200)])  # (200, 4)
    assert not (draws[:, 0] == 1).any() and not (draws[:, 1] == 0).any() and not (draws == torch.arange(4)).any()
    assert set(draws[:, 0].tolist()) == {2, 3}
    everyone = ~torch.eye(2, dtype=torch.bool)  # every other pair shares the caption: BLIP's draw is kept
    assert sample_hard_negatives(torch.zeros(2, 2), generator, everyone).tolist() == [1, 0]


def test_capfilt_needs_a_captioner_and_a_matching_filter(model, records):
    from vlmkit.tasks.capfilt import run_capfilt

    clip = vlmkit.create_model("clip-tiny")
    with pytest.raises(MissingCapability, match="match image and text"):
        run_capfilt(model, clip, records, progress=False)
    with pytest.raises(MissingCapability, match="generate text"):
        run_capfilt(clip, model, records, progress=False)
    with pytest.raises(UserError, match="--top-p"):
        run_capfilt(model, model, records, top_p=0.0, progress=False)


# ---- the command line -----------------------------------------------------------------------------
@pytest.fixture()
def data(tmp_path, noisy):
    """Eight noisy records, then a missing image and a truncated one."""
    lines = (noisy[1] / "train.jsonl").read_text().splitlines()[:8]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = [json.loads(line) for line in lines]
    for record in records:
        record["image"] = str(noisy[1] / record["image"])
    records += [{"image": "gone.png", "text": "a red circle"}, {"image": "broken.png", "text": "a blue star"}]
    path = tmp_path / "noisy.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _cli(capsys, *argv):
    code = main(["capfilt", *argv, "--no-progress", "--samples", "1", "--max-new-tokens", "5", "--threshold", "0"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_skips_and_counts_unreadable_images_and_writes_a_dataset(run, data, tmp_path, capsys):
    from vlmkit.data.formats import read_records

    out = tmp_path / "sub" / "clean.jsonl"
    code, stdout, stderr = _cli(capsys, "--model", str(run), "--data", str(data), "--out", str(out))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["skipped_images"] == 2 and summary["images"] == 10 and "skipped 2 record(s)" in stderr
    written = read_records(out)
    assert len(written) == summary["records_written"] > 0
    assert not json.loads(out.read_text().splitlines()[0])["image"].startswith("/")  # relative to the output
    assert all(record["texts"] == [item["text"] for item in record["capfilt"]] for record in written)


def test_cli_does_not_overwrite_without_overwrite(run, data, tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    out.write_text("keep me\n")
    code, stdout, stderr = _cli(capsys, "--model", str(run), "--data", str(data), "--out", str(out))
    assert code == 2 and stdout == "" and out.read_text() == "keep me\n"
    assert len(stderr.strip().splitlines()) == 1 and "--overwrite" in stderr
    code, stdout, stderr = _cli(capsys, "--model", str(run), "--data", str(data), "--out", str(out), "--overwrite")
    assert code == 0 and out.read_text() != "keep me\n"
    code, _, stderr = _cli(capsys, "--data", str(data), "--out", str(tmp_path / "x.jsonl"))
    assert code == 2 and "--captioner" in stderr


@pytest.mark.parametrize("interruption", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_interrupted_run_leaves_no_output_and_the_old_file_whole(run, data, tmp_path, capsys, monkeypatch, interruption):
    family = type(vlmkit.load(run))
    calls = []
    original = family.match

    def failing(self, pixels, tokens):
        calls.append(1)
        if len(calls) > 1:  # the second batch: some output is already computed, none written
            raise interruption
        return original(self, pixels, tokens)

    monkeypatch.setattr(family, "match", failing)
    fresh, old = tmp_path / "fresh.jsonl", tmp_path / "old.jsonl"
    old.write_text("previous\n")
    argv = ["--model", str(run), "--data", str(data), "--batch-size", "3"]
    if isinstance(interruption, KeyboardInterrupt):
        assert _cli(capsys, *argv, "--out", str(fresh))[0] == 130
        assert _cli(capsys, *argv, "--out", str(old), "--overwrite")[0] == 130
    else:
        with pytest.raises(RuntimeError):
            _cli(capsys, *argv, "--out", str(fresh))
        with pytest.raises(RuntimeError):
            _cli(capsys, *argv, "--out", str(old), "--overwrite")
    assert len(calls) >= 2 and not fresh.exists() and old.read_text() == "previous\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["broken.png", "noisy.jsonl", "old.jsonl"])
