"""Image transforms against a direct PIL+numpy reimplementation of torchvision, and against HF."""
from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.transforms import (CLIP_MEAN, CLIP_STD, ImageTransform, random_resized_crop_box,
                                    resized_shortest_side)
from vlmkit.errors import UserError


def random_image(width, height, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def reference_eval(image, size, resize_size=None):
    """torchvision Resize(int) + CenterCrop + ToTensor + Normalize, written out with PIL and numpy."""
    resize_size = resize_size or size
    width, height = image.size
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    array = np.asarray(image.resize((new_w, new_h), Image.BICUBIC), dtype=np.float64) / 255.0
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    array = array[top:top + size, left:left + size]
    array = (array - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return array.transpose(2, 0, 1)


@pytest.mark.parametrize("width, height, size, resize_size", [
    (300, 200, 224, None), (64, 64, 64, None), (97, 131, 64, None), (64, 67, 64, None),
    (640, 480, 224, 256), (33, 500, 32, None), (224, 227, 224, None),
])
def test_eval_matches_reference(width, height, size, resize_size):
    image = random_image(width, height)
    ours = ImageTransform(size, resize_size=resize_size)(image)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - reference_eval(image, size, resize_size)).max() < 1e-5


@pytest.mark.parametrize("width, height", [(20, 5000), (5000, 20)])
def test_thin_images_resize_only_what_the_crop_keeps(width, height):
    # 224 x 56,000 px if resized whole: over MAX_RESIZED_PIXELS, so only the kept region is resized.
    from vlmkit.data.transforms import MAX_RESIZED_PIXELS

    assert 224 * 224 * max(width, height) // min(width, height) > MAX_RESIZED_PIXELS
    image = random_image(width, height)
    levels = np.abs(ImageTransform(224)(image).numpy() - reference_eval(image, 224)) * np.array(CLIP_STD).reshape(3, 1, 1) * 255
    assert levels.mean() < 1.0 and levels.max() < 64  # the same geometry; PIL's rounding differs a little


def test_resize_rounding_and_crop_offsets_follow_torchvision():
    assert resized_shortest_side(640, 480, 224) == (298, 224)  # int(298.67): truncated, not rounded
    assert resized_shortest_side(480, 640, 224) == (224, 298)
    assert resized_shortest_side(227, 224, 224) == (227, 224)
    from vlmkit.data.transforms import center_crop_box

    assert center_crop_box(227, 224, 224, 224) == (2, 0, 226, 224)  # round(1.5) = 2
    assert center_crop_box(229, 224, 224, 224) == (2, 0, 226, 224)  # round(2.5) = 2 (half to even)


def test_input_kinds_give_the_same_pixels(tmp_path):
    transform = ImageTransform(32)
    image = random_image(40, 50)
    expected = transform(image)
    image.save(tmp_path / "x.png")
    assert torch.equal(transform(str(tmp_path / "x.png")), expected)
    assert torch.equal(transform(tmp_path / "x.png"), expected)
    assert torch.equal(transform(np.asarray(image)), expected)
    gray = image.convert("L")
    assert torch.equal(transform(np.asarray(gray)), transform(gray.convert("RGB")))
    assert torch.equal(transform(image.convert("RGBA")), expected)
    assert transform.batch([image, image]).shape == (2, 3, 32, 32)
    assert transform.batch([]).shape == (0, 3, 32, 32)
    with pytest.raises(UserError, match="uint8"):
        transform(np.zeros((4, 4, 3), dtype=np.float32))


def test_train_transform_reproducible_and_random():
    image = random_image(80, 60)
    transform = ImageTransform(32, train=True, crop_scale=(0.5, 1.0), hflip=0.5)
    first = transform(image, random.Random(5))
    assert torch.equal(first, transform(image, random.Random(5)))
    others = [transform(image, random.Random(seed)) for seed in range(6, 12)]
    assert all(other.shape == (3, 32, 32) for other in others)
    assert not all(torch.equal(first, other) for other in others)


def test_train_crop_is_torchvision_random_resized_crop():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(100, 80, (0.9, 1.0), (3 / 4, 4 / 3), rng)
        area = (right - left) * (bottom - top)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        assert 0.85 * 8000 <= area <= 8000 * 1.02  # scale (0.9, 1.0), up to rounding
    # Ten failed attempts fall back to the largest centred crop inside the ratio range.
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (493, 0, 506, 10)
    assert random_resized_crop_box(10, 10, (1.0, 1.0), (1.0, 1.0), random.Random(0)) == (0, 0, 10, 10)


def test_train_identity_crop_and_flip():
    image = random_image(48, 48)
    plain = ImageTransform(48, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert torch.equal(plain(image, random.Random(1)), ImageTransform(48)(image))
    flipping = ImageTransform(48, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)
    assert torch.equal(flipping(image, random.Random(1)), ImageTransform(48)(image).flip(-1))
    assert flipping.eval().train is False


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_output_point_follows_the_train_crop_and_flip(hflip):
    """A box centre mapped by `output_point` lands on the drawn square's centroid in the cropped image."""
    array = np.zeros((64, 80, 3), dtype=np.uint8)
    array[22:32, 32:48] = 255  # centre (40, 27) in pixel coordinates, inside every crop
    transform = ImageTransform(64, train=True, crop_scale=(0.7, 0.9), hflip=hflip)
    for seed in range(5):
        out = np.asarray(transform.geometry(Image.fromarray(array), random.Random(seed)))[:, :, 0] > 127
        ys, xs = np.nonzero(out)
        x, y = transform.output_point(80, 64, 40.0, 27.0, random.Random(seed))
        assert abs(x * 64 - (xs.mean() + 0.5)) < 1.0 and abs(y * 64 - (ys.mean() + 0.5)) < 1.0, seed
    x, y = ImageTransform(64).output_point(80, 64, 40.0, 27.0)  # eval: shortest side 64, centre crop 64 of 80
    assert (x, y) == pytest.approx(((40 - 8) / 64, 27 / 64))


def test_config_round_trip_and_validation(tmp_path):
    transform = ImageTransform(64, resize_size=72, train=True, crop_scale=(0.8, 1.0), hflip=0.5, mean=(0.5,) * 3, std=(0.5,) * 3)
    config = transform.to_config()
    assert config["size"] == {"shortest_edge": 72} and config["crop_size"] == {"height": 64, "width": 64}
    assert config["resample"] == 3 and config["do_center_crop"] is True and config["image_mean"] == [0.5] * 3
    path = transform.save(tmp_path)
    assert path.name == "preprocessor_config.json"
    loaded = ImageTransform.load(tmp_path)
    assert repr(loaded) == repr(transform)
    assert ImageTransform.load(tmp_path, train=False).train is False
    with pytest.raises(UserError, match="unknown vlmkit keys"):
        ImageTransform.from_config({**config, "vlmkit": {"flip": 1}})
    with pytest.raises(UserError, match="not square"):
        ImageTransform.from_config({"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 32}})
    with pytest.raises(UserError, match="does not exist"):
        ImageTransform.load(tmp_path / "nowhere")
    # Old-style HF configs use plain integers; SigLIP-style ones squash to a fixed size.
    old = ImageTransform.from_config({"size": 256, "crop_size": 224, "resample": 2})
    assert (old.resize_size, old.image_size, old.interpolation) == (256, 224, "bilinear")
    squash = ImageTransform.from_config({"size": {"height": 32, "width": 32}, "do_center_crop": False,
                                         "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert squash.resize_mode == "squash"
    image = random_image(50, 30)
    expected = (np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float64) / 255 - 0.5) / 0.5
    assert np.abs(squash(image).numpy() - expected.transpose(2, 0, 1)).max() < 1e-5


# --------------------------------------------------------------------------- HF transformers


@pytest.fixture(scope="module")
def hf_processor_class():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # transformers 5 names the PIL implementation explicitly (no torchvision here)
            from transformers import CLIPImageProcessorPil as processor_class
        except ImportError:
            processor_class = transformers.CLIPImageProcessor
    return processor_class


def test_matches_hf_clip_image_processor(hf_processor_class):
    """Measured: max |ours - HF| is 0.0 wherever the crop margin is not 3 mod 4 pixels; there HF
    floors the crop offset ((h - th) // 2) where torchvision rounds, a one-pixel shift."""
    processor = hf_processor_class(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    ours = ImageTransform(64)
    for width, height in [(64, 64), (100, 80), (80, 130), (65, 64), (64, 69), (131, 97)]:
        image = random_image(width, height, seed=width)
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert np.abs(ours(image).numpy() - theirs).max() < 1e-6, (width, height)
    image = random_image(67, 64)  # margin 3: torchvision crops from x=2, HF from x=1
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
    mine = ours(image).numpy()
    assert np.abs(mine - theirs).max() > 0.1
    assert np.abs(mine[:, :, :-1] - theirs[:, :, 1:]).max() < 1e-6


def test_hf_config_files_load_both_ways(tmp_path, hf_processor_class):
    processor = hf_processor_class(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36})
    processor.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    ours = ImageTransform.load(tmp_path / "hf")
    assert (ours.image_size, ours.resize_size, ours.interpolation) == (36, 40, "bicubic")
    assert ours.mean == tuple(saved["image_mean"]) and ours.std == tuple(saved["image_std"])
    image = random_image(80, 70)  # margins 9 and 4: the same offsets in HF and torchvision
    assert np.abs(ours(image).numpy() - processor(images=image, return_tensors="np")["pixel_values"][0]).max() < 1e-6
    # And HF reads what vlmkit writes.
    ImageTransform(36, resize_size=40).save(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = hf_processor_class.from_pretrained(tmp_path / "ours")
    assert np.abs(ours(image).numpy() - reloaded(images=image, return_tensors="np")["pixel_values"][0]).max() < 1e-6
