"""One way to save work so that a long run, interrupted or rerun with other settings, loses nothing and mixes
nothing: every resumable command (streaming NLL, perplexity, RULER, training) saves and resumes through this.

* Atomic writes (`atomic_file`, `write_atomic`, `write_json_atomic`): the bytes go to a hidden temporary file
  in the target's own folder (``.NAME.tmp-PID``, `TEMP`), are flushed to disk (fsync), then replace the
  target in one `os.replace`: a reader sees the old file or the new one, never half of one; an exception
  on the way removes the temporary file.
* The run's identity: what it saves records the settings that determine the results and the params'
  fingerprint (`lminf_jax.evaluation.fingerprint.tree_fingerprint`, field `PARAMS`); a resume is accepted
  only when both match. `check_identity` raises a `Mismatch` naming each field that differs;
  `newest_intact` finds the newest saved state that reads back intact, dropping damaged newer ones.
* `ResultFile`: a JSON result rewritten after each finished piece of work, resumed by a run with the same
  settings (checked before the params load) and the same params (checked once they have).
* `write_checked` / `read_checked`: pieces of finished work saved under a name holding the checksum of
  their bytes (``STEM.SHA.npy``), read back only when the bytes still match it.
* `OwnFolder`: a folder's entries that a run writes, told apart from anything else by name and content. A
  run deletes or writes into nothing else: an entry named like its own that is not (a file, a link, a
  folder holding anything else) is refused with an error naming it, before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = ["PARAMS", "TEMP", "Mismatch", "OwnFolder", "ResultFile", "atomic_file", "check_identity", "newest_intact",
           "read_checked", "write_atomic", "write_checked", "write_json_atomic"]

#: The field of a run's settings that holds its params' fingerprint.
PARAMS = "params"
#: The name of an atomic write's temporary file (`atomic_file`): debris of a killed one matches it.
TEMP = re.compile(r"\..+\.tmp-\d+")

P = TypeVar("P")
R = TypeVar("R")


# ----- atomic writes ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content into; on leaving the block it is synced and replaces
    `path` at once (its folders are created). An exception in the block leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) at `path` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, record: Any) -> None:
    """Write `record` as JSON (indented by 1, as every result of the project) at `path` atomically."""
    write_atomic(path, json.dumps(record, indent=1))


# ----- the run's identity -----------------------------------------------------------------------


class Mismatch(ValueError):
    """A saved state that another run (other settings, model or data) made."""


def _flatten(record: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_identity(saved: Any, wanted: Mapping, where: str) -> None:
    """Raise a `Mismatch` naming every field (dotted path into nested dicts) in which ``saved``
    differs from ``wanted``: ``"{where} does not match this run: field: checkpoint has A, run asks B"``."""
    saved_fields = _flatten(saved) if isinstance(saved, Mapping) else {}
    wanted_fields = _flatten(wanted)
    diffs = [f"{key}: checkpoint has {_show(saved_fields.get(key))}, run asks {_show(wanted_fields.get(key))}"
             for key in [*wanted_fields, *(k for k in saved_fields if k not in wanted_fields)]
             if saved_fields.get(key) != wanted_fields.get(key)]
    if diffs:
        raise Mismatch(f"{where} does not match this run: " + "; ".join(diffs))


def _show(value: Any) -> str:
    return "nothing" if value is None else str(value)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def newest_intact(candidates: Sequence[P], read: Callable[[P], R], discard: Callable[[P], None],
                  name: Callable[[P], str] = str) -> tuple[P, R] | None:
    """``(candidate, read(candidate))`` for the first candidate (newest first) that ``read``
    restores and verifies; None when there are none.

    ``read`` raises a `Mismatch` for a state of another run (re-raised: nothing is touched) and
    any other exception for a damaged or unreadable one. Damaged candidates newer than the one
    restored are ``discard``-ed, with one warning line each on stderr; when none is intact, a
    ValueError lists each candidate and why it failed.
    """
    failures: list[tuple[P, str]] = []
    for candidate in candidates:
        try:
            value = read(candidate)
        except Mismatch:
            raise
        except Exception as e:  # orbax / tensorstore / json raise many types: all mean "not intact"
            failures.append((candidate, _reason(e)))
            continue
        for bad, why in failures:
            print(f"warning: {name(bad)} is damaged ({why}); removed it and resumed from {name(candidate)}",
                  file=sys.stderr)
            discard(bad)
        return candidate, value
    if failures:
        listed = "; ".join(f"{name(bad)}: {why}" for bad, why in failures)
        raise ValueError(f"no intact saved state: {listed} (remove the damaged state(s) to start afresh)")
    return None


# ----- a JSON result resumed piece by piece -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResultFile:
    """The JSON result at ``path`` (``--out``): ``{"settings": {...}, ...}``, settings holding the params'
    fingerprint as `PARAMS`, rewritten (`write`) after each finished piece of work. ``kind`` names the
    command's results in messages (``"RULER"``); ``parts``: the other fields (dicts) a record holds."""

    path: Path
    kind: str
    parts: tuple[str, ...] = ()

    def earlier(self, settings: Mapping) -> dict | None:
        """The record at `path` (None when there is none) when its settings are `settings` in every field
        but `PARAMS` (checked by `resume` once the params are loaded); else a ValueError naming the fields
        that differ, or saying that the file is no such result."""
        if not self.path.exists():
            return None
        try:
            old = json.loads(self.path.read_text())
            saved = old["settings"]
            differ = [k for k in {**settings, **saved} if k != PARAMS and saved.get(k) != settings.get(k)]
            ours = all(isinstance(old[part], dict) for part in self.parts)
        except (ValueError, KeyError, TypeError, AttributeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {self.path} exists and is not a {self.kind} result: pass another --out or "
                             "remove it")
        if differ:
            raise ValueError(f"--out {self.path} holds a {self.kind} run with other settings ({', '.join(differ)} "
                             "differ): pass another --out or remove it")
        return old

    def resume(self, earlier: dict | None, params: str) -> dict | None:
        """`earlier` (from `earlier`) when its params' fingerprint is `params`, saying ``resuming PATH`` on
        stderr; None when it is None; a ValueError when it holds a run of other params."""
        if earlier is None:
            return None
        saved = earlier["settings"].get(PARAMS)
        if saved != params:
            raise ValueError(f"--out {self.path} holds a {self.kind} run of other weights (settings.{PARAMS}: "
                             f"{saved} there, {params} here): pass another --out or remove it")
        print(f"resuming {self.path}", file=sys.stderr)
        return earlier

    def write(self, record: Mapping) -> None:
        """Write `record` at `path` atomically."""
        write_json_atomic(self.path, record)


