"""Reading the text files users give (datasets, score files, configs): UTF-8 and JSON, with every
way they can be wrong (a byte that is not UTF-8, bad syntax, nesting too deep for the parser, a value
of the wrong JSON type) reported as one UserError sentence naming the file and line.

Free of torch and PIL, so the `score` verbs stay light.
"""
from __future__ import annotations

import json
from typing import Any

from vlmkit.errors import UserError


def json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words, for messages: "a number (3)", "null", "a list", "an object"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "an empty string" if not str(value).strip() else "a string"


def parse_json(text: str, where: str, fix: str) -> Any:
    """`json.loads(text)`, with every way it can fail (bad syntax, nesting too deep for the parser)
    as a UserError naming `where` and ending with `fix`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); {fix}") from None
    except RecursionError:
        raise UserError(f"{where} holds JSON nested too deeply to read (thousands of levels); {fix}") from None


def decode_line(data: bytes, path: str, line_number: int) -> str:
    """One line's bytes as UTF-8 text, or a UserError naming the file, the line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} line {line_number} is not UTF-8 (byte {error.start + 1} of the line, 0x{data[error.start]:02x}); "
                        f"convert the file to UTF-8 or fix that line") from None


def decode_text(data: bytes, path: str) -> str:
    """A whole file's bytes as UTF-8 text (a BOM dropped), or a UserError naming the line of the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"{path} is not UTF-8 (line {line} holds byte 0x{data[error.start]:02x}); convert the file to UTF-8"
                        ) from None
