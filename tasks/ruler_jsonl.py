"""RULER instances as jsonl: one `lminf_jax.tasks.ruler.Instance` per line (`write_jsonl`), read back with
every field checked against what `lminf_jax.tasks.ruler.generate` could have made (`read_jsonl`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
from collections.abc import Iterable
from pathlib import Path

from lminf_jax.tasks.ruler import MAX_NEW_TOKENS, SLACK, TASKS, Instance

VERSION = 1


def write_jsonl(instances: Iterable[Instance], path: str | os.PathLike) -> None:
    """One JSON object per line: every `Instance` field and ``"version"``."""
    with Path(path).open("w", encoding="utf-8") as f:
        for inst in instances:
            f.write(json.dumps({"version": VERSION, **dataclasses.asdict(inst)}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[Instance]:
    """The instances `write_jsonl` wrote, each line checked by `parse_instance` (a ValueError names
    the file and line of the first bad one)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(parse_instance(line))
            except ValueError as e:
                raise ValueError(f"{path}:{i + 1}: {e}") from None
    return out


def parse_instance(line: str) -> Instance:
    """One `write_jsonl` line as an `Instance`, every field checked against what `generate` makes
    (`instance_problem`); a ValueError says what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(record, dict) or not _integer(record.get("version"), VERSION, VERSION):
        raise ValueError(f"not a version {VERSION} RULER instance")
    fields = [f.name for f in dataclasses.fields(Instance)]
    missing = [k for k in fields if k not in record]
    unknown = [k for k in record if k not in (*fields, "version")]
    problems = [f"missing key(s): {', '.join(missing)}"] if missing else []
    problems += [f"unknown key(s): {', '.join(unknown)}"] if unknown else []
    problem = "; ".join(problems) or instance_problem(record)
    if problem:
        raise ValueError(problem)
    tuples = {k: tuple(record[k]) for k in ("outputs", "needle_positions", "haystack")}
    depth = None if record["depth"] is None else float(record["depth"])
    return Instance(**{k: record[k] for k in fields} | tuples | {"depth": depth})


def _integer(value: object, low: int, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def instance_problem(record: dict) -> str | None:
    """What in an instance's fields (all present) `generate` could not have made, or None: the
    rule ``length - SLACK[task] <= tokens <= length``, needle positions inside the prompt, etc.
    (That `tokens` is the prompt's count under a tokenizer is `experiments.ruler.make_instances`'s check.)"""
    task, length, tokens, depth, seed = (record[k] for k in ("task", "length", "tokens", "depth", "seed"))
    outputs, positions, haystack = record["outputs"], record["needle_positions"], record["haystack"]
    needles = task not in ("cwe", "fwe")
    if not isinstance(task, str) or task not in TASKS:
        return f"task {reprlib.repr(task)} is not a RULER task; known: {', '.join(TASKS)}"
    if not _integer(length, 1):
        return f"length must be a positive integer, got {reprlib.repr(length)}"
    if not _integer(tokens, length - SLACK[task], length):
        return (f"length {length} and tokens {reprlib.repr(tokens)} disagree: {task} prompts have length - "
                f"{SLACK[task]} <= tokens <= length")
    if depth is not None and not needles:
        return f"{task} has no needle: depth must be null, got {reprlib.repr(depth)}"
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1):
        return f"depth must be a number in [0, 1] or null, got {reprlib.repr(depth)}"
    if not _integer(seed, 0):
        return f"seed must be a non-negative integer, got {reprlib.repr(seed)}"
    if not isinstance(record["prompt"], str) or not record["prompt"]:
        return "prompt must be a non-empty string"
    if not isinstance(record["answer_prefix"], str):
        return "answer_prefix must be a string"
    if not (isinstance(outputs, list) and outputs and all(isinstance(o, str) and o for o in outputs)):
        return f"outputs must be a non-empty list of non-empty strings, got {reprlib.repr(outputs)}"
    wanted = len(outputs) if needles else 0
    if not (isinstance(positions, list) and len(positions) == wanted
            and all(_integer(p, 0, tokens - 1) for p in positions)):
        what = f"{wanted} integer(s) in [0, {tokens - 1}] (one per output)" if needles else f"[] ({task} has no needle)"
        return f"needle_positions must be {what}, got {reprlib.repr(positions)}"
    if not (isinstance(haystack, list) and len(haystack) == 2 and _integer(haystack[0], 0)
            and _integer(haystack[1], haystack[0], tokens)):
        return (f"haystack must be [start, end] with 0 <= start <= end <= tokens = {tokens}, "
                f"got {reprlib.repr(haystack)}")
    new = record["max_new_tokens"]
    if not _integer(new, MAX_NEW_TOKENS[task], MAX_NEW_TOKENS[task]):
        return f"max_new_tokens must be {MAX_NEW_TOKENS[task]} (RULER's for {task}), got {reprlib.repr(new)}"
    return None

