"""The one error shape of the service: `{"error": {"type": ..., "message": ...}}` with an HTTP status.

Messages are one sentence naming the problem; `clean_message` strips file-system paths and
line breaks from any message that comes from library code, so no response ever shows where the
server keeps its files.
"""
from __future__ import annotations

import re

# An absolute path of two or more components (/home/x/run, C:\x\y), as library messages may carry;
# the service's own URL paths (/v1/caption) stay.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][\w.\-~]+){2,}[\\/]?")
_URL_PATHS = ("/v1/", "/static/")


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a short machine-readable `type` and one sentence."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message


def clean_message(message: str, limit: int = 400) -> str:
    """`message` on one line, without file-system paths, at most `limit` characters."""
    text = _PATH.sub(lambda m: m.group(0) if m.group(0).startswith(_URL_PATHS) else "<path>", " ".join(str(message).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_body(type: str, message: str) -> dict:
    return {"error": {"type": type, "message": clean_message(message)}}
