"""The bad-input corpus (make_corpus.py) through train, embed, classify, eval, score and convert.

Each case ends either with exit 0 and the documented result, or with exit 2, exactly one line on
stderr, no traceback, and nothing half-written. Verbs run in-process (`vlmkit.cli.main`); a
subprocess is used only where the process boundary is the point (peak memory).

Which inputs fail and which are skipped, as the README's "Limits and bad input" section documents: a dataset
file that cannot be read (not UTF-8, bad JSON, nesting too deep, a caption that is not a string)
is an error naming the file and line; an image that cannot be used (missing, not a regular file,
over the limits, undecodable) is skipped and counted by commands that score a whole dataset
(train, eval) and is an error naming it for commands whose output is per input (classify, embed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vlmkit.cli import main

# Peak memory of decoding + preprocessing one corpus image (or tokenizing the 11 MB caption), above
# what the process held before: the bound the README's "Limits and bad input" section documents.
MEMORY_BOUND_MB = 200


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `vlmkit ARGV` in this process: (exit code, stdout, stderr). Python warnings, which the
    command line would print on stderr, are added to stderr as the lines they would be."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # what Python hides outside __main__ by default
        code = main([str(item) for item in argv])
    captured = capsys.readouterr()
    shown = "".join(f"{warning.filename}:{warning.lineno}: {warning.category.__name__}: {warning.message}\n"
                    for warning in caught)
    return code, captured.out, captured.err + shown


def assert_error(result, *fragments: str) -> str:
    """Exit 2, one line on stderr naming the problem (`fragments`), no traceback, nothing on stdout."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("vlmkit: error: "), err
    assert "Traceback" not in err and out == "", (out, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_json(result) -> dict:
    """Exit 0 and exactly one JSON object on stdout."""
    code, out, err = result
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


# ----------------------------------------------------------------------------- images, one at a time

# What each refused image is reported as (one line, exit 2), in classify and as embed's only image.
BAD_IMAGE_MESSAGES = {
    "thin_120k": "is 120000 x 1 px, over the input limits",
    "thin_400k": "is 400000 x 1 px, over the input limits",
    "huge_178mp": "is 13340 x 13340 px, over the input limits",
    "bomb_header": "claims 40000000000 pixels, more than PIL decodes",
    "truncated_png": "cannot be decoded (image file is truncated",
    "truncated_jpg": "cannot be decoded (image file is truncated",
    "text": "cannot be decoded (cannot identify image file",
    "empty": "cannot be decoded (cannot identify image file",
    "folder": "is a folder, not an image file",
    "fifo": "is a named pipe (FIFO), not an image file",
    "device": "is a device, not an image file",
    "missing": "does not exist",
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_MESSAGES))
def test_classify_refuses_each_bad_image_in_one_line(name, corpus, run, capsys):
    if name not in corpus.bad_images:
        pytest.skip("no FIFOs on this system")
    path = corpus.bad_images[name]
    assert_error(cli(capsys, "classify", path, "--model", run, "--labels", "red circle", "blue square"),
                 str(path), BAD_IMAGE_MESSAGES[name])


def test_classify_reads_every_odd_but_valid_image(corpus, run, capsys):
    paths = list(corpus.odd_images.values())
    result = assert_json(cli(capsys, "classify", *paths, "--model", run, "--labels", "red circle", "blue square",
                             "--top", 1))
    assert [item["image"] for item in result["predictions"]] == [str(path) for path in paths]
    assert all(len(item["top"]) == 1 and 0 <= item["top"][0]["probability"] <= 1 for item in result["predictions"])


# ----------------------------------------------------------------------------- datasets

# Dataset files that cannot be read: one line naming the file (and line), in every verb reading data.
BAD_DATA_MESSAGES = {
    "non_utf8_jsonl": "line 2 is not UTF-8",
    "non_utf8_csv": "is not UTF-8 (line 2",
    "nested_json": "nested too deeply",
    "nested_jsonl": "line 1 holds JSON nested too deeply",
    "caption_number": 'has a "text" that is a number (3), not a string',
    "caption_null": 'has no caption (its "text" is null)',
    "caption_list": 'has a "text" that is a list, not a string',
    "image_object": 'has no "image" path (its "image" is an object)',
    "bad_line": "line 2 is not valid JSON",
    "empty": "contains no records",
    "fifo": "is not a regular file (a device or a pipe)",
}


