"""The bad-input corpus: files a hostile or careless user gives vlmkit, generated (nothing binary is
checked in).

    python tests/reliability/make_corpus.py OUT_DIR      # writes the corpus, prints its index as JSON

`make_corpus(root)` (what tests/reliability/test_corpus.py uses) writes, under `root`:
- images/: thin images (1 x 120,000 and 1 x 400,000 px PNGs of a few hundred bytes), a 178-megapixel
  PNG (just under PIL's decompression-bomb limit, under 1 MB), a PNG whose header claims 40
  gigapixels, truncated PNG and JPEG files, text and empty files named .png, a folder and a FIFO
  named .png, a JPEG to be reduced on load, and odd but valid images (palette with transparency,
  16-bit grey, CMYK, grey + alpha, an animated GIF, 1-bit BMP, a 1 x 16,000 px strip, and the
  largest image the default limits let through: 6,324 x 6,324 px RGB, 40 megapixels);
- data/: JSONL, JSON and CSV datasets that are not UTF-8, nested thousands of levels deep, with a
  caption that is a number, null or a list, with an 11 MB caption, or with every bad image above;
- scores/: caption and VQA score files with the same faults and with ids that are lists or objects;
- pickles/: a "weights" .pt whose unpickling would run code (it writes a marker file if it ever runs).

Good data (the built-in synthetic scenes) comes from `vlmkit.data.synthetic.generate`.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# PIL refuses to open images above 2 * Image.MAX_IMAGE_PIXELS (178,956,970 pixels by default).
HUGE_SIDE = 13_340  # 13,340^2 = 177,955,600 pixels: the largest square PIL itself would still decode


@dataclass
class Corpus:
    """Paths of the generated corpus, by name (see the module docstring)."""

    root: Path
    good_image: Path
    bad_images: dict[str, Path] = field(default_factory=dict)   # refused: name -> path
    odd_images: dict[str, Path] = field(default_factory=dict)   # unusual but valid: name -> path
    data: dict[str, Path] = field(default_factory=dict)
    scores: dict[str, Path] = field(default_factory=dict)
    pickles: dict[str, Path] = field(default_factory=dict)
    pickle_marker: Path | None = None

    def index(self) -> dict:
        """Every path as a string, for printing."""
        paths = {"good_image": self.good_image, **{f"bad_images.{k}": v for k, v in self.bad_images.items()},
                 **{f"odd_images.{k}": v for k, v in self.odd_images.items()},
                 **{f"data.{k}": v for k, v in self.data.items()}, **{f"scores.{k}": v for k, v in self.scores.items()},
                 **{f"pickles.{k}": v for k, v in self.pickles.items()}}
        return {key: str(value) for key, value in paths.items()}


# ----------------------------------------------------------------------------- images


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_black_png(path: Path, width: int, height: int, truncate_data: bool = False, rgb: bool = False) -> Path:
    """A black 8-bit grey (or RGB) PNG of any size, streamed (a 178-megapixel one is 780 KB and never
    held in memory). With `truncate_data` only the header and a scrap of pixel data are written: a
    file whose header claims a size it cannot hold."""
    compressor = zlib.compressobj(1)
    row = b"\x00" * ((3 if rgb else 1) * width + 1)  # filter byte + pixels
    rows_per_block = max(1, 1_000_000 // len(row))
    parts, left = [], (min(height, 4) if truncate_data else height)
    while left > 0:
        count = min(left, rows_per_block)
        parts.append(compressor.compress(row * count))
        left -= count
    parts.append(compressor.flush())
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _bad_images(folder: Path) -> dict[str, Path]:
    images = {
        "thin_120k": write_black_png(folder / "thin-1x120000.png", 120_000, 1),
        "thin_400k": write_black_png(folder / "thin-1x400000.png", 400_000, 1),
        "huge_178mp": write_black_png(folder / "huge-178mp.png", HUGE_SIDE, HUGE_SIDE),
        "bomb_header": write_black_png(folder / "bomb-200000x200000.png", 200_000, 200_000, truncate_data=True),
    }
    png = folder / "truncated.png"
    _noise(64, 64, 1).save(png)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    jpeg = folder / "truncated.jpg"
    _noise(64, 64, 2).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    text = folder / "text.png"
    text.write_text("this is not an image\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    directory = folder / "folder.png"
    directory.mkdir()
    images.update(truncated_png=png, truncated_jpg=jpeg, text=text, empty=empty, folder=directory,
                  missing=folder / "missing.png", device=Path("/dev/zero"))
    if hasattr(os, "mkfifo"):
        fifo = folder / "fifo.png"
        os.mkfifo(fifo)
        images["fifo"] = fifo
    return images


def _odd_images(folder: Path) -> dict[str, Path]:
    """Unusual but valid images every verb must read."""
    paths = {}
    palette = _noise(40, 30, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    paths["palette_transparency"] = folder / "palette-transparency.png"
    palette.save(paths["palette_transparency"], transparency=0)
    paths["grey16"] = folder / "grey-16bit.png"
    Image.fromarray((np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40)).save(paths["grey16"])
    paths["cmyk"] = folder / "cmyk.jpg"
    _noise(40, 40, 4).convert("CMYK").save(paths["cmyk"])
    paths["grey_alpha"] = folder / "grey-alpha.png"
    _noise(33, 47, 5).convert("LA").save(paths["grey_alpha"])
    paths["animated_gif"] = folder / "animated.gif"
    frames = [_noise(32, 32, seed).convert("P") for seed in range(3)]
    frames[0].save(paths["animated_gif"], save_all=True, append_images=frames[1:], duration=50)
    paths["bilevel_bmp"] = folder / "bilevel.bmp"
    _noise(31, 29, 6).convert("1").save(paths["bilevel_bmp"])
    paths["strip_16k"] = folder / "strip-16000x1.png"
    Image.fromarray(np.random.RandomState(7).randint(0, 256, (1, 16_000, 3), dtype=np.uint8)).save(paths["strip_16k"])
    # The largest image the default limits let through (40 megapixels, RGB): the memory worst case.
    paths["at_pixel_limit"] = write_black_png(folder / "at-pixel-limit-6324x6324.png", 6324, 6324, rgb=True)
    paths["large_jpeg"] = folder / "large-2400x1800.jpg"  # reduced on load when the pixel limit is lowered
    _noise(300, 225, 8).resize((2400, 1800)).save(paths["large_jpeg"], quality=85)
    return paths


# ----------------------------------------------------------------------------- data and score files


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _data_files(folder: Path, good: Path, corpus: Corpus) -> dict[str, Path]:
    deep = 100_000  # far past Python's recursion limit
    files = {}
    files["non_utf8_jsonl"] = folder / "latin1.jsonl"
    files["non_utf8_jsonl"].write_bytes(
        (json.dumps({"image": str(good), "text": "fine"}) + "\n").encode() + b'{"image": "%s", "text": "caf\xe9"}\n' % str(good).encode()
    )
    files["non_utf8_csv"] = folder / "latin1.csv"
    files["non_utf8_csv"].write_bytes(b"filepath,title\n%s,caf\xe9 au lait\n" % str(good).encode())
    files["nested_json"] = folder / "nested.json"
    files["nested_json"].write_bytes(b"[" * deep + b"]" * deep)
    files["nested_jsonl"] = folder / "nested.jsonl"
    files["nested_jsonl"].write_bytes(b'{"image": "a.png", "text": ' + b"[" * deep + b"]" * deep + b"}\n")
    files["caption_number"] = _jsonl(folder / "caption-number.jsonl", [{"image": str(good), "text": 3}])
    files["caption_null"] = _jsonl(folder / "caption-null.jsonl", [{"image": str(good), "text": None}])
    files["caption_list"] = _jsonl(folder / "caption-list.jsonl", [{"image": str(good), "text": ["a", "b"]}])
    files["image_object"] = _jsonl(folder / "image-object.jsonl", [{"image": {"path": "a.png"}, "text": "a"}])
    files["bad_line"] = folder / "bad-line.jsonl"
    files["bad_line"].write_text(json.dumps({"image": str(good), "text": "ok"}) + '\n{"image": "b.png", "text": }\n')
    files["empty"] = folder / "empty.jsonl"
    files["empty"].write_text("")
    if hasattr(os, "mkfifo"):  # reading it would block forever
        files["fifo"] = folder / "fifo.jsonl"
        os.mkfifo(files["fifo"])
    files["huge_caption"] = _jsonl(folder / "huge-caption.jsonl",
                                   [{"image": str(good), "text": "a red circle " * 850_000, "label": "red circle"},
                                    {"image": str(good), "text": "a blue square", "label": "blue square"}])
    # Odd but valid: a byte-order mark, Windows line ends, a CSV with a BOM and tabs.
    line = json.dumps({"image": str(good), "text": "a red circle"})
    files["bom_crlf_jsonl"] = folder / "bom-crlf.jsonl"
    files["bom_crlf_jsonl"].write_bytes(b"\xef\xbb\xbf" + (line + "\r\n" + line + "\r\n").encode())
    files["bom_tsv"] = folder / "bom.tsv"
    files["bom_tsv"].write_bytes(b"\xef\xbb\xbffilepath\ttitle\r\n%s\ta red circle\r\n" % str(good).encode())
    # Good scenes with every refused image twice (as two epochs would): a run skips and counts them.
    bad = list(corpus.bad_images.values())
    rows = [{"image": str(good), "text": "a red circle", "label": "red circle"},
            {"image": str(good), "text": "a blue square", "label": "blue square"}] * 4
    rows += [{"image": str(path), "text": "a broken image", "label": "red circle"} for path in bad + bad]
    files["bad_images"] = _jsonl(folder / "bad-images.jsonl", rows)
    files["odd_images"] = _jsonl(folder / "odd-images.jsonl", [
        {"image": str(path), "text": f"an odd image {name}", "label": "red circle" if number % 2 else "blue square"}
        for number, (name, path) in enumerate(corpus.odd_images.items())])
    return files


def _score_files(folder: Path) -> dict[str, Path]:
    refs = [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a blue square"}]
    files = {"refs": folder / "refs.json", "pred": folder / "pred.json"}
    files["refs"].write_text(json.dumps({"annotations": refs}))
    files["pred"].write_text(json.dumps([{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "a square"}]))
    files["pred_non_utf8"] = folder / "pred-latin1.json"
    files["pred_non_utf8"].write_bytes(b'[{"image_id": 1, "caption": "caf\xe9"}]')
    files["pred_non_utf8_jsonl"] = folder / "pred-latin1.jsonl"
    files["pred_non_utf8_jsonl"].write_bytes(b'{"image_id": 1, "caption": "a"}\n{"image_id": 2, "caption": "caf\xe9"}\n')
    files["refs_nested"] = folder / "refs-nested.json"
    files["refs_nested"].write_bytes(b"[" * 100_000 + b"]" * 100_000)
    files["pred_list_id"] = folder / "pred-list-id.json"
    files["pred_list_id"].write_text(json.dumps([{"image_id": [1], "caption": "a red circle"}]))
    files["pred_object_id"] = folder / "pred-object-id.json"
    files["pred_object_id"].write_text(json.dumps([{"image_id": {"id": 1}, "caption": "a red circle"}]))
    files["pred_caption_number"] = folder / "pred-caption-number.json"
    files["pred_caption_number"].write_text(json.dumps([{"image_id": 1, "caption": 3}, {"image_id": 2, "caption": "a"}]))
    files["pred_caption_null"] = folder / "pred-caption-null.json"
    files["pred_caption_null"].write_text(json.dumps([{"image_id": 1, "caption": None}]))
    files["pred_huge_caption"] = folder / "pred-huge-caption.json"
    files["pred_huge_caption"].write_text(json.dumps([{"image_id": 1, "caption": "a red circle " * 850_000}]))
    files["vqa_refs"] = folder / "vqa-refs.json"
    files["vqa_refs"].write_text(json.dumps({"annotations": [{"question_id": 1, "answers": ["yes"] * 10}]}))
    files["vqa_pred_list_id"] = folder / "vqa-pred-list-id.json"
    files["vqa_pred_list_id"].write_text(json.dumps([{"question_id": [1], "answer": "yes"}]))
    return files


# ----------------------------------------------------------------------------- pickles


class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: a stand-in for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickles(folder: Path, marker: Path) -> dict[str, Path]:
    files = {"malicious_pt": folder / "malicious.pt", "malicious_bin": folder / "pytorch_model.bin"}
    # Protocol 2 (torch's own) reaches the code-running global; protocol 4 fails at its first frame.
    for path, protocol in zip(files.values(), (2, 4)):
        with open(path, "wb") as handle:
            pickle.dump({"state_dict": _RunsCode(str(marker))}, handle, protocol=protocol)
    files["truncated_pt"] = folder / "truncated.pt"
    files["truncated_pt"].write_bytes(files["malicious_pt"].read_bytes()[:20])
    return files


# ----------------------------------------------------------------------------- all


def make_corpus(root: str | os.PathLike, good_image: str | os.PathLike | None = None) -> Corpus:
    """Write the corpus under `root` (created); `good_image` is the valid image the data files use
    (default: a 64 x 64 noise PNG written there)."""
    root = Path(root)
    for name in ("images", "odd", "data", "scores", "pickles"):
        (root / name).mkdir(parents=True, exist_ok=True)
    if good_image is None:
        good_image = root / "good.png"
        _noise(64, 64, 9).save(good_image)
    corpus = Corpus(root=root, good_image=Path(good_image), pickle_marker=root / "pickle-code-ran")
    corpus.bad_images = _bad_images(root / "images")
    corpus.odd_images = _odd_images(root / "odd")
    corpus.data = _data_files(root / "data", corpus.good_image, corpus)
    corpus.scores = _score_files(root / "scores")
    corpus.pickles = _pickles(root / "pickles", corpus.pickle_marker)
    return corpus


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/reliability/make_corpus.py OUT_DIR")
    print(json.dumps(make_corpus(sys.argv[1]).index(), indent=2))
