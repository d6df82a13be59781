"""The models the project ships (`experiments/shipped/`), and the one positional argument through which
every command takes a model directory, defaulting to one of them."""

from __future__ import annotations

import argparse
from pathlib import Path

from lminf_jax.experiments.options import input_path

_SHIPPED = Path(__file__).resolve().parent / "shipped"
#: The LLaMA-style model trained on the standard library (pretraining length 512): the default model.
SHIPPED_MODEL = _SHIPPED / "llama-small-stdlib"
#: `SHIPPED_MODEL` fine-tuned on passkey prompts (`experiments.train --passkey-fraction`).
SHIPPED_PASSKEY_MODEL = _SHIPPED / "llama-small-stdlib-passkey"
#: `SHIPPED_MODEL` fine-tuned on RULER instances (`experiments.train --ruler-fraction`).
SHIPPED_RULER_MODEL = _SHIPPED / "llama-small-stdlib-ruler"


def add_model_arg(parser: argparse.ArgumentParser, default: Path | None = SHIPPED_MODEL, what: str = "") -> None:
    """The ``model_dir`` positional: a converted or Hugging Face model directory, optional when ``default``
    (a shipped model, described by ``what``) is given."""
    text = "converted or Hugging Face model directory"
    if default is None:
        parser.add_argument("model_dir", type=input_path, help=text)
    else:
        parser.add_argument("model_dir", nargs="?", default=str(default), type=input_path,
                            help=f"{text} (default: {what or 'the shipped LLaMA-style model'})")