@pytest.mark.parametrize("name", sorted(BAD_DATA_MESSAGES))
def test_embed_and_eval_refuse_each_bad_data_file_in_one_line(name, corpus, run, tmp_path, capsys):
    if name not in corpus.data:
        pytest.skip("no FIFOs on this system")
    path = corpus.data[name]
    out = tmp_path / "embeddings.safetensors"
    assert_error(cli(capsys, "embed", "--model", run, "--data", path, "--out", out), str(path), BAD_DATA_MESSAGES[name])
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    assert_error(cli(capsys, "eval", "retrieval", "--model", run, "--data", path), BAD_DATA_MESSAGES[name])


@pytest.mark.parametrize("name", ["non_utf8_jsonl", "nested_json", "caption_number", "caption_null"])
def test_train_refuses_a_bad_data_file_and_leaves_no_run_folder(name, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert_error(cli(capsys, "train", "--recipe", "clip-vit-tiny", "--data", corpus.data[name], "--out", out, "steps=1"),
                 BAD_DATA_MESSAGES[name])
    assert not out.exists()


@pytest.mark.parametrize("name", ["bom_crlf_jsonl", "bom_tsv"])
def test_odd_but_valid_data_files_are_read(name, corpus, run, tmp_path, capsys):
    result = assert_json(cli(capsys, "embed", "--model", run, "--data", corpus.data[name], "--out", tmp_path / "e.safetensors"))
    assert result["image_embeddings"][0] == (2 if name == "bom_crlf_jsonl" else 1)


def test_an_11_mb_caption_is_cut_before_tokenizing(corpus, run, tmp_path, capsys):
    path = corpus.data["huge_caption"]
    assert path.stat().st_size > 11_000_000
    out = tmp_path / "sub" / "dir" / "e.safetensors"  # missing folders are created, as --help says
    result = assert_json(cli(capsys, "embed", "--model", run, "--data", path, "--out", out))
    assert result["text_embeddings"] == [2, 16] and out.is_file()
    assert assert_json(cli(capsys, "eval", "retrieval", "--model", run, "--data", path))["n_texts"] == 2


def test_training_skips_and_counts_bad_images_by_occurrence_and_file(corpus, synth, tmp_path, capsys):
    import re

    from reliability_helpers import TINY

    out = tmp_path / "run"
    # 8 good rows and every refused image twice, over about three epochs: each bad file is skipped
    # several times, and the report gives both numbers.
    bad_files = len(corpus.bad_images)
    steps = 3 * -(-(8 + 2 * bad_files) // 8)
    code, _, err = cli(capsys, "train", "--recipe", "clip-vit-tiny", "--data", corpus.data["bad_images"], "--out", out,
                       *TINY, f"steps={steps}", f"save_every={steps}")
    assert code == 0, err
    assert "Traceback" not in err
    summary = [line for line in err.splitlines() if "unreadable image" in line]
    assert len(summary) == 1, err
    match = re.match(r"vlmkit: skipped (\d+) unreadable image\(s\) \((\d+) files\): ", summary[0])
    assert match, summary[0]
    occurrences, files = int(match.group(1)), int(match.group(2))
    assert files == bad_files and occurrences >= 2 * files, summary[0]
    assert (out / "model.safetensors").is_file()


def test_evaluations_skip_and_count_bad_images_and_embed_names_the_first(corpus, run, capsys):
    import re

    bad_files = len(corpus.bad_images)
    data = corpus.data["bad_images"]  # 8 good records, each bad image twice
    code, out, err = cli(capsys, "eval", "zeroshot", "--model", run, "--data", data)
    assert code == 0 and json.loads(out)["n"] == 8, err
    assert re.fullmatch(rf"vlmkit: zero-shot leaves out {2 * bad_files} record\(s\) whose image cannot be used "
                        rf"\({bad_files} files\): .* and {bad_files - 3} more; fix or remove them", err.strip()), err
    code, out, err = cli(capsys, "eval", "retrieval", "--model", run, "--data", data)
    assert code == 0 and json.loads(out)["n_images"] == 8 and "retrieval leaves out" in err, err
    # A command whose output is one row per record does not drop records: embed names the image.
    assert_error(cli(capsys, "embed", "--model", run, "--data", data, "--out", corpus.root / "never.safetensors"),
                 "image '")
    assert not (corpus.root / "never.safetensors").exists()


# ----------------------------------------------------------------------------- commands


def test_embed_out_must_be_a_writable_file_path(corpus, run, synth, tmp_path, capsys):
    data = synth / "test.jsonl"
    folder = tmp_path / "existing"
    folder.mkdir()
    assert_error(cli(capsys, "embed", "--model", run, "--data", data, "--out", folder), "is an existing folder")
    assert list(folder.iterdir()) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_error(cli(capsys, "embed", "--model", run, "--data", data, "--out", a_file / "e.safetensors"),
                 "which is a file, not a folder")
    assert a_file.read_text() == "x"


def test_classify_top_zero_and_bad_templates(corpus, run, tmp_path, capsys):
    image = corpus.good_image
    labels = ["--labels", "red circle", "blue square"]
    assert_error(cli(capsys, "classify", image, "--model", run, *labels, "--top", 0), "--top 0 lists no label")
    for line, fragment in [("a {} and a {}", "has 2 '{}' fields, not one"), ("a photo of {name}", "named field"),
                           ("a photo of {", "unbalanced braces"), ("no field here", "has 0 '{}' fields")]:
        templates = tmp_path / "templates.txt"
        templates.write_text(f"a photo of a {{}}\n{line}\n")
        assert_error(cli(capsys, "classify", image, "--model", run, *labels, "--templates", templates), fragment)
        assert_error(cli(capsys, "eval", "zeroshot", "--model", run, "--data", corpus.data["odd_images"],
                         "--templates", templates), fragment)


def test_an_fp16_model_file_loads_as_fp32_with_a_note(corpus, run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(run, half, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(half / "model.safetensors")
    save_file({name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              half / "model.safetensors")
    code, out, err = cli(capsys, "classify", corpus.good_image, "--model", half, "--labels", "red circle", "blue square")
    assert code == 0 and "float16 tensor(s)); converted them to float32 on load" in err, err
    probability = json.loads(out)["predictions"][0]["top"][0]["probability"]
    assert 0.5 <= probability <= 1  # a finite probability (two labels: the top one is at least one half)


def test_an_openclip_file_with_a_foreign_vocabulary_says_how_to_attach_a_tokenizer(corpus, capsys):
    # The OpenCLIP golden file (scripts/make_openclip_golden.py) has a 320-token vocabulary.
    weights = Path(__file__).parents[1] / "golden" / "openclip_vit_gelu.safetensors"
    assert_error(cli(capsys, "classify", corpus.good_image, "--model", weights, "--labels", "a", "b"),
                 "has a 320-token vocabulary, not CLIP's 49,408", "model.tokenizer = vlmkit.tokenizers.Tokenizer.load(")


@pytest.mark.parametrize("name", ["malicious_pt", "malicious_bin", "truncated_pt"])
def test_pickles_never_run_and_end_in_one_line(name, corpus, run, tmp_path, capsys):
    source = corpus.pickles[name]
    out = tmp_path / "converted"
    assert_error(cli(capsys, "convert", source, out), str(source))
    assert_error(cli(capsys, "classify", corpus.good_image, "--model", source, "--labels", "a", "b"))
    assert not corpus.pickle_marker.exists()  # the pickled code never ran
    assert not out.exists() and [path.name for path in tmp_path.iterdir()] == []  # no staging folder left


# ----------------------------------------------------------------------------- score files

SCORE_MESSAGES = {
    "pred_non_utf8": "is not UTF-8 (line 1 holds byte 0xe9)",
    "pred_non_utf8_jsonl": "line 2 is not UTF-8",
    "pred_list_id": "has a 'image_id' that is a list; an id must be a string or a number",
    "pred_object_id": "has a 'image_id' that is an object",
    "pred_caption_number": "has a caption that is a number (3), not a string",
    "pred_caption_null": "has a caption that is null, not a string",
    "pred_huge_caption": "has a caption of 11,050,000 characters, over the text limit (65,536)",
}


@pytest.mark.parametrize("name", sorted(SCORE_MESSAGES))
def test_score_captions_refuses_each_bad_prediction_file(name, corpus, tmp_path, capsys):
    per_image = tmp_path / "per-image.json"
    assert_error(cli(capsys, "score", "captions", "--pred", corpus.scores[name], "--refs", corpus.scores["refs"],
                     "--per-image", per_image), SCORE_MESSAGES[name])
    assert not per_image.exists()


def test_score_nested_refs_unhashable_vqa_ids_and_per_image_paths(corpus, tmp_path, capsys):
    scores = corpus.scores
    assert_error(cli(capsys, "score", "captions", "--pred", scores["pred"], "--refs", scores["refs_nested"]),
                 "nested too deeply")
    assert_error(cli(capsys, "score", "vqa", "--pred", scores["vqa_pred_list_id"], "--refs", scores["vqa_refs"]),
                 "'question_id' that is a list")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    assert_error(cli(capsys, "score", "captions", "--pred", scores["pred"], "--refs", scores["refs"],
                     "--per-image", folder), "--per-image", "is an existing folder")
    per_image = tmp_path / "missing" / "dir" / "per-image.json"  # created, as --help says
    result = assert_json(cli(capsys, "score", "captions", "--pred", scores["pred"], "--refs", scores["refs"],
                             "--per-image", per_image))
    assert "CIDEr" in result and len(json.loads(per_image.read_text())) == 2
    assert sorted(path.name for path in per_image.parent.iterdir()) == ["per-image.json"]  # no temporary left


# ----------------------------------------------------------------------------- memory, in a subprocess

_MEASURE = r"""
import json, os, resource, sys
from vlmkit.data.formats import load_image
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import UserError
from vlmkit.tokenizers import clip_tokenizer

transform, tokenizer = ImageTransform(224), clip_tokenizer()

def peak_growth_mb(work):
    # Each measurement in a fresh child: its peak RSS above the RSS it started from.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            outcome = work()
        except UserError as error:
            outcome = "refused: " + str(error)[:60]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        os.write(write, json.dumps([(after - before) / 1024, outcome]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    return json.loads(os.read(read, 1 << 16))

results = {}
for path in json.loads(sys.argv[1]):
    results[path] = peak_growth_mb(lambda: tuple(transform(load_image(path)).shape))
caption = "a red circle " * 850_000
results["11 MB caption"] = peak_growth_mb(lambda: tuple(tokenizer([caption]).shape))
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="measures each case in a forked child")
def test_peak_memory_of_every_corpus_image_and_the_huge_caption_is_bounded(corpus):
    paths = [str(path) for name, path in {**corpus.bad_images, **corpus.odd_images}.items()
             if name not in ("fifo", "device", "missing")]
    done = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(paths)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    over = {case: growth for case, (growth, _) in results.items() if growth > MEMORY_BOUND_MB}
    assert not over, over
    outcomes = {Path(case).name: outcome for case, (_, outcome) in results.items()}
    assert outcomes["strip-16000x1.png"] == [3, 224, 224]  # thin but within the limits: read, bounded
    assert outcomes["at-pixel-limit-6324x6324.png"] == [3, 224, 224]  # the worst case the limits allow
    assert outcomes["huge-178mp.png"].startswith("refused") and outcomes["thin-1x400000.png"].startswith("refused")
    assert outcomes["11 MB caption"] == [1, 77]


def test_a_large_jpeg_is_reduced_on_load_under_a_lowered_pixel_limit(corpus):
    from vlmkit.data.formats import load_image
    from vlmkit.data.limits import InputLimits, set_limits
    from vlmkit.errors import UserError

    path = corpus.odd_images["large_jpeg"]  # 2400 x 1800 = 4.3 megapixels
    assert load_image(path, InputLimits(max_image_pixels=1_500_000)).size == (1200, 900)  # draft: 1/2 a side
    assert load_image(path, InputLimits(max_image_pixels=100_000)).size == (300, 225)  # 1/8 a side
    with pytest.raises(UserError, match="over the input limits"):
        load_image(path, InputLimits(max_image_pixels=50_000))  # even 1/8 is over: refused
    with pytest.raises(UserError, match="over the input limits"):
        load_image(corpus.odd_images["palette_transparency"], InputLimits(max_image_side=39))  # PNG: no draft
    try:  # the process-wide setting is what load_image uses by default
        set_limits(max_image_pixels=1_500_000)
        assert load_image(path).size == (1200, 900)
    finally:
        set_limits(max_image_pixels=None)
    assert load_image(path).size == (2400, 1800)


def test_limits_come_from_the_environment_and_bad_values_are_one_line(corpus, run, monkeypatch, capsys):
    from vlmkit.data.limits import current_limits

    monkeypatch.setenv("VLMKIT_MAX_TEXT_CHARS", "100")
    monkeypatch.setenv("VLMKIT_MAX_IMAGE_SIDE", "1000")
    assert current_limits().max_text_chars == 100 and current_limits().max_image_side == 1000
    assert_error(cli(capsys, "classify", corpus.odd_images["strip_16k"], "--model", run, "--labels", "a", "b"),
                 "is 16000 x 1 px, over the input limits")
    # A JPEG over the side limit is reduced on load (2400 x 1800 -> 600 x 450) instead of refused.
    assert_json(cli(capsys, "classify", corpus.odd_images["large_jpeg"], "--model", run, "--labels", "a", "b"))
    monkeypatch.setenv("VLMKIT_MAX_IMAGE_SIDE", "big")
    assert_error(cli(capsys, "classify", corpus.good_image, "--model", run, "--labels", "a", "b"),
                 "VLMKIT_MAX_IMAGE_SIDE='big' is not an integer")
    monkeypatch.setenv("VLMKIT_MAX_IMAGE_SIDE", "0")
    assert_error(cli(capsys, "classify", corpus.good_image, "--model", run, "--labels", "a", "b"),
                 "max_image_side must be a positive integer")


def test_text_is_cut_to_the_limit_before_tokenizing(monkeypatch):
    from vlmkit.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(context_length=77)
    monkeypatch.setenv("VLMKIT_MAX_TEXT_CHARS", "13")
    assert tokenizer.encode("a red circle and more words") == tokenizer.encode("a red circle ")
    assert torch.equal(tokenizer(["a red circle and more words"]), tokenizer(["a red circle"]))


def test_a_shard_member_too_large_for_any_image_within_the_limits_is_refused_unread(corpus, tmp_path, monkeypatch):
    import io
    import tarfile

    from vlmkit.data.formats import load_image, read_records
    from vlmkit.errors import UserError

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in [("big.png", os.urandom(1_200_000)), ("big.txt", b"a caption"),
                           ("good.png", corpus.good_image.read_bytes()), ("good.txt", b"a red circle")]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    big, good = sorted(read_records(shard), key=lambda record: record["image"])
    monkeypatch.setenv("VLMKIT_MAX_IMAGE_PIXELS", "1024")  # at most 4 bytes a pixel + 1 MiB: 1,052,672 bytes
    with pytest.raises(UserError, match="is a 1,200,000-byte file, more than an image within the input limits"):
        load_image(big["image"])
    assert load_image(good["image"]).size == (32, 32)


@pytest.mark.parametrize("content, fragment", [(b'{"family": "clip", "note": "caf\xe9"}', "is not UTF-8 (line 1"),
                                               (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")])
def test_a_damaged_config_json_in_a_model_folder_is_one_line(content, fragment, corpus, run, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("checkpoints"))
    (damaged / "config.json").write_bytes(content)
    assert_error(cli(capsys, "classify", corpus.good_image, "--model", damaged, "--labels", "a", "b"),
                 str(damaged / "config.json"), fragment)


def test_skip_counts_give_occurrences_and_files_also_after_a_resume():
    from vlmkit.data.loader import SkipCounter

    counter = SkipCounter()
    for _ in range(3):  # three epochs over the same two bad files
        counter.update({"num_skipped": 2, "skipped": ["a.png", "b.png"]})
    assert counter.message().startswith("skipped 6 unreadable image(s) (2 files): a.png, b.png;")
    assert counter.summary()["skipped"] == 6 and counter.summary()["skipped_files"] == 2
    resumed = SkipCounter()
    resumed.total = 10  # restored from a checkpoint, without the file names
    resumed.update({"num_skipped": 1, "skipped": ["a.png"]})
    assert resumed.message().startswith("skipped 11 unreadable image(s) (1 file since the resume): a.png;")


def test_convert_refuses_a_used_destination_before_loading_and_writes_nothing(corpus, run, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert_error(cli(capsys, "convert", run, used), "already exists and is not an empty folder")
    assert [path.name for path in used.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_error(cli(capsys, "convert", run, a_file), "already exists")
    assert_error(cli(capsys, "convert", run, a_file / "converted"), "which is a file, not a folder")
    out = tmp_path / "new" / "converted"  # missing parents are created, as --help says
    assert assert_json(cli(capsys, "convert", run, out))["out"] == str(out)
    assert (out / "model.safetensors").is_file() and [path.name for path in out.parent.iterdir()] == ["converted"]
