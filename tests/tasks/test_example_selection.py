"""In-context example selection (RICES / PICa): the ranking, its order in the prompt, and its bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmkit.errors import UserError
from vlmkit.tasks.generative import ExampleRetriever, _check_selection


def _image(folder, name: str, colour: tuple[int, int, int], corner: bool = False) -> str:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[...] = 40
    if corner:
        pixels[:16, :16] = colour
    else:
        pixels[8:24, 8:24] = colour
    path = folder / f"{name}.png"
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def images(tmp_path):
    return {"red": _image(tmp_path, "red", (230, 20, 20)), "blue": _image(tmp_path, "blue", (20, 20, 230)),
            "red_corner": _image(tmp_path, "red_corner", (230, 20, 20), corner=True),
            "query": _image(tmp_path, "query", (220, 30, 25))}


def test_nearest_images_come_last_in_the_prompt(images):
    support = [images["blue"], images["red_corner"], images["red"]]
    retriever = ExampleRetriever(support)
    (row,) = retriever.nearest([images["query"]], 2)
    assert row == [1, 2]  # the red square is most similar: last, next to the query; the blue one is left out
    assert retriever.nearest([images["query"]], 3)[0][-1] == 2


def test_the_question_breaks_ties_between_examples_of_one_image(images):
    support = [images["red"], images["red"], images["blue"]]
    questions = ["how many circles are there?", "what colour is the square?", "what colour is the square?"]
    retriever = ExampleRetriever(support, questions=questions)
    (row,) = retriever.nearest([images["query"]], 1, ["what colour is the circle?"])
    assert row == [1]  # same image as example 0, a closer question
    (row,) = retriever.nearest([images["query"]], 2, ["how many squares?"])
    assert row == [1, 0]
    assert retriever.nearest([images["query"]], 1, ["zebra"])[0] == [0]  # unknown words: the image decides, ties go first
    # a VQA chunk asks several questions of one image: each question gets its own ranking, the image is read once
    assert retriever.nearest([images["query"], images["query"]], 1, ["what colour is the circle?", "how many squares?"]) \
        == [[1], [0]]


def test_selection_options_are_checked():
    with pytest.raises(UserError, match="random, similar"):
        _check_selection("nearest", None)
    with pytest.raises(UserError, match="examples='similar'"):
        _check_selection("random", object())
