"""The input limits every reader honours: image pixels, image sides, text length.

One place for them, read by training, evaluation, every CLI verb (and later the server), so a
hostile or broken input costs bounded memory and time wherever it enters:

- `max_image_pixels` (default 40,000,000): an image with more pixels than this *after* the
  reduction on load is refused before it is decoded (JPEGs are first reduced on load with PIL's
  `draft`, by 1/2, 1/4 or 1/8, so a large photo still loads). Below PIL's own decompression-bomb
  limit (about 179 megapixels), so that limit is never what stops an image.
- `max_image_side` (default 16,384): either side longer than this is refused before decoding
  (a 1 x 400,000 px PNG is a few hundred bytes, and resizing its short side would make it huge).
- `max_text_chars` (default 65,536): a text is cut to this many characters before it is
  tokenized (an 11 MB caption would otherwise take half a minute and gigabytes to tokenize, only
  for the tokens past the model's context to be thrown away).

Change them with the environment variables `VLMKIT_MAX_IMAGE_PIXELS`, `VLMKIT_MAX_IMAGE_SIDE` and
`VLMKIT_MAX_TEXT_CHARS` (every command, and every data-loader worker, which inherits the
environment), or in Python with `set_limits(max_image_pixels=..., ...)`, which wins over the
environment in this process and in workers forked from it (not in spawned ones: use the
environment there).
"""
from __future__ import annotations

import dataclasses
import os

from vlmkit.errors import UserError

_ENVIRONMENT = {
    "max_image_pixels": "VLMKIT_MAX_IMAGE_PIXELS",
    "max_image_side": "VLMKIT_MAX_IMAGE_SIDE",
    "max_text_chars": "VLMKIT_MAX_TEXT_CHARS",
}


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """Bounds on what one input may cost: pixels and sides of an image, characters of a text."""

    max_image_pixels: int = 40_000_000
    max_image_side: int = 16_384
    max_text_chars: int = 65_536

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"input limit {field.name} must be a positive integer, not {value!r}; "
                                f"set it with set_limits({field.name}=N) or {_ENVIRONMENT[field.name]}=N")


_explicit: dict[str, int] = {}


def _from_environment() -> dict[str, int]:
    values = {}
    for name, variable in _ENVIRONMENT.items():
        text = os.environ.get(variable)
        if text is None or not text.strip():
            continue
        try:
            values[name] = int(text.strip().replace("_", ""))
        except ValueError:
            raise UserError(f"environment variable {variable}={text!r} is not an integer; set it to a positive "
                            f"whole number or unset it") from None
    return values


def current_limits() -> InputLimits:
    """The limits in force: the defaults, overridden by the environment, overridden by `set_limits`."""
    return InputLimits(**{**_from_environment(), **_explicit})


def set_limits(**limits: int | None) -> InputLimits:
    """Override limits for this process (`None` drops an override); returns the limits now in force."""
    unknown = set(limits) - set(_ENVIRONMENT)
    if unknown:
        raise UserError(f"unknown input limit(s) {', '.join(sorted(unknown))}; known: {', '.join(_ENVIRONMENT)}")
    updated = {**_explicit, **{name: value for name, value in limits.items() if value is not None}}
    for name, value in limits.items():
        if value is None:
            updated.pop(name, None)
    InputLimits(**{**_from_environment(), **updated})  # validate before anything changes
    _explicit.clear()
    _explicit.update(updated)
    return current_limits()


def cut_text(text: str, limits: InputLimits | None = None) -> str:
    """`text` cut to `max_text_chars` characters (no copy when it is short enough)."""
    limit = (limits or current_limits()).max_text_chars
    return text if len(text) <= limit else text[:limit]
