"""Dataset readers: JSONL (the vlmkit contract), OpenCLIP CSV/TSV, COCO captions, WebDataset shards.

Every reader returns the same records: a dict with `image` (an absolute path, or for a member of a
tar shard a reference `tar://<absolute shard path>::<member name>`), `texts` (a list of captions)
and whatever optional fields the source carries (`label`, `qa`, `statements`, `objects`, ...).
Images are referenced, never loaded here; `load_image` opens them later, in the data loader, and
turns every kind of failure into `CorruptImage` so one bad file costs one sample, not the run.

Malformed input - a missing file, a bad JSON line, bytes that are not UTF-8, JSON nested too deeply,
a caption that is not a string, a missing caption column, an unknown extension - raises `UserError`
with one sentence naming the file (and line) and the fix. Images are bounded by the input limits
(`vlmkit.data.limits`) before they are decoded; one that is over them, missing, not a regular file or
undecodable raises `CorruptImage`, which training skips and counts, `usable_records` leaves out of an
evaluation with a note, and single-image commands report as their error.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import stat
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from vlmkit.data.limits import InputLimits, current_limits
from vlmkit.errors import UserError
from vlmkit.textfiles import decode_line, decode_text, json_type, parse_json

TAR_PREFIX = "tar://"
_TAR_SEPARATOR = "::"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Optional contract fields copied from a WebDataset sample's .json (img2dataset's .json also holds
# url, sha256, exif, ...: kept out of memory on purpose).
_PASS_THROUGH_JSON_KEYS = ("label", "qa", "statements", "objects")


class CorruptImage(UserError):
    """An image that is missing or cannot be decoded (the loader skips and counts it)."""


class ImageOverLimits(CorruptImage):
    """An image whose header claims more than the input limits allow (`size`: its width, height)."""

    def __init__(self, message: str, size: tuple[int, int]):
        super().__init__(message)
        self.size = size


# ----------------------------------------------------------------------------- images


def load_image(ref: str | os.PathLike, limits: InputLimits | None = None) -> Image.Image:
    """Open the image a record refers to (a path or a `tar://shard::member` reference) as RGB.

    Memory is bounded before decoding: the header's size is checked against `limits` (the
    process's `current_limits()` by default); a JPEG over the limits is first reduced on load
    (PIL's `draft`, 1/2 to 1/8 of each side), anything still over them is refused undecoded.
    Raises `CorruptImage` naming the image and what it is when it is missing, not a regular file
    (a folder, a device, a pipe), over the limits, or cannot be decoded (truncated file, not an
    image, unreadable shard).
    """
    ref = os.fspath(ref)
    limits = limits or current_limits()
    try:
        if ref.startswith(TAR_PREFIX):
            source: Any = io.BytesIO(_read_tar_member(ref))
        else:
            _require_regular_file(ref)
            source = ref
        with warnings.catch_warnings():
            # Palette PNGs with transparency warn on convert (the conversion is still right), and
            # PIL warns of "decompression bombs" above 89 megapixels: our own, lower, limit is
            # checked below before anything is decoded, so neither warning has anything to add.
            warnings.simplefilter("ignore")
            with Image.open(source) as image:
                bound_decoding(image, ref, limits)
                image.load()  # decode now, inside the try, so truncated files fail here
                # An RGB image is returned as decoded: convert() would copy it (120 MB at 40 megapixels).
                return image if image.mode == "RGB" else image.convert("RGB")
    except CorruptImage:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, checked by Image.open
        claimed = str(error).split(" pixels)")[0].split("(")[-1]
        raise CorruptImage(f"image '{ref}' claims {claimed} pixels, more than PIL decodes ({2 * Image.MAX_IMAGE_PIXELS:,}, "
                           f"PIL.Image.MAX_IMAGE_PIXELS x 2); shrink it or remove the record") from None
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, tarfile.TarError, MemoryError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CorruptImage(f"image '{ref}' cannot be decoded ({reason}); replace the file or remove the record") from None


def usable_records(records: list[dict], what: str) -> list[dict]:
    """The records whose image `load_image` reads (records without an image are kept), with one
    note on stderr counting the others: an evaluation skips and counts what it cannot use, as
    training does, instead of failing on the first bad image. `what` names the evaluation.

    Each image is decoded here once (and again when evaluated): a truncated file only shows when
    its pixels are decoded, so a check of the header alone would let it through.
    """
    kept, skipped = [], []
    for record in records:
        try:
            if record.get("image"):
                load_image(record["image"])
            kept.append(record)
        except CorruptImage:
            skipped.append(record["image"])
    if skipped:
        files = sorted(set(skipped), key=skipped.index)
        more = f" and {len(files) - 3} more" if len(files) > 3 else ""
        print(f"vlmkit: {what} leaves out {len(skipped)} record(s) whose image cannot be used ({len(files)} file"
              f"{'s' if len(files) != 1 else ''}): {', '.join(files[:3])}{more}; fix or remove them", file=sys.stderr)
    if records and not kept:
        raise UserError(f"no image of the {len(records)} record(s) can be used (first: {skipped[0]}); fix the dataset")
    return kept


def _require_regular_file(path: str) -> None:
    """Raise `CorruptImage` saying what `path` is when it is not a regular file (never open a FIFO:
    it would block, nor a device such as /dev/zero: it never ends)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CorruptImage(f"image '{path}' does not exist; fix the path in the dataset or remove the record") from None
    except OSError as error:
        raise CorruptImage(f"image '{path}' cannot be read ({error.strerror}); fix its permissions or remove the record"
                           ) from None
    if stat.S_ISREG(mode):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise CorruptImage(f"image '{path}' is {kind}, not an image file; point at an image file or remove the record")


def bound_decoding(image: Image.Image, ref: str, limits: InputLimits) -> None:
    """Reduce a JPEG on load when it is over `limits`, then refuse what is still over them (undecoded):
    call it between `Image.open` (which reads the header) and `load`. Raises `ImageOverLimits`."""
    width, height = image.size

    def over(w: int, h: int) -> bool:
        return w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side

    if over(width, height) and image.format == "JPEG":
        for factor in (2, 4, 8):  # the scales libjpeg decodes at directly
            if not over(-(-width // factor), -(-height // factor)):
                image.draft("RGB", (-(-width // factor), -(-height // factor)))
                break
    if over(*image.size):
        raise ImageOverLimits(
            f"image '{ref}' is {width} x {height} px, over the input limits ({limits.max_image_pixels:,} pixels, "
            f"{limits.max_image_side:,} px a side); shrink it, remove the record, or raise the limits with "
            f"VLMKIT_MAX_IMAGE_PIXELS / VLMKIT_MAX_IMAGE_SIDE", (width, height)
        )


# Per-process index of tar shards: path -> (stat signature, {member name: (data offset, size)}).
# Reading a member is then one seek + read, with no tarfile scan per image.
_TAR_INDEX: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}


def _tar_index(tar_path: str) -> dict[str, tuple[int, int]]:
    status = os.stat(tar_path)
    signature = (status.st_mtime_ns, status.st_size)
    cached = _TAR_INDEX.get(tar_path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    index = {}
    with tarfile.open(tar_path, mode="r:") as archive:
        for member in archive:
            if member.isfile():
                index[member.name] = (member.offset_data, member.size)
    _TAR_INDEX[tar_path] = (signature, index)
    return index


def _read_tar_member(ref: str) -> bytes:
    tar_path, _, member = ref[len(TAR_PREFIX):].rpartition(_TAR_SEPARATOR)
    if not os.path.isfile(tar_path):
        raise CorruptImage(f"shard '{tar_path}' of image '{ref}' does not exist; restore the shard or drop it from the pattern")
    index = _tar_index(tar_path)
    if member not in index:
        raise CorruptImage(f"image '{ref}' is not in its shard; rebuild the shard or drop the record")
    offset, size = index[member]
    # An image file holds at most ~4 bytes a pixel (uncompressed 16-bit or RGBA): a larger member
    # is refused before it is read into memory.
    limit = 4 * current_limits().max_image_pixels + (1 << 20)
    if size > limit:
        raise CorruptImage(f"image '{ref}' is a {size:,}-byte file, more than an image within the input limits can "
                           f"take ({limit:,} bytes); remove it from the shard or raise VLMKIT_MAX_IMAGE_PIXELS")
    with open(tar_path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def tar_ref(tar_path: str | os.PathLike, member: str) -> str:
    """The `image` reference of a tar member, as `read_records` writes it and `load_image` reads it."""
    return f"{TAR_PREFIX}{os.path.abspath(tar_path)}{_TAR_SEPARATOR}{member}"


# ----------------------------------------------------------------------------- records


def read_records(path: str | os.PathLike, *, csv_img_key: str = "filepath", csv_caption_key: str = "title",
                 csv_separator: str | None = None, image_root: str | os.PathLike | None = None,
                 require_text: bool = True, require_image: bool = True) -> list[dict]:
    """Read an image-text dataset into records with `image` (absolute reference) and `texts`.

    `path` is a `.jsonl` file (the vlmkit contract), a `.json` file (a list of such records, or
    COCO captions with `images`/`annotations`), a `.csv`/`.tsv` file (OpenCLIP's columns,
    renamed with `csv_img_key`/`csv_caption_key`; comma or tab detected from the header unless
    `csv_separator` is given), or WebDataset shards: one `.tar`, a folder of `.tar` files, or a
    brace pattern such as `shards/{00000..00009}.tar`. Relative image paths are resolved against
    the dataset file's folder (or `image_root` when given). A `.txt` file is text only (for language
    models): one record `{"texts": [line]}` per non-empty line, with no image. With `require_text=False` records
    without a caption get `texts: []` (for question-only datasets) instead of an error; with
    `require_image=False` JSON records may have no `image` (text-only datasets for language models).

    LLaVA's instruction data (`[{"id", "image", "conversations": [{"from": "human" | "gpt",
    "value"}]}]` in a `.json` list or `.jsonl`) is read as it is: `conversations` is checked
    (alternating human/gpt turns ending with an answer) and kept, `image` is resolved against
    `image_root` (LLaVA's `--image_folder`) or the file's folder and may be absent (text-only
    conversations), and `texts` is `[]` unless the record has captions too.
    """
    text = os.fspath(path)
    if "{" in text and "}" in text:
        return _read_shards(expand_braces(text), text, require_text)
    if os.path.isdir(text):
        shards = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
        if not shards:
            raise UserError(f"folder '{text}' holds no .tar shards; point at a .jsonl/.csv file or a folder of WebDataset .tar files")
        return _read_shards(shards, text, require_text)
    if not os.path.exists(text):
        raise UserError(f"dataset '{text}' does not exist; check the path (create the built-in one with `vlmkit data synth --out DIR`)")
    if not os.path.isfile(text):  # a FIFO would block the read forever, a device never end
        raise UserError(f"dataset '{text}' is not a regular file (a device or a pipe); give a .jsonl, .json, .csv, .tar or .txt file")
    suffix = Path(text).suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(text, image_root, require_text, require_image)
    elif suffix == ".json":
        records = _read_json(text, image_root, require_text, require_image)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(text, csv_img_key, csv_caption_key, csv_separator, image_root)
    elif suffix == ".tar":
        return _read_shards([text], text, require_text)
    elif suffix == ".txt":
        records = _read_txt(text)
    else:
        raise UserError(
            f"dataset '{text}' has an unknown extension '{suffix or '(none)'}'; use .jsonl, .json (COCO), "
            f".csv/.tsv, WebDataset .tar shards, or .txt (text only, one text per line)"
        )
    if not records:
        raise UserError(f"dataset '{text}' contains no records; add at least one image with a caption")
    return records


def _resolve(image: str, base_dir: str) -> str:
    return os.path.normpath(image if os.path.isabs(image) else os.path.join(base_dir, image))


def _normalise(raw: Any, where: str, base_dir: str, require_text: bool, require_image: bool = True) -> dict:
    """Validate one JSON record and normalise `text`/`texts` to `texts: list[str]`."""
    if not isinstance(raw, dict):
        raise UserError(f"{where} is a JSON {type(raw).__name__}, not an object; write one {{\"image\": ..., \"text\": ...}} object per line")
    conversational = "conversations" in raw or "dialogues" in raw
    if conversational:
        _check_conversations(raw, where)
    if "segments" in raw:  # an interleaved document: its images and texts are its segments
        from vlmkit.data.interleaved import check_segments

        if "image" in raw:
            raise UserError(f"{where} has both \"image\" and \"segments\"; put the image in the segments, where it is read")
        return {**{key: value for key, value in raw.items() if key not in ("segments", "text", "texts")},
                "texts": [], "segments": check_segments(raw["segments"], where, base_dir)}
    image = raw.get("image")
    if image is None and (conversational or not require_image):
        image = ""  # a text-only record (a conversation, or a language model's text): no `image` key below
    elif not isinstance(image, str) or not image:
        given = f" (its \"image\" is {json_type(image)})" if "image" in raw else ""
        raise UserError(f"{where} has no \"image\" path{given}; every record needs \"image\": \"<path relative to the file or absolute>\"")
    texts = raw.get("texts")
    single = raw.get("text")
    if single is not None and not isinstance(single, str):
        raise UserError(f"{where} has a \"text\" that is {json_type(single)}, not a string; write \"text\": \"<caption>\" "
                        f"(or \"texts\": [\"<caption>\", ...] for several)")
    if texts is not None and not isinstance(texts, list):
        raise UserError(f"{where} has a \"texts\" that is {json_type(texts)}, not a list of strings; write \"texts\": [\"<caption>\", ...]")
    bad = next((item for item in texts or [] if not isinstance(item, str)), "")
    if not isinstance(bad, str):
        raise UserError(f"{where} has a caption in \"texts\" that is {json_type(bad)}, not a string; write every caption "
                        f"as a JSON string")
    if texts is None:
        texts = [] if single is None else [single]
    elif single is not None and single not in texts:
        texts = [single, *texts]
    if not isinstance(texts, list) or not all(isinstance(item, str) for item in texts):
        raise UserError(f"{where} has a \"texts\" field that is not a list of strings; write \"texts\": [\"caption\", ...]")
    texts = [item for item in texts if item.strip()]
    if require_text and not texts and not conversational:
        given = next((f"its \"{key}\" is {json_type(raw[key])}" for key in ("text", "texts") if key in raw), "")
        if given:
            raise UserError(f"{where} has no caption ({given}); give \"text\": \"<caption>\" or \"texts\": [\"<caption>\", ...]")
        raise UserError(f"{where} has no caption; add \"text\": \"<caption>\" or \"texts\": [\"<caption>\", ...]")
    record = {key: value for key, value in raw.items() if key not in ("text", "texts", "image")}
    return {**({"image": _resolve(image, base_dir)} if image else {}), "texts": texts, **record}


def _check_conversations(raw: dict, where: str) -> None:
    """LLaVA's `conversations: [{from, value}]`, or the synthetic `dialogues: [{type, conversations}]`."""
    from vlmkit.data.records import check_messages

    if "conversations" in raw:
        check_messages(raw["conversations"], where)
        return
    dialogues = raw["dialogues"]
    if not isinstance(dialogues, list) or not all(isinstance(item, dict) for item in dialogues):
        raise UserError(f"{where} has a \"dialogues\" field that is not a list of {{\"type\", \"conversations\"}} objects; fix it")
    for number, dialogue in enumerate(dialogues):
        check_messages(dialogue.get("conversations"), f"{where} dialogue {number}")


def _read_txt(path: str) -> list[dict]:
    """Text-only records, one per non-empty line (a language model's corpus)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [{"texts": [line.strip()]} for line in handle if line.strip()]
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start} cannot be decoded); convert it to UTF-8") from None


def _read_jsonl(path: str, image_root, require_text: bool, require_image: bool = True) -> list[dict]:
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, "rb") as handle:  # bytes, decoded line by line, so a bad byte names its line
        for line_number, data in enumerate(handle, start=1):
            line = decode_line(data, path, line_number)
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not JSON
            if not line.strip():
                continue
            raw = parse_json(line, f"{path} line {line_number}", "fix or remove that line")
            records.append(_normalise(raw, f"{path} line {line_number}", base_dir, require_text, require_image))
    return records


def _read_json(path: str, image_root, require_text: bool, require_image: bool = True) -> list[dict]:
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as handle:
        data = parse_json(decode_text(handle.read(), path), path, "fix the file")
    if isinstance(data, list):
        return [_normalise(raw, f"{path} item {number}", base_dir, require_text, require_image) for number, raw in enumerate(data)]
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_captions(data, path, base_dir, require_text)
    raise UserError(f"{path} is neither a list of records nor COCO captions (\"images\" + \"annotations\"); convert it to JSONL")


def _coco_captions(data: dict, path: str, base_dir: str, require_text: bool) -> list[dict]:
    """COCO captions: one record per image with all its captions, in the `images` order."""
    captions: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        if "image_id" not in annotation or "caption" not in annotation:
            raise UserError(f"{path} has an annotation without \"image_id\" and \"caption\"; this reader expects COCO captions")
        captions.setdefault(annotation["image_id"], []).append(str(annotation["caption"]).strip())
    records = []
    for image in data["images"]:
        if "file_name" not in image or "id" not in image:
            raise UserError(f"{path} has an image entry without \"id\" and \"file_name\"; this reader expects COCO captions")
        texts = captions.get(image["id"], [])
        if not texts and require_text:
            continue  # COCO test splits list images without captions: nothing to train on
        records.append({"image": _resolve(image["file_name"], base_dir), "texts": texts, "image_id": image["id"]})
    return records


def _read_csv(path: str, img_key: str, caption_key: str, separator: str | None, image_root) -> list[dict]:
    lines = [0]  # the reader's position, for the messages below
    try:
        return _read_csv_rows(path, img_key, caption_key, separator, image_root, lines)
    except csv.Error as error:
        raise UserError(f"{path} line {lines[0] + 1} cannot be read as CSV ({error}); fix that line") from None


def _read_csv_rows(path: str, img_key: str, caption_key: str, separator: str | None, image_root,
                   lines: list[int]) -> list[dict]:
    with open(path, "rb") as raw:
        text = decode_text(raw.read(), path)  # a bad byte is reported with its line
    with io.StringIO(text, newline="") as handle:
        header = handle.readline()
        if separator is None:
            # OpenCLIP's default separator is a tab even for ".csv" files, so detect it.
            separator = "\t" if path.lower().endswith(".tsv") or "\t" in header else ","
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=separator)
        columns = reader.fieldnames or []
        lines[0] = reader.line_num
        for key, option in ((img_key, "csv_img_key (--csv-img-key)"), (caption_key, "csv_caption_key (--csv-caption-key)")):
            if key not in columns:
                raise UserError(f"{path} has no '{key}' column (it has: {', '.join(columns) or 'none'}); name the right column with {option}")
        csv_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
        records = []
        for row in reader:
            lines[0] = reader.line_num
            image, caption = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
            if not image or not caption:
                missing = img_key if not image else caption_key
                raise UserError(f"{path} line {reader.line_num} has an empty '{missing}' value; fill it in or remove the row")
            resolved = _resolve(image, csv_dir)
            # OpenCLIP opens CSV paths relative to the working directory; honour that when only it exists.
            if image_root is None and not os.path.isabs(image) and not os.path.exists(resolved) and os.path.exists(image):
                resolved = os.path.abspath(image)
            records.append({"image": resolved, "texts": [caption]})
    return records


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: `{00000..00009}` (zero padding kept) and `{a,b}`, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start_text, end_text = numeric.groups()
        width = len(start_text) if start_text.startswith("0") or len(start_text) == len(end_text) else 0
        start, end = int(start_text), int(end_text)
        step = 1 if end >= start else -1
        options = [str(value).zfill(width) for value in range(start, end + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise UserError(f"shard pattern '{pattern}' has a brace '{{{body}}}' that is neither a range like {{000..009}} nor a list like {{a,b}}; fix the pattern")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = up to the first dot of the basename


def _read_shards(shards: list[str], source: str, require_text: bool) -> list[dict]:
    """img2dataset layout: per key an image (`.jpg`/`.png`/...), a `.txt` caption, optional `.json`."""
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise UserError(f"shard '{missing[0]}' of '{source}' does not exist ({len(missing)} of {len(shards)} missing); fix the pattern or the folder")
    records = []
    for shard in shards:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    match = _KEY_EXT.match(member.name)
                    if not member.isfile():
                        continue
                    index[member.name] = (member.offset_data, member.size)
                    if match is not None:
                        samples.setdefault(match.group(1), {})[match.group(2).lower()] = member
                # load_image reuses this index instead of scanning the shard again.
                status = os.stat(shard)
                _TAR_INDEX[os.path.abspath(shard)] = ((status.st_mtime_ns, status.st_size), index)
                for key, parts in samples.items():
                    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in parts), None)
                    if image_ext is None:
                        raise UserError(f"shard '{shard}' sample '{key}' has no image ({', '.join(sorted(parts))}); rebuild the shard with an image per key")
                    record: dict = {"image": tar_ref(shard, parts[image_ext].name), "texts": []}
                    if "json" in parts:
                        try:
                            meta = json.loads(archive.extractfile(parts["json"]).read())
                        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                            raise UserError(f"shard '{shard}' member '{parts['json'].name}' is not valid JSON; rebuild the shard") from None
                        record.update({k: meta[k] for k in _PASS_THROUGH_JSON_KEYS if isinstance(meta, dict) and k in meta})
                        if isinstance(meta, dict) and isinstance(meta.get("caption"), str) and meta["caption"].strip():
                            record["texts"] = [meta["caption"].strip()]
                    if "txt" in parts:
                        caption = archive.extractfile(parts["txt"]).read().decode("utf-8", errors="replace").strip()
                        record["texts"] = [caption] if caption else record["texts"]
                    if require_text and not record["texts"]:
                        raise UserError(f"shard '{shard}' sample '{key}' has no caption (.txt); rebuild the shard with a caption per image")
                    records.append(record)
        except tarfile.TarError as error:
            raise UserError(f"shard '{shard}' is not a readable tar file ({error}); re-download or rebuild it") from None
    if not records:
        raise UserError(f"'{source}' contains no samples; check that the shards hold image + .txt pairs")
    return records
