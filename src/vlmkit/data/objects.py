"""The `objects` field of a record ([{name, box}], boxes [x0, y0, x1, y1] in image pixels), checked."""
from __future__ import annotations


def check_objects(record: dict, size: tuple[int, int]) -> str | None:
    """Why a record's `objects` cannot be used (None when they can): each needs a `name` and a
    `box` [x0, y0, x1, y1] with positive width and height inside the `size` (width, height) image."""
    objects = record.get("objects")
    if not isinstance(objects, list):
        return "has no 'objects' list"
    width, height = size
    for index, obj in enumerate(objects):
        box = obj.get("box") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(box, (list, tuple)) \
                or len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            return f"object {index} is not {{\"name\": str, \"box\": [x0, y0, x1, y1]}}"
        x0, y0, x1, y1 = box
        if not (x1 > x0 and y1 > y0):
            return f"object {index} ('{obj['name']}') has a box of zero area {list(box)}"
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return f"object {index} ('{obj['name']}') has a box {list(box)} outside the {width}x{height} image"
    return None
