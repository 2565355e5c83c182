"""Dataset readers: JSONL, CSV/TSV, COCO, WebDataset shards, and image loading errors."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.formats import CorruptImage, expand_braces, load_image, read_records, tar_ref
from vlmkit.errors import UserError


def png_bytes(color=(200, 10, 10), size=(8, 6)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpg_bytes(color=(10, 200, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "b.png").write_bytes(png_bytes((0, 0, 255)))
    return tmp_path


def test_jsonl_paths_texts_and_pass_through(image_dir):
    absolute = str(image_dir / "img" / "b.png")
    lines = [
        {"image": "img/a.png", "text": "a red box", "label": "red", "qa": [{"question": "q", "answer": "a", "type": "t"}]},
        {"image": absolute, "texts": ["blue", "a blue box"], "objects": [{"name": "x", "box": [0, 0, 1, 1]}]},
    ]
    path = image_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # blank lines are fine
    records = read_records(path)
    assert records[0]["image"] == str(image_dir / "img" / "a.png")
    assert records[0]["texts"] == ["a red box"] and "text" not in records[0]
    assert records[0]["label"] == "red" and records[0]["qa"][0]["answer"] == "a"
    assert records[1]["image"] == absolute and records[1]["texts"] == ["blue", "a blue box"]
    assert records[1]["objects"][0]["box"] == [0, 0, 1, 1]
    assert np.asarray(load_image(records[0]["image"]))[0, 0].tolist() == [200, 10, 10]


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.png", "text": "ok"}\n{"image": "b.png", "text": }\n', "line 2 is not valid JSON"),
    ('{"image": "a.png"}\n', "line 1 has no caption"),
    ('{"text": "no image"}\n', "line 1 has no \"image\""),
    ('{"image": "a.png", "texts": "not a list"}\n', "not a list of strings"),
    ('["image", "a.png"]\n', "not an object"),
    ("\n", "contains no records"),
])
def test_jsonl_errors_name_the_line_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        read_records(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(UserError, match="unknown extension '.parquet'"):
        read_records(tmp_path / "data.parquet")


def test_require_text_false_allows_question_only_records(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"image": "a.png", "qa": []}\n')
    assert read_records(tmp_path / "qa.jsonl", require_text=False)[0]["texts"] == []


@pytest.mark.parametrize("separator", [",", "\t"])
def test_csv_and_tsv_with_openclip_columns(image_dir, separator):
    path = image_dir / "data.csv"
    path.write_text(f"filepath{separator}title\nimg/a.png{separator}\"a red, box\"\n{image_dir}/img/b.png{separator}blue\n",
                    encoding="utf-8-sig")  # with a BOM, as Excel writes it
    records = read_records(path)
    assert [record["texts"] for record in records] == [["a red, box"], ["blue"]]
    assert records[0]["image"] == str(image_dir / "img" / "a.png")


def test_csv_key_overrides_and_errors(image_dir):
    path = image_dir / "data.tsv"
    path.write_text("path\tcaption\nimg/a.png\ta red box\nimg/b.png\t\n")
    with pytest.raises(UserError, match="no 'filepath' column .*csv_img_key"):
        read_records(path)
    with pytest.raises(UserError, match="line 3 has an empty 'caption'"):
        read_records(path, csv_img_key="path", csv_caption_key="caption")
    path.write_text("path\tcaption\nimg/a.png\ta red box\n")
    assert read_records(path, csv_img_key="path", csv_caption_key="caption")[0]["texts"] == ["a red box"]


def test_coco_captions_json(image_dir):
    coco = {"images": [{"id": 1, "file_name": "img/a.png"}, {"id": 2, "file_name": "img/b.png"}, {"id": 3, "file_name": "c.png"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"}, {"image_id": 1, "caption": "uno"}]}
    (image_dir / "captions.json").write_text(json.dumps(coco))
    records = read_records(image_dir / "captions.json")
    assert [(record["texts"], record["image_id"]) for record in records] == [(["one", "uno"], 1), (["two"], 2)]


def write_shard(path, samples):
    with tarfile.open(path, "w") as archive:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "00000.tar", [
        ("00000.jpg", jpg_bytes()), ("00000.txt", b"a green square"),
        ("00000.json", json.dumps({"url": "http://x", "label": "green"}).encode()),
        ("00001.png", png_bytes()), ("00001.txt", "caf\u00e9 red".encode()),
    ])
    write_shard(folder / "00001.tar", [("00002.jpg", b"not a jpeg at all"), ("00002.txt", b"broken")])
    return folder


def test_webdataset_pattern_folder_and_single_tar(shards):
    by_pattern = read_records(str(shards / "{00000..00001}.tar"))
    assert [record["texts"] for record in by_pattern] == [["a green square"], ["caf\u00e9 red"], ["broken"]]
    assert by_pattern[0]["label"] == "green" and "url" not in by_pattern[0]
    assert by_pattern[0]["image"] == tar_ref(shards / "00000.tar", "00000.jpg")
    assert read_records(shards) == by_pattern
    assert read_records(shards / "00000.tar") == by_pattern[:2]
    assert load_image(by_pattern[1]["image"]).getpixel((0, 0)) == (200, 10, 10)
    assert load_image(by_pattern[0]["image"]).size == (8, 8)
    with pytest.raises(CorruptImage, match="cannot be decoded"):
        load_image(by_pattern[2]["image"])


def test_webdataset_errors(shards, tmp_path):
    with pytest.raises(UserError, match=r"00002.tar' .* does not exist \(4 of 6 missing\)"):
        read_records(str(shards / "{00000..00005}.tar"))
    write_shard(tmp_path / "nocap.tar", [("k.jpg", jpg_bytes())])
    with pytest.raises(UserError, match="sample 'k' has no caption"):
        read_records(tmp_path / "nocap.tar")
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="not a readable tar"):
        read_records(tmp_path / "junk.tar")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .tar shards"):
        read_records(empty)


def test_expand_braces():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    with pytest.raises(UserError):
        expand_braces("{oops}")


def test_load_image_modes_and_failures(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "gray.png").getpixel((1, 1)) == (77, 77, 77)
    assert load_image(str(tmp_path / "rgba.png")).mode == "RGB"
    with pytest.raises(CorruptImage, match="does not exist"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(size=(64, 64))[:60])
    with pytest.raises(CorruptImage, match="cannot be decoded"):
        load_image(truncated)
    assert issubclass(CorruptImage, UserError)
