"""Prepare a real-image set from the Oxygen icon theme (Debian package `oxygen-icon-theme`).

Each icon name (`user-trash-full`) is a class, named by its words ("user trash full"). Oxygen draws
every icon separately at up to seven sizes (16 ... 256 px; the 8 px ones are skipped), so one class holds several genuinely
different drawings; each is flattened onto white and saved at 64 x 64 RGB. Classes are split BY CLASS
(seeded): the test classes never occur in training, so zero-shot on them measures naming, not memory.
Every image gets several captions (its name, its category, its drawing size).

Writes OUT/train.jsonl, OUT/test.jsonl (`image`, `texts`, `label`), OUT/templates.txt and OUT/images/.
OpenCLIP's CSV (filepath,title, one row per image-caption pair) comes from the JSONL:
`python3 benchmarks/openclip_side_by_side/jsonl_to_csv.py OUT/train.jsonl OUT/train.csv`.
Usage: python scripts/prepare_icons.py --out data/icons [--deb oxygen-icon-theme_*.deb] [--test-fraction 0.2]
Needs `apt-get download` and `dpkg -x` (no root) unless --deb or --icons is given. The data never goes in git.
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PACKAGE = "oxygen-icon-theme"
IMAGE_SIZE = 64
# The icon theme's folders, as a word a caption can use.
CATEGORY_WORDS = {
    "actions": "action", "animations": "animation", "applets": "applet", "apps": "application",
    "categories": "menu category", "devices": "device", "emblems": "emblem", "emotes": "emoticon",
    "mimetypes": "file type", "places": "place", "status": "status", "special": "special",
}
TEMPLATES = ("{}", "an icon of {}.", "a {} icon.", "a picture of {}.")


def class_name(stem: str) -> str:
    """`application-vnd.oasis.opendocument-text` -> "application vnd oasis opendocument text"."""
    return re.sub(r"\s+", " ", re.sub(r"[-_.+]", " ", stem)).strip().lower()


def captions(name: str, category: str, size: int) -> list[str]:
    """Several captions per image: the name alone, with its category, with its drawing size."""
    word = CATEGORY_WORDS.get(category, category)
    article = "an" if word[0] in "aeiou" else "a"
    return [name, f"{article} {word} icon of {name}", f"{name}, drawn at {size} pixels"]


def fetch_icons(deb: str | None, workdir: Path) -> Path:
    """The theme's folder (`.../icons/oxygen/base`), from a given .deb or one `apt-get download` fetches."""
    if deb is None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
        debs = sorted(glob.glob(str(workdir / f"{PACKAGE}_*.deb")))
        if not debs:
            sys.exit(f"apt-get download {PACKAGE} fetched nothing; run 'apt-get update' first or pass --deb")
        deb = debs[-1]
    subprocess.run(["dpkg", "-x", deb, str(workdir / "x")], check=True)
    return workdir / "x" / "usr" / "share" / "icons" / "oxygen" / "base"


def flatten(path: str) -> Image.Image:
    """The icon composited onto white (its transparent pixels hold arbitrary colours), resized to 64 px."""
    image = Image.open(path).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--deb", help=f"a downloaded {PACKAGE}_*.deb (default: apt-get download it)")
    parser.add_argument("--icons", help="an already extracted .../icons/oxygen/base folder")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.icons) if args.icons else fetch_icons(args.deb, Path(tmp))
        files = sorted(glob.glob(str(base / "*" / "*" / "*.png")))  # base/SIZE/CATEGORY/NAME.png
        by_class: dict[str, list[tuple[str, str, int]]] = {}
        for path in files:
            size_dir, category, filename = Path(path).parts[-3:]
            size = int(size_dir.split("x")[0])
            if size < 16:  # the 8 px drawings are a few unreadable dots
                continue
            by_class.setdefault(class_name(Path(filename).stem), []).append((path, category, size))
        names = sorted(by_class)
        random.Random(args.seed).shuffle(names)
        test_names = set(names[: int(len(names) * args.test_fraction)])
        splits: dict[str, list[dict]] = {"train": [], "test": []}
        for number, name in enumerate(sorted(by_class)):
            split = "test" if name in test_names else "train"
            for path, category, size in by_class[name]:
                image = f"images/{split}-{number:05d}-{category}-{size}.png"
                flatten(path).save(out / image)
                splits[split].append({"image": image, "texts": captions(name, category, size), "label": name})
    for split, records in splits.items():
        with open(out / f"{split}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    print(json.dumps({"train_images": len(splits["train"]), "test_images": len(splits["test"]),
                      "train_classes": len(by_class) - len(test_names), "test_classes": len(test_names),
                      "captions_per_image": 3}))


if __name__ == "__main__":
    main()
