"""Argument types that check a command-line value when it is parsed, before any work starts.

argparse calls a ``type=`` function on every given value and on string defaults, and turns its
`argparse.ArgumentTypeError` into ``error: argument --out: ...`` with the usage (exit code 2). So
an option declared with one of these types can never reach the expensive part of a run with a
value that would fail there, or silently wrap:

* `int_option(minimum)`: an integer in ``[minimum, 2**31 - 1]``. Every integer option of the
  experiment CLIs ends up in int32 device arithmetic (positions, counts, sizes) or bounds one.
* `output_file`: a file path that can be written (not a directory; its folder exists or can be
  created); `output_dir`: a folder that exists or can be created, and can be written into.

Writability is probed by creating (and removing) a temporary file in the nearest existing
folder: permission bits say nothing for root or on a read-only file system.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lminf_jax.spec import INT32_MAX


def int_option(minimum: int, maximum: int = INT32_MAX) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not minimum <= value <= maximum:
            upper = "2**31 - 1" if maximum == INT32_MAX else str(maximum)
            raise argparse.ArgumentTypeError(f"must lie in [{minimum}, {upper}], got {value}")
        return value

    return parse


def output_file(text: str) -> str:
    """An argparse type: a file path this process can write (its folders may not exist yet)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} exists and is not writable")
    _check_creatable(path.parent)
    return text


def output_dir(text: str) -> str:
    """An argparse type: a folder that exists or can be created, and can be written into."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    _check_creatable(path)
    return text


def _check_creatable(folder: Path) -> None:
    """Raise unless files can be created in `folder` (or in its nearest existing ancestor, from
    which the missing folders would be made)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {folder}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write in {existing}: {e.strerror or e}") from None
