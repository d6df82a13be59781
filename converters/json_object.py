"""JSON objects read from checkpoint files, with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def read_json_object(path: Path) -> dict:
    """The JSON object file `path` holds (`parse_json_object`); FileNotFoundError when it is absent."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return parse_json_object(path.read_bytes(), str(path))


def parse_json_object(raw: bytes, where: str, object_pairs_hook: Callable[[list], dict] | None = None) -> dict:
    """The object JSON text `raw` must hold; a ValueError naming `where` when it is not
    valid JSON (including nesting too deep for the parser and integers longer than Python's
    ``sys.get_int_max_str_digits()``) or not an object."""
    try:
        data = json.loads(raw, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a JSON object")
    return data