# ----- pieces of work named by their checksum ---------------------------------------------------


def _checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_checked(folder: Path, stem: str, data: bytes, suffix: str = ".npy") -> Path:
    """Write `data` atomically as ``folder/STEM.SHA{suffix}``, SHA the start of its sha256."""
    path = folder / f"{stem}.{_checksum(data)}{suffix}"
    write_atomic(path, data)
    return path


def read_checked(folder: Path, stem: str, suffix: str = ".npy", redo: str = "doing it again") -> bytes | None:
    """The bytes of ``folder/STEM.SHA{suffix}`` (`write_checked`) when they hash to SHA, else None; a
    damaged or unreadable file is removed, with a warning on stderr ending in `redo`."""
    for path in sorted(folder.glob(f"{stem}.*{suffix}")):
        try:
            data = path.read_bytes()
        except OSError as e:
            reason = f"unreadable: {e}"
        else:
            if _checksum(data) == path.name[len(stem) + 1:-len(suffix)]:
                return data
            reason = "its bytes do not match the checksum in its name"
        print(f"warning: {path} is damaged ({reason}); {redo}", file=sys.stderr)
        path.unlink(missing_ok=True)
    return None


# ----- folders that hold only what the run wrote ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OwnFolder:
    """The entries a run writes in a folder (its ``option``, e.g. ``checkpoint_dir``): those whose name
    `names` matches fully are its own when they are directories (not links) holding only names that
    `contents` matches. Every other name is none of its business and never touched."""

    option: str
    store: str
    names: re.Pattern
    contents: re.Pattern

    def entries(self, directory: str | os.PathLike) -> list[Path]:
        """The entries of `directory` named like the run's (none when it does not exist), each checked to be
        its own (`check`)."""
        directory = Path(directory).absolute()
        if not directory.is_dir():
            return []
        found = [p for p in directory.iterdir() if self.names.fullmatch(p.name)]
        for path in found:
            self.check(path)
        return found

    def check(self, path: Path) -> None:
        """Refuse (ValueError naming it) `path` unless it is a directory, not a link, holding only `contents`."""
        if path.is_symlink() or not path.is_dir():
            why = "it is not a directory"
        else:
            foreign = sorted(p.name for p in path.iterdir() if not self.contents.fullmatch(p.name))
            if not foreign:
                return
            why = f"it holds {', '.join(foreign)}, which the store never writes"
        raise ValueError(f"{self.option} {path.parent}: {path.name} is named like an entry of the {self.store} but is "
                         f"not its own ({why}); move it out of {path.parent} or choose another {self.option}")

    def discard(self, path: Path) -> None:
        """Delete one of the run's own entries, checked again: nothing else is ever deleted."""
        self.check(path)
        shutil.rmtree(path)
