"""The built-in synthetic dataset: coloured shapes on a plain background.

Every colour x shape pair ("red triangle") is a class, so a model trained on the captions can be
scored zero-shot on the single-object scenes, and the same records carry VQA questions,
true/false statements and boxes for the other task families. Generation is deterministic:
the same arguments give byte-identical files, because every random choice comes from a
`random.Random` seeded by a string (seed, split, scene index) and nothing depends on time,
hash randomisation or dictionary order.

Layout of the output folder::

    DIR/train.jsonl  DIR/test.jsonl  DIR/meta.json  DIR/images/{train,test}-NNNNNN.png

Each record carries `image`, `texts` (captions), `label` (single-object scenes), `qa`,
`statements`, `objects` and `dialogues`: LLaVA-style instruction conversations about the scene,
`[{"type", "conversations": [{"from": "human" | "gpt", "value"}]}]` with `<image>\n` leading the
first human turn. Types: `short_answer` (one of the questions with LLaVA-1.5's "Answer the
question using a single word or phrase."), `description` (the objects, their sizes and regions),
`counting` and `relation` (answers that give their reasoning; relation only when two objects are
clearly apart) and `multi_turn` (2-3 rounds). `data.conversation.conversation_records` turns them
into one LLaVA record per dialogue.

`--holdout "red triangle"` keeps that combination out of every train scene *and* out of every
train text (captions, questions, false statements), while test scenes still show it: a clean
compositional-generalisation split.

`--caption-noise 0.4` corrupts exactly that fraction of the train captions (`texts`; drawn by a
seeded stream of its own, so everything else stays byte-identical), in equal thirds: a wrong colour
("a red circle" -> "a green circle"), a wrong shape ("a red square") or unrelated web text
("free shipping on all orders"). A wrong colour or shape always names a pair the scene does not
show and the split may show (never a held-out pair). The test split stays clean. Each corrupted
record keeps, for measuring a caption filter, `caption_noise`: `[{"text": corrupted, "clean":
original, "kind": "color" | "shape" | "unrelated"}]`; training reads `texts` only.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from vlmkit.errors import UserError

if TYPE_CHECKING:  # PIL is imported where images are drawn, so `vlmkit data --help` skips it
    from PIL import Image

# Well separated hues; the RGB values are jittered a little per object (see _render).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 25),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
CLASSES: tuple[str, ...] = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)
# Prompt templates for zero-shot evaluation: the first is a caption every single-object scene
# carries verbatim; the others are the usual CLIP phrasing (the captions themselves say "an orange").
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("one {} on a plain background", "a photo of a {}", "a {}")

DEFAULT_N = 8000
DEFAULT_IMAGE_SIZE = 64
TRAIN_FRACTION = 0.8
SINGLE_FRACTION = 0.4  # share of single-object scenes (the zero-shot classification images)
MAX_OBJECTS = 4

_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges at no real cost
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}


def parse_holdout(holdout: Iterable[str]) -> list[str]:
    """Validate `"<color> <shape>"` strings for `--holdout` and return them normalised and sorted."""
    result = set()
    for item in holdout:
        words = str(item).lower().split()
        if len(words) != 2 or words[0] not in COLOR_RGB or words[1] not in SHAPES:
            raise UserError(
                f"--holdout '{item}' is not a '<color> <shape>' pair; use one of the colours "
                f"{', '.join(COLORS)} with one of the shapes {', '.join(SHAPES)}, e.g. 'red triangle'"
            )
        result.add(f"{words[0]} {words[1]}")
    if len(result) >= len(CLASSES):
        raise UserError("--holdout names every colour-shape class, so no train scene is possible; hold out fewer")
    return sorted(result)


# ----------------------------------------------------------------------------- scene layout


def _split_plan(num_scenes: int, classes: Sequence[str], rng: random.Random) -> list[tuple[int, str | None]]:
    """(number of objects, class of the single object or None) for each scene of one split.

    Single-object classes cycle through shuffled copies of the class list so every class gets
    (almost) the same number of images, which keeps zero-shot accuracy meaningful on small splits.
    """
    num_single = round(num_scenes * SINGLE_FRACTION)
    counts = [1] * num_single + [2 + i % (MAX_OBJECTS - 1) for i in range(num_scenes - num_single)]
    rng.shuffle(counts)
    single_classes: list[str] = []
    while len(single_classes) < num_single:
        block = list(classes)
        rng.shuffle(block)
        single_classes.extend(block)
    single_iter = iter(single_classes)
    return [(count, next(single_iter) if count == 1 else None) for count in counts]


def _place_objects(names: list[str], size: int, rng: random.Random) -> list[dict]:
    """Draw sizes and non-overlapping positions (in output pixels) for the named objects."""
    single = len(names) == 1
    # Relative side lengths: large for single objects (14-29 px at 64), smaller when crowded.
    low, high = (0.25, 0.45) if single else (0.22, 0.34)
    margin = max(1, round(size * 0.03))  # keep objects off the border
    gap = max(2, round(size * 0.04))     # and apart from each other: boxes never overlap
    placed: list[dict] = []
    for name in names:
        side = rng.uniform(low, high) * size
        for _attempt in range(400):
            if _attempt and _attempt % 50 == 0:
                side *= 0.9  # crowded scene: shrink until it fits
            side_px = max(6, int(round(side)))
            x0 = rng.randint(margin, size - margin - side_px)
            y0 = rng.randint(margin, size - margin - side_px)
            box = [x0, y0, x0 + side_px, y0 + side_px]
            if all(
                box[0] >= other["box"][2] + gap or other["box"][0] >= box[2] + gap
                or box[1] >= other["box"][3] + gap or other["box"][1] >= box[3] + gap
                for other in placed
            ):
                placed.append({"name": name, "box": box})
                break
        else:  # pragma: no cover - 400 tries with shrinking always fits 4 objects
            raise RuntimeError("could not place objects without overlap")
    return placed


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _render(objects: list[dict], size: int, rng: random.Random) -> Image.Image:
    """Paint the objects on a plain light background (drawn at 4x, box-downsampled)."""
    from PIL import Image, ImageDraw

    level = rng.randint(200, 250)
    background = (level, level, level)
    scale = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * scale, size * scale), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        color, shape = obj["name"].split()
        fill = tuple(max(0, min(255, channel + rng.randint(-12, 12))) for channel in COLOR_RGB[color])
        x0, y0, x1, y1 = (coordinate * scale for coordinate in obj["box"])
        # The -1 keeps the drawn shape inside the box's exclusive right/bottom edge.
        if shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            # A star's tips touch a circle; its top tip at the box top, the lower tips near the bottom.
            radius = (x1 - x0) / 2
            draw.polygon(_star_points((x0 + x1) / 2, y0 + radius * 1.05, radius * 1.05), fill=fill)
    return canvas.reduce(scale)


# ----------------------------------------------------------------------------- language


def _center(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _position_phrase(obj: dict, size: int) -> str:
    cx, _ = _center(obj)
    if cx < size / 3:
        return "on the left"
    if cx > 2 * size / 3:
        return "on the right"
    return "in the middle"


def _size_word(obj: dict, size: int) -> str | None:
    side = obj["box"][2] - obj["box"][0]
    if side <= 0.31 * size:
        return "small"
    if side >= 0.39 * size:
        return "large"
    return None  # in between: no size word, so "small"/"large" are never borderline


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: 'a red star', 'an orange star'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(names: list[str]) -> str:
    phrases = [_a(name) for name in names]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _side(offset: float, min_offset: float, ahead: str, behind: str) -> str | None:
    """`ahead` when the other object's centre is `offset` > 0 further along the axis, `behind` when
    it is before; None when |offset| < min_offset (too close to call)."""
    if abs(offset) < min_offset:
        return None
    return ahead if offset > 0 else behind


def _offset(a_box: Sequence[float], b_box: Sequence[float]) -> tuple[float, float]:
    """Centre of box b minus centre of box a, (dx, dy); y grows downwards."""
    return (b_box[0] + b_box[2] - a_box[0] - a_box[2]) / 2, (b_box[1] + b_box[3] - a_box[1] - a_box[3]) / 2


def box_relation(a_box: Sequence[float], b_box: Sequence[float], min_offset: float = 0.0) -> str | None:
    """Where box a lies relative to box b: 'left of', 'right of', 'above' or 'below', along the axis
    of their larger centre offset (horizontal on a tie); None when that offset is below `min_offset`.

    The generator's captions, statements and reasoned relation dialogues use it with
    `min_offset = 0.2 * image_size`; with the default 0 it always answers (probes and metrics).
    """
    dx, dy = _offset(a_box, b_box)
    if abs(dx) >= abs(dy):
        return _side(dx, min_offset, "left of", "right of")
    return _side(dy, min_offset, "above", "below")


def _horizontal(a: dict, b: dict, size: int) -> str | None:
    """'left' / 'right' when a is clearly left / right of b, else None (too close to call)."""
    return _side(_offset(a["box"], b["box"])[0], 0.2 * size, "left", "right")


def _vertical(a: dict, b: dict, size: int) -> str | None:
    return _side(_offset(a["box"], b["box"])[1], 0.2 * size, "above", "below")


def _relation_phrase(a: dict, b: dict, size: int) -> str | None:
    """The dominant, unambiguous spatial relation of a to b ('left of', 'above', ...)."""
    return box_relation(a["box"], b["box"], 0.2 * size)


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _captions(objects: list[dict], size: int, rng: random.Random) -> list[str]:
    names = [obj["name"] for obj in sorted(objects, key=lambda obj: _center(obj)[0])]
    if len(objects) == 1:
        obj, name = objects[0], objects[0]["name"]
        where = _position_phrase(obj, size)
        size_word = _size_word(obj, size)
        texts = [_a(name), f"a photo of {_a(name)}", f"{_a(name)} {where}", f"one {name} on a plain background"]
        if size_word:
            texts += [f"a {size_word} {name}", f"a photo of a {size_word} {name} {where}"]
        else:
            texts += [f"a photo of {_a(name)} {where}"]
        return texts
    count = _COUNT_WORDS[len(objects)]
    shuffled = list(names)
    rng.shuffle(shuffled)
    texts = [_join(names), f"a photo of {_join(shuffled)}", f"{count} shapes: {_join(names)}"]
    pairs = [(a, b) for a in objects for b in objects if a is not b and _relation_phrase(a, b, size)]
    if pairs:
        a, b = rng.choice(pairs)
        texts.append(f"{_a(a['name'])} {_relation_phrase(a, b, size)} {_a(b['name'])}")
    return texts


def _question_answers(objects: list[dict], size: int, allowed: Sequence[str], rng: random.Random) -> list[dict]:
    """Questions whose answers are unambiguous given the objects (see module docstring)."""
    qa: list[dict] = []
    colors = [obj["name"].split()[0] for obj in objects]
    shapes = [obj["name"].split()[1] for obj in objects]
    qa.append({"question": "how many objects are there?", "answer": str(len(objects)), "type": "count"})
    asked_shape = rng.choice(SHAPES)
    qa.append({"question": f"how many {_PLURAL[asked_shape]} are there?",
               "answer": str(shapes.count(asked_shape)), "type": "count"})
    for color, shape in zip(colors, shapes):
        if shapes.count(shape) == 1:
            qa.append({"question": f"what color is the {shape}?", "answer": color, "type": "color"})
        if colors.count(color) == 1:
            qa.append({"question": f"what shape is the {color} object?", "answer": shape, "type": "shape"})
    # Relations: ask about clearly separated pairs only, the true or the mirrored side at random.
    relation_questions = []
    for a in objects:
        for b in objects:
            if a is b:
                continue
            for relation in (_horizontal(a, b, size), _vertical(a, b, size)):
                if relation is None:
                    continue
                word = {"left": "left of", "right": "right of"}.get(relation, relation)
                asked, answer = (word, "yes") if rng.random() < 0.5 else (_OPPOSITE[word], "no")
                relation_questions.append(
                    {"question": f"is the {a['name']} {asked} the {b['name']}?", "answer": answer, "type": "relation"})
    rng.shuffle(relation_questions)
    qa.extend(relation_questions[:3])
    present = [obj["name"] for obj in objects]
    absent = [name for name in allowed if name not in present]
    qa.append({"question": f"is there {_a(rng.choice(present))}?", "answer": "yes", "type": "yesno"})
    qa.append({"question": f"is there {_a(rng.choice(absent))}?", "answer": "no", "type": "yesno"})
    return qa


def _statements(objects: list[dict], size: int, allowed: Sequence[str], rng: random.Random) -> list[dict]:
    """Equal numbers of true and false sentences; each false one mutates a true one."""
    present = [obj["name"] for obj in objects]
    absent = [name for name in allowed if name not in present]
    shapes = [name.split()[1] for name in present]
    count = len(objects)
    pairs: list[tuple[str, str]] = []
    wrong_count = rng.choice([k for k in range(1, MAX_OBJECTS + 1) if k != count])
    pairs.append((
        "there is one object" if count == 1 else f"there are {_COUNT_WORDS[count]} objects",
        "there is one object" if wrong_count == 1 else f"there are {_COUNT_WORDS[wrong_count]} objects",
    ))
    pairs.append((f"there is {_a(rng.choice(present))}", f"there is {_a(rng.choice(absent))}"))
    for name in present:
        color, shape = name.split()
        others = [c for c in COLORS if c != color and f"{c} {shape}" in allowed]
        if shapes.count(shape) == 1 and others:
            pairs.append((f"the {shape} is {color}", f"the {shape} is {rng.choice(others)}"))
            break
    relations = [(a, b, _relation_phrase(a, b, size)) for a in objects for b in objects if a is not b]
    relations = [item for item in relations if item[2]]
    if relations:
        a, b, phrase = rng.choice(relations)
        pairs.append((f"the {a['name']} is {phrase} the {b['name']}",
                      f"the {a['name']} is {_OPPOSITE[phrase]} the {b['name']}"))
    statements = [{"text": true, "label": True} for true, _ in pairs]
    statements += [{"text": false, "label": False} for _, false in pairs]
    rng.shuffle(statements)
    return statements


SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer suffix
_DIALOGUE_IMAGE = "<image>\n"  # LLaVA's placeholder, at the start of the first human turn


def _region(obj: dict, size: int) -> str:
    """Where an object lies in a 3 x 3 grid: 'in the top left', 'at the bottom', 'in the center'."""
    cx, cy = _center(obj)
    column = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else ""
    row = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else ""
    if row and column:
        return f"in the {row} {column}"
    if row:
        return f"at the {row}"
    return f"on the {column}" if column else "in the center"


def _sized(obj: dict, size: int) -> str:
    word = _size_word(obj, size)
    return f"{word} {obj['name']}" if word else obj["name"]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    """LLaVA turns for (question, answer) pairs, the image placeholder leading the first question."""
    turns = []
    for number, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": (_DIALOGUE_IMAGE if number == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _description(objects: list[dict], size: int) -> str:
    ordered = sorted(objects, key=lambda obj: _center(obj)[0])
    count = "one shape" if len(objects) == 1 else f"{_COUNT_WORDS[len(objects)]} shapes"
    sentences = [f"The image shows {count} on a plain light background."]
    for obj in ordered:
        sentences.append(f"{_capital(_region(obj, size))} there is {_a(_sized(obj, size))}.")
    if len(objects) > 1:
        sentences.append(f"From left to right: {_join([obj['name'] for obj in ordered])}.")
    return " ".join(sentences)


def _counting(objects: list[dict], rng: random.Random) -> tuple[str, str]:
    shapes = [obj["name"].split()[1] for obj in objects]
    shape = rng.choice(sorted(set(shapes)) if rng.random() < 0.7 else SHAPES)
    matching = [obj["name"] for obj in objects if obj["name"].endswith(" " + shape)]
    number = len(matching)
    question = f"How many {_PLURAL[shape]} are in the image? Explain your answer."
    shown = _join([obj["name"] for obj in objects])
    if len(objects) == 1:
        verdict = f"which is {_a(shape)}" if number else f"which is not {_a(shape)}"
        answer = f"The image shows only {shown}, {verdict}. So the answer is {_COUNT_WORDS.get(number, 'zero')}."
    elif number == 0:
        answer = f"The image shows {shown}; none of them is {_a(shape)}. So the answer is zero."
    else:
        verb = "is" if number == 1 else "are"
        answer = (f"Among the {_COUNT_WORDS[len(objects)]} shapes in the image, the {_PLURAL[shape] if number > 1 else shape} "
                  f"{verb} {_join(matching)}. So the answer is {_COUNT_WORDS[number]}.")
    return question, answer


def _relation(objects: list[dict], size: int, rng: random.Random) -> tuple[str, str] | None:
    pairs = [(a, b, _relation_phrase(a, b, size)) for a in objects for b in objects if a is not b]
    pairs = [item for item in pairs if item[2]]
    if not pairs:
        return None
    a, b, phrase = rng.choice(pairs)
    question = f"Where is the {a['name']} relative to the {b['name']}? Explain your reasoning."
    relation = {"left of": "to the left of", "right of": "to the right of"}.get(phrase, phrase)
    further = {"left of": "further left", "right of": "further right", "above": "higher up", "below": "lower down"}[phrase]
    answer = (f"The {a['name']} is {_region(a, size)} of the image and the {b['name']} is {_region(b, size)}; "
              f"the {a['name']} lies {further}, so it is {relation} the {b['name']}.")
    return question, answer


def _dialogues(objects: list[dict], size: int, qa: list[dict], rng: random.Random) -> list[dict]:
    """Instruction-tuning conversations about one scene, in LLaVA's turn format (see `generate`).

    Built only from the scene's objects and its (holdout-respecting) questions, so they mention
    nothing a split may not show. Their randomness is a stream of its own, so adding them left the
    captions, questions, statements and images byte-identical.
    """
    short = rng.choice(qa)
    dialogues = [
        {"type": "short_answer",
         "conversations": _turns((f"{_capital(short['question'])}\n{SHORT_ANSWER_PROMPT}", short["answer"]))},
        {"type": "description", "conversations": _turns((rng.choice(
            ["Describe the image in detail.", "What is in this image? Describe it in detail.",
             "Give a detailed description of the image."]), _description(objects, size)))},
        {"type": "counting", "conversations": _turns(_counting(objects, rng))},
    ]
    relation = _relation(objects, size, rng)
    if relation is not None:
        dialogues.append({"type": "relation", "conversations": _turns(relation)})
    names = [obj["name"] for obj in sorted(objects, key=lambda obj: _center(obj)[0])]
    count = "one shape" if len(names) == 1 else f"{_COUNT_WORDS[len(names)]} shapes"
    rounds = [("What shapes do you see?", f"I see {count}: {_join(names)}.")]
    follow_ups = [(f"{_capital(item['question'])}", _capital(item["answer"]) + ".") for item in qa
                  if item["type"] in ("color", "shape", "relation")]
    rounds += rng.sample(follow_ups, min(len(follow_ups), rng.randint(1, 2)))
    dialogues.append({"type": "multi_turn", "conversations": _turns(*rounds)})
    return dialogues


def make_scene(seed: int, split: str, index: int, num_objects: int, single_class: str | None,
               allowed: Sequence[str], image_size: int) -> tuple[Image.Image, dict]:
    """Render one scene and build its record (without the `image` field).

    `allowed` is the list of colour-shape names this split may show or mention; the scene's
    own randomness comes from `random.Random(f"{seed}:{split}:{index}")`, so any scene can be
    regenerated on its own.
    """
    rng = random.Random(f"vlmkit-synth:{seed}:{split}:{index}")
    if single_class is not None:
        names = [single_class]
    else:
        names = rng.sample(list(allowed), num_objects)  # distinct combinations: "the red star" is unique
    objects = _place_objects(names, image_size, rng)
    image = _render(objects, image_size, rng)
    record: dict = {"texts": _captions(objects, image_size, rng)}
    if single_class is not None:
        record["label"] = single_class
    record["qa"] = _question_answers(objects, image_size, allowed, rng)
    record["statements"] = _statements(objects, image_size, allowed, rng)
    record["objects"] = objects
    # A stream of its own: the fields above keep the exact bytes they had before dialogues existed.
    dialogue_rng = random.Random(f"vlmkit-synth-dialogues:{seed}:{split}:{index}")
    record["dialogues"] = _dialogues(objects, image_size, record["qa"], dialogue_rng)
    return image, record


# ----------------------------------------------------------------------------- caption noise

# Web alt-text that says nothing about the picture: the "unrelated text" kind of noise.
UNRELATED_TEXTS: tuple[str, ...] = (
    "free shipping on all orders over fifty dollars", "click here to download the full resolution version",
    "stock photo", "image may contain", "my holiday pictures from last summer", "best price guaranteed",
    "view of the mountains at sunset", "a bowl of pasta on a wooden table", "untitled", "img 2041 jpg",
    "new arrivals in our online store", "a man riding a bicycle down the street", "share this post",
    "wallpaper hd widescreen", "two dogs playing on the beach", "logo design template vector",
)
NOISE_KINDS: tuple[str, ...] = ("color", "shape", "unrelated")
_NAME = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


def _fix_articles(text: str) -> str:
    """'a orange star' -> 'an orange star' (and back) after a word was swapped."""
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


def _corrupt(text: str, kind: str, present: set[str], allowed: Sequence[str], rng: random.Random) -> str | None:
    """`text` with one colour-shape name made wrong (`kind` "color" or "shape"), or an unrelated text;
    None when the scene leaves no wrong name of that kind the split may show."""
    if kind == "unrelated":
        return rng.choice(UNRELATED_TEXTS)
    matches = list(_NAME.finditer(text))
    rng.shuffle(matches)
    scene_colors = {name.split()[0] for name in present}
    for match in matches:
        color, shape = match.group(1), match.group(2)
        if kind == "color":
            options = [f"{other} {shape}" for other in COLORS if other != color]
        else:
            options = [f"{color} {other}" for other in SHAPES if other != shape]
        options = [name for name in options if name not in present and name in allowed]
        if options:
            # Prefer a colour the scene does not show at all: the caption is then plainly wrong.
            best = [name for name in options if kind != "color" or name.split()[0] not in scene_colors] or options
            return _fix_articles(text[: match.start()] + rng.choice(best) + text[match.end():])
    return None


def corrupt_captions(records: list[dict], fraction: float, seed: int, image_size: int, allowed: Sequence[str]) -> dict:
    """Corrupt exactly round(fraction * captions) of the records' `texts` in place, a third of each
    kind (module docstring); each corrupted record gets `caption_noise`. Returns the counts per kind."""
    rng = random.Random(f"vlmkit-synth-noise:{seed}")
    slots = [(row, column) for row, record in enumerate(records) for column in range(len(record["texts"]))]
    chosen = rng.sample(slots, round(fraction * len(slots)))
    counts = {"captions": len(slots), "corrupted": 0, **{kind: 0 for kind in NOISE_KINDS}}
    for number, (row, column) in enumerate(sorted(chosen)):
        record = records[row]
        present = {obj["name"] for obj in record["objects"]}
        clean = record["texts"][column]
        first = NOISE_KINDS[number % len(NOISE_KINDS)]
        # A scene without a wrong name of the planned kind (rare: a holdout) takes the next kind.
        for kind in NOISE_KINDS[NOISE_KINDS.index(first):] + NOISE_KINDS[: NOISE_KINDS.index(first)]:
            corrupted = _corrupt(clean, kind, present, allowed, rng)
            if corrupted is not None and corrupted != clean:
                break
        record["texts"][column] = corrupted
        record.setdefault("caption_noise", []).append({"text": corrupted, "clean": clean, "kind": kind})
        counts[kind] += 1
        counts["corrupted"] += 1
    return counts


# ----------------------------------------------------------------------------- writing


def interleaved_documents(records: Sequence[dict], scenes_per_document: int, seed: str) -> list[dict]:
    """Interleaved documents (Flamingo's M3W layout, data.interleaved): the scenes in a seeded
    random order, `scenes_per_document` per document, each scene its image then one of its captions
    or one "Question: q Answer: a" pair (a seeded choice, half and half)."""
    from vlmkit.data.records import qa_text

    rng = random.Random(f"vlmkit-synth-interleaved:{seed}")
    order = list(range(len(records)))
    rng.shuffle(order)
    documents = []
    for start in range(0, len(order), scenes_per_document):
        segments = []
        for index in order[start : start + scenes_per_document]:
            record = records[index]
            qa = record.get("qa") or []
            if qa and rng.random() < 0.5:
                item = rng.choice(qa)
                text = qa_text(item["question"], str(item["answer"]))
            else:
                text = rng.choice(record["texts"])
            segments += [{"image": record["image"]}, {"text": text}]
        documents.append({"segments": segments})
    return documents


def generate(out_dir: str | os.PathLike, n: int = DEFAULT_N, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
             holdout: Iterable[str] = (), progress: bool = True, caption_noise: float = 0.0, interleaved: int = 0) -> dict:
    """Write the synthetic dataset (`train.jsonl`, `test.jsonl`, `meta.json`, `images/`) to `out_dir`.

    `n` scenes in total are split 80/20 into train/test; about 40% of each split are single-object
    scenes (the only ones with a `label`). `holdout` names colour-shape pairs ("red triangle") kept
    out of train entirely. `caption_noise` is the fraction of train captions corrupted (module
    docstring; 0 leaves the files exactly as without it). `interleaved=K` also writes
    `{train,test}_interleaved.jsonl`: documents of K scenes each (`interleaved_documents`); the other
    files stay byte-identical. The JSONL files are written last (to a temporary name, then renamed),
    so an interrupted run never leaves a JSONL that points at missing or stale images. Returns
    the counts (scenes and single-object scenes per split) as a dict.
    """
    if n < 2:
        raise UserError(f"--n {n} is too small; the dataset needs at least 2 scenes (one train, one test)")
    if image_size < 32:
        raise UserError(f"--image-size {image_size} is too small to draw recognisable shapes; use 32 or more")
    if not isinstance(interleaved, int) or interleaved < 0:
        raise UserError(f"--interleaved {interleaved} is not a number of scenes per document; give 0 (none) or more, e.g. 4")
    if not (isinstance(caption_noise, (int, float)) and 0.0 <= caption_noise <= 1.0):
        raise UserError(f"--caption-noise {caption_noise} is not a fraction; give a number from 0 to 1, e.g. 0.4")
    held = parse_holdout(holdout)
    train_classes = [name for name in CLASSES if name not in held]
    if len(train_classes) < MAX_OBJECTS + 1:
        raise UserError("--holdout leaves too few colour-shape pairs for 4-object train scenes; hold out fewer")
    out = Path(out_dir)
    images_dir = out / "images"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder '{out}' ({error.strerror}); choose a writable --out") from None

    from tqdm import tqdm

    # An interrupted run must not leave old JSONL files pointing at half-overwritten images:
    # drop them first, write the new ones only once every image is on disk.
    for name in ("train.jsonl", "test.jsonl", "meta.json", "train_interleaved.jsonl", "test_interleaved.jsonl"):
        (out / name).unlink(missing_ok=True)

    num_train = max(1, min(n - 1, round(n * TRAIN_FRACTION)))
    splits = {"train": (num_train, train_classes), "test": (n - num_train, list(CLASSES))}
    counts: dict = {"out": str(out), "n": n, "seed": seed, "image_size": image_size, "holdout": held}
    written: set[str] = set()
    jsonl_lines: dict[str, list[str]] = {}
    records_of: dict[str, list[dict]] = {}
    bar = tqdm(total=n, desc="synth", unit="scene", file=sys.stderr, disable=not progress, mininterval=0.5)
    for split, (num_scenes, classes) in splits.items():
        plan = _split_plan(num_scenes, classes, random.Random(f"vlmkit-synth-plan:{seed}:{split}"))
        records = records_of[split] = []
        for index, (num_objects, single_class) in enumerate(plan):
            image, record = make_scene(seed, split, index, num_objects, single_class, classes, image_size)
            name = f"{split}-{index:06d}.png"
            image.save(images_dir / name, format="PNG")
            written.add(name)
            records.append({"image": f"images/{name}", **record})
            bar.update(1)
        counts[split] = num_scenes
        counts[f"{split}_single_object"] = sum(1 for count, _ in plan if count == 1)
    bar.close()
    if caption_noise:
        counts["caption_noise"] = corrupt_captions(records_of["train"], caption_noise, seed, image_size, train_classes)
    for split, records in records_of.items():
        jsonl_lines[split] = [json.dumps(record, ensure_ascii=False) for record in records]
    for split in list(records_of) if interleaved else []:
        documents = interleaved_documents(records_of[split], interleaved, f"{seed}:{split}")
        jsonl_lines[f"{split}_interleaved"] = [json.dumps(document, ensure_ascii=False) for document in documents]
    for split, lines in jsonl_lines.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out / f"{split}.jsonl")
    # A previous, larger run in the same folder must not leave stray images behind.
    for stale in images_dir.iterdir():
        if re.fullmatch(r"(train|test)-\d{6}\.png", stale.name) and stale.name not in written:
            stale.unlink()
    meta = {
        "name": "vlmkit-synthetic-shapes",
        "seed": seed, "n": n, "image_size": image_size, "holdout": held,
        "colors": list(COLORS), "shapes": list(SHAPES), "classes": list(CLASSES),
        "zero_shot_templates": list(ZERO_SHOT_TEMPLATES),
        "counts": {key: counts[key] for key in ("train", "test", "train_single_object", "test_single_object")},
        **({"caption_noise": counts["caption_noise"]} if caption_noise else {}),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    counts["classes"] = len(CLASSES)
    return counts
