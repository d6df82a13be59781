"""RULER instances for the tests: the shipped model's tokenizer, a standard-library text haystack and
`make`, one instance of a task at a length and depth."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from lminf_jax.converters.tokenizer import load_tokenizer
from lminf_jax.tasks import ruler

TOKENIZER = load_tokenizer(Path(__file__).resolve().parents[1] / "experiments" / "shipped" / "llama-small-stdlib")
TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")


def make(task: str, length: int, depth: float | None = 0.5, seed: int = 0) -> ruler.Instance:
    """An instance of `task` (depth None for cwe and fwe) with `TEXT` as the text haystack."""
    return ruler.generate(task, TOKENIZER, length, None if task in ("cwe", "fwe") else depth, seed, TEXT)
