"""Image preprocessing without torchvision, matching OpenCLIP/torchvision on PIL images.

Eval: convert to RGB, resize the shortest side to `resize_size` with PIL bicubic (the long side
rounded down, as torchvision's `Resize(int)` does), center crop (offsets rounded as torchvision's
`CenterCrop`: `int(round((h - th) / 2))`), scale to [0, 1], normalize (an image so thin that the
resized whole would exceed `MAX_RESIZED_PIXELS` has only the region the crop keeps resized). Train: torchvision's
`RandomResizedCrop(scale, ratio)` (10 attempts, then the center-crop fallback) resized to
`image_size`, then an optional horizontal flip. All randomness comes from a `random.Random` the
caller passes, so an augmentation is reproducible from (seed, epoch, index).

Two deliberate differences from OpenCLIP, both no-ops on RGB images: the image is converted
to RGB *before* resizing (OpenCLIP resizes first, so palette images get nearest-neighbour
resampling and RGBA images are resized with premultiplied alpha). HF `CLIPImageProcessor`
(transformers 5.x, PIL backend) gives bit-identical tensors (max difference 0.0) except where the
resized image exceeds the crop by 3, 7, 11, ... pixels: HF floors the crop offset
(`(h - th) // 2`) where torchvision rounds half to even, so its crop sits one pixel earlier.
`tests/data/test_transforms.py` checks both facts.

The configuration round-trips through `preprocessor_config.json` with HF CLIPImageProcessor keys,
so HF files load too; vlmkit's training-augmentation settings live under the "vlmkit" key.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from vlmkit.errors import UserError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"

# PIL's resampling codes are what HF stores under "resample".
_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
_INTERPOLATION_NAME = {int(code): name for name, code in _INTERPOLATION.items()}
_RESIZE_MODES = ("shortest", "squash")
# Above this many pixels, the eval resize + centre crop resizes only the region the crop keeps
# (see ImageTransform.geometry); only thin images reach it (a 4:1 panorama resized to a 1,000 px
# short side is exactly 4 megapixels).
MAX_RESIZED_PIXELS = 4_000_000
_VLMKIT_KEYS = {"train", "crop_scale", "crop_ratio", "hflip", "interpolation", "resize_mode"}


def resized_shortest_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `size`, the longer one truncated like torchvision."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's CenterCrop (offsets rounded half-to-even)."""
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return left, top, left + crop_width, top + crop_height


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with `rng` in place of torch's generator -> PIL box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return left, top, left + crop_width, top + crop_height
    # Fallback: the largest center crop whose aspect ratio is inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return left, top, left + crop_width, top + crop_height


def to_pil(image: Any) -> Image.Image:
    """A path, PIL image (any mode) or uint8 array (H, W) / (H, W, 3|4) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        from vlmkit.data.formats import load_image

        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise UserError(
                f"an image array must be uint8 with shape (H, W) or (H, W, 3); got {image.dtype} {tuple(image.shape)}; "
                f"convert it with np.asarray(image, dtype=np.uint8)"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise UserError(f"cannot read an image from a {type(image).__name__}; pass a path, a PIL image or a uint8 numpy array")


class ImageTransform:
    """Resize/crop/normalize an image into a (3, image_size, image_size) float tensor.

    Eval mode (`train=False`): shortest side to `resize_size` (default `image_size`), center crop.
    With `resize_mode="squash"` the image is resized straight to `image_size` x `image_size`
    (SigLIP's preprocessing) with no crop. Train mode: RandomResizedCrop(`crop_scale`,
    `crop_ratio`) then a horizontal flip with probability `hflip`.
    """

    def __init__(self, image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 resize_size: int | None = None, interpolation: str = "bicubic", train: bool = False,
                 crop_scale: Sequence[float] = (0.9, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.0, resize_mode: str = "shortest"):
        if interpolation not in _INTERPOLATION:
            raise UserError(f"unknown interpolation '{interpolation}'; use one of {', '.join(_INTERPOLATION)}")
        if resize_mode not in _RESIZE_MODES:
            raise UserError(f"unknown resize_mode '{resize_mode}'; use 'shortest' (resize + center crop) or 'squash'")
        if image_size <= 0 or (resize_size is not None and resize_size < image_size):
            raise UserError(f"resize_size {resize_size} must be at least image_size {image_size} (and both positive)")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError("mean and std must each have 3 values, and std must be positive")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1) or not (0 < crop_ratio[0] <= crop_ratio[1]):
            raise UserError(f"crop_scale {tuple(crop_scale)} must satisfy 0 < low <= high <= 1 and crop_ratio {tuple(crop_ratio)} 0 < low <= high")
        if not 0.0 <= hflip <= 1.0:
            raise UserError(f"hflip {hflip} is a probability; use a value in [0, 1]")
        self.image_size = int(image_size)
        self.resize_size = int(resize_size) if resize_size is not None else self.image_size
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.interpolation = interpolation
        self.train = bool(train)
        self.crop_scale = tuple(float(value) for value in crop_scale)
        self.crop_ratio = tuple(float(value) for value in crop_ratio)
        self.hflip = float(hflip)
        self.resize_mode = resize_mode
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"ImageTransform({', '.join(f'{k}={v!r}' for k, v in self._arguments().items())})"

    def _arguments(self) -> dict:
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std, "resize_size": self.resize_size,
                "interpolation": self.interpolation, "train": self.train, "crop_scale": self.crop_scale,
                "crop_ratio": self.crop_ratio, "hflip": self.hflip, "resize_mode": self.resize_mode}

    def geometry(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """The resized/cropped (and in train mode augmented) RGB PIL image, before normalization."""
        resample = _INTERPOLATION[self.interpolation]
        size = self.image_size
        if self.train:
            box, flip = self.train_params(image.width, image.height, rng if rng is not None else random.Random())
            # Crop, then resize: PIL's resize(box=...) would sample pixels outside the box at the edges.
            image = image.crop(box)
            if image.size != (size, size):
                image = image.resize((size, size), resample)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return image
        if self.resize_mode == "squash":
            return image if image.size == (size, size) else image.resize((size, size), resample)
        new_width, new_height = resized_shortest_side(image.width, image.height, self.resize_size)
        left, top, right, bottom = center_crop_box(new_width, new_height, size, size)
        if new_width * new_height > MAX_RESIZED_PIXELS:
            # A thin image: resizing its short side would make it huge (a 1 x 16,000 px strip at
            # 224 px is 224 x 3.6 million px, 2.4 GB) only for the crop to keep 224 x 224. Resize
            # just the source region the crop keeps (PIL takes the filter's support from around
            # the box): the same geometry, but PIL's rounding differs from resize-then-crop's, by
            # under half a grey level on average and a few tens at single pixels (tested).
            scale_x, scale_y = image.width / new_width, image.height / new_height
            box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
            return image.resize((size, size), resample, box=box)
        if (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), resample)
        return image if image.size == (size, size) else image.crop((left, top, right, bottom))

    def train_params(self, width: int, height: int, rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
        """The training augmentation of one image: (crop box, flipped), drawn from `rng` as `geometry` draws it."""
        box = random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio, rng)
        return box, self.hflip > 0 and rng.random() < self.hflip

    def point_map(self, width: int, height: int, rng: random.Random | None = None) -> Callable[[float, float], tuple[float, float]]:
        """The function taking an input pixel point (x, y) of a width x height image to where it
        lands in the output, as fractions of the output side in [0, 1] (points cut off by the
        crop fall outside [0, 1]). In train mode the crop and flip are drawn once from `rng`,
        which must be in the state `geometry` starts from, so every box of the image follows them."""
        if self.train:
            (left, top, right, bottom), flip = self.train_params(width, height, rng if rng is not None else random.Random())

            def to_output(x: float, y: float) -> tuple[float, float]:
                u, v = (x - left) / (right - left), (y - top) / (bottom - top)
                return (1.0 - u if flip else u), v
            return to_output
        if self.resize_mode == "squash":
            return lambda x, y: (x / width, y / height)
        new_width, new_height = resized_shortest_side(width, height, self.resize_size)
        left, top, _, _ = center_crop_box(new_width, new_height, self.image_size, self.image_size)
        return lambda x, y: ((x * new_width / width - left) / self.image_size,
                             (y * new_height / height - top) / self.image_size)

    def output_point(self, width: int, height: int, x: float, y: float,
                     rng: random.Random | None = None) -> tuple[float, float]:
        """`point_map(width, height, rng)` applied to the one point (x, y)."""
        return self.point_map(width, height, rng)(x, y)

    def __call__(self, image: Any, rng: random.Random | None = None) -> torch.Tensor:
        """Preprocess one image (path, PIL image or uint8 array) into a (3, H, W) float32 tensor."""
        pil = self.geometry(to_pil(image), rng)
        array = np.asarray(pil, dtype=np.uint8)  # (H, W, 3)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)
        return pixels.sub_(self._mean).div_(self._std)

    def batch(self, images: Sequence[Any], rng: random.Random | None = None) -> torch.Tensor:
        """Preprocess a list of images into a (B, 3, H, W) tensor."""
        if len(images) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self(image, rng) for image in images])  # (B, 3, H, W)

    def eval(self) -> "ImageTransform":
        """The same preprocessing without augmentation (what evaluation and inference use)."""
        return ImageTransform(**{**self._arguments(), "train": False})

    # ------------------------------------------------------------------------- config

    def to_config(self) -> dict:
        """HF CLIPImageProcessor-compatible settings plus vlmkit's augmentation under "vlmkit"."""
        squash = self.resize_mode == "squash"
        return {
            "image_processor_type": "SiglipImageProcessor" if squash else "CLIPImageProcessor",
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size} if squash else {"shortest_edge": self.resize_size},
            "resample": int(_INTERPOLATION[self.interpolation]),
            "do_center_crop": not squash,
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
            "vlmkit": {"train": self.train, "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio),
                       "hflip": self.hflip, "interpolation": self.interpolation, "resize_mode": self.resize_mode},
        }

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "ImageTransform":
        """Build from `to_config()` output or an HF preprocessor_config.json dict; `overrides` win.

        HF keys this class cannot honour (a non-square crop, rescaling other than 1/255, no
        resize) raise `UserError`; other HF keys are ignored as HF itself does, but unknown keys
        inside the "vlmkit" section are rejected.
        """
        def side(value, name: str) -> int:
            if isinstance(value, int):
                return value
            if isinstance(value, dict) and "shortest_edge" in value:
                return int(value["shortest_edge"])
            if isinstance(value, dict) and "height" in value and "width" in value:
                if value["height"] != value["width"]:
                    raise UserError(f"preprocessor config '{name}' {value} is not square; vlmkit's ImageTransform supports square inputs only")
                return int(value["height"])
            raise UserError(f"preprocessor config '{name}' {value!r} is not understood; use {{\"shortest_edge\": N}} or {{\"height\": N, \"width\": N}}")

        if config.get("do_resize", True) is False:
            raise UserError("preprocessor config sets do_resize false; vlmkit always resizes, set it to true")
        if config.get("do_rescale", True) and not math.isclose(float(config.get("rescale_factor", 1 / 255)), 1 / 255, rel_tol=1e-6):
            raise UserError(f"preprocessor config rescale_factor {config['rescale_factor']} is not 1/255, which vlmkit assumes")
        extra = config.get("vlmkit", {}) or {}
        unknown = set(extra) - _VLMKIT_KEYS
        if unknown:
            raise UserError(f"preprocessor config has unknown vlmkit keys {sorted(unknown)}; allowed: {sorted(_VLMKIT_KEYS)}")
        size_value = config.get("size", config.get("crop_size", 224))
        squash = isinstance(size_value, dict) and "height" in size_value and "shortest_edge" not in size_value
        do_crop = bool(config.get("do_center_crop", not squash))
        arguments: dict[str, Any] = {}
        if squash and not do_crop:
            arguments.update(image_size=side(size_value, "size"), resize_mode="squash")
        else:
            resize = side(size_value, "size")
            crop = side(config.get("crop_size", resize), "crop_size") if do_crop else resize
            arguments.update(image_size=crop, resize_size=resize)
        if config.get("do_normalize", True):
            arguments.update(mean=config.get("image_mean", CLIP_MEAN), std=config.get("image_std", CLIP_STD))
        else:
            arguments.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        if "resample" in config:
            if int(config["resample"]) not in _INTERPOLATION_NAME:
                raise UserError(f"preprocessor config resample {config['resample']} is not a PIL resampling code (0-5)")
            arguments["interpolation"] = _INTERPOLATION_NAME[int(config["resample"])]
        for key in ("train", "crop_scale", "crop_ratio", "hflip", "interpolation", "resize_mode"):
            if key in extra:
                arguments[key] = extra[key]
        arguments.update(overrides)
        return cls(**arguments)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `preprocessor_config.json` into `directory` (created if missing); returns its path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_config(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, **overrides) -> "ImageTransform":
        """Read `preprocessor_config.json` (vlmkit's or HF's) from `directory` or a direct file path."""
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise UserError(f"'{path}' does not exist; save the transform with ImageTransform.save(dir) or point at a folder with {CONFIG_NAME}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"'{path}' is not valid JSON ({error.msg} at line {error.lineno}); fix or regenerate it") from None
        if not isinstance(config, dict):
            raise UserError(f"'{path}' must hold a JSON object of preprocessing settings; regenerate it")
        return cls.from_config(config, **overrides)
