"""What the experiment CLIs share: loading a model and its tokenizer.

* `load_model(path, dtype)` -> ``(family, config, params)`` from a converted directory
  (``converted.json``, written by ``python -m converters``) or a Hugging Face directory
  (``config.json`` + weights, converted in memory on the fly).
* `load_tokenizer_from(path)`: the tokenizer stored in that directory; `add_tokenizer_arg` /
  `open_tokenizer`: ``--tokenizer DIR``, another directory's.
* `add_mesh_args(parser, default)` / `sharding_plan(args, default)`: ``--mesh`` / ``--fsdp``, the
  `lminf_jax.sharding.ShardingPlan` a model and its params are spread over devices by.
* `pretraining_length(config)`: the length the methods' defaults come from.

The method options are `experiments.methods`'.
Nothing here imports jax before it is used: a command parses its arguments (and shows ``--help``)
without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lminf_jax.converters.json_object import read_json_object
from lminf_jax.experiments.options import input_path

#: ``--dtype`` names (as in ``python -m converters``) and the dtypes they stand for.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

CONVERTED_FILE = "converted.json"
HF_CONFIG_FILE = "config.json"


#: The tokenizer files a model directory (or ``--tokenizer DIR``) holds, one of them.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


# ----- models -----------------------------------------------------------------------------------


def resolve_dtype(dtype: Any):
    """None, a ``--dtype`` name (bf16 / fp16 / fp32) or anything `jnp.dtype` accepts, as a `jnp.dtype`."""
    import jax.numpy as jnp

    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return jnp.dtype(DTYPES[dtype])
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a floating dtype, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {resolved.name}")
    return resolved


def model_kind(path: str | os.PathLike) -> str:
    """``"converted"`` or ``"hf"``; a ValueError naming `path` when it is neither."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory not found: {root}")
    if (root / CONVERTED_FILE).is_file():
        return "converted"
    if (root / HF_CONFIG_FILE).is_file():
        return "hf"
    raise ValueError(f"{root} is neither a converted checkpoint ({CONVERTED_FILE}, from `python -m converters`) "
                     f"nor a Hugging Face checkpoint ({HF_CONFIG_FILE} + weights)")


def hf_config(path: str | os.PathLike) -> dict:
    """The Hugging Face config dict of a converted or Hugging Face directory (reads no weights)."""
    root = Path(path)
    if model_kind(root) == "converted":
        meta = read_json_object(root / CONVERTED_FILE)
        config = meta.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{root / CONVERTED_FILE} holds no config")
        return config
    return read_json_object(root / HF_CONFIG_FILE)


def load_config(path: str | os.PathLike):
    """``(family, config)`` of a model directory, the config checked against the names and shapes of its
    weights (converted.json's params manifest, or the Hugging Face checkpoint's headers) without reading
    them (fast: use it to validate options before `load_model`)."""
    from lminf_jax.converters.convert import plan_params
    from lminf_jax.converters.families import check_manifest, layout_for
    from lminf_jax.converters.reader import CheckpointReader
    from lminf_jax.converters.store import read_manifest
    from lminf_jax.models.registry import FAMILIES, family_for_config

    root = Path(path)
    config = hf_config(root)
    if model_kind(root) == "converted":
        meta = read_json_object(root / CONVERTED_FILE)
        name = meta.get("family")
        if name not in FAMILIES:
            raise ValueError(f"{root / CONVERTED_FILE}: unknown family {name!r}; known: {sorted(FAMILIES)}")
        family = FAMILIES[name]
        parsed = family.config_from_hf(config)
        held = {name: spec.shape for name, spec in read_manifest(root).items()}
        check_manifest(family, parsed, held, root / CONVERTED_FILE)
    else:
        family = family_for_config(config)
        parsed = family.config_from_hf(config)
        plan_params(CheckpointReader(root), layout_for(family, parsed))
    return family, parsed


def load_model(path: str | os.PathLike, dtype: Any = None, *, progress: bool = False, plan=None):
    """``(family, config, params)`` from a converted directory or a Hugging Face directory.

    ``dtype`` (None: keep the stored dtypes; a ``--dtype`` name or a dtype) casts every
    floating-point parameter. A Hugging Face checkpoint is converted in memory (nothing is
    written); ``progress`` shows that conversion's progress line. ``plan`` (a
    `lminf_jax.sharding.ShardingPlan`) places every parameter straight into its shards.
    """
    from lminf_jax.converters.convert import load_params
    from lminf_jax.converters.families import layout_for
    from lminf_jax.converters.store import load_converted

    root = Path(path)
    target = resolve_dtype(dtype)
    family, config = load_config(root)
    shardings = None if plan is None else family.param_shardings(config, plan)
    if model_kind(root) == "converted":
        params = load_converted(root, shardings=shardings, dtype=target)[0]
    else:
        params = load_params(root, layout_for(family, config), dtype=target, progress=progress, shardings=shardings)
    return family, config, params


def add_mesh_args(parser: argparse.ArgumentParser, default: str) -> None:
    """Register ``--mesh`` and ``--fsdp`` (how the model is spread over several devices)."""
    group = parser.add_argument_group("devices (used when more than one is present or --mesh is given)")
    group.add_argument("--mesh", metavar="AXES",
                       help="device mesh as AXIS=SIZE pairs over data (batch), seq (context parallel) and model "
                            f"(tensor parallel); -1 takes the devices left over (default: {default})")
    group.add_argument("--fsdp", action="store_true", help="also split every weight's hidden dimension over data")


def sharding_plan(args: argparse.Namespace, default: str):
    """The `ShardingPlan` of ``--mesh`` (``default`` without it), or None on one device with no
    ``--mesh`` and no ``--fsdp``; prints the mesh."""
    import jax

    from lminf_jax.sharding import ShardingPlan, parse_mesh

    if args.mesh is None and not args.fsdp and jax.device_count() == 1:
        return None
    plan = ShardingPlan(parse_mesh(args.mesh or default), fsdp=args.fsdp)
    print(f"devices: {plan.describe()}", file=sys.stderr)
    return plan


def nonfinite_params(params) -> dict[str, int]:
    """``{flat parameter name: count}`` of the floating parameters holding NaN or infinite values."""
    import jax.numpy as jnp
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep=".") if isinstance(params, dict) else {"params": params}
    counts = {name: int(jnp.size(x) - jnp.isfinite(x).sum()) for name, x in flat.items()
              if jnp.issubdtype(x.dtype, jnp.floating)}
    return {name: n for name, n in counts.items() if n}


def params_dtype(params):
    """The floating dtype (a `jnp.dtype`) holding most parameters (float32 when there are none)."""
    import jax
    import jax.numpy as jnp

    counts: dict = {}
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            counts[jnp.dtype(leaf.dtype)] = counts.get(jnp.dtype(leaf.dtype), 0) + leaf.size
    return max(counts, key=counts.get) if counts else jnp.dtype(jnp.float32)


# ----- tokenizers -------------------------------------------------------------------------------


def load_tokenizer_from(path: str | os.PathLike):
    """The tokenizer stored in model directory `path` (``tokenizer.model`` or ``tokenizer.json``).

    For a ``tokenizer.json`` whose BOS/EOS are not named in ``tokenizer_config.json``, the
    config's ``bos_token_id``/``eos_token_id`` are used (as for a Hugging Face directory;
    a converted directory keeps its config in ``converted.json``).
    """
    from lminf_jax.converters.tokenizer import HFTokenizer, load_tokenizer

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory not found: {root}")
    try:
        tokenizer = load_tokenizer(root)
    except FileNotFoundError:
        raise NoTokenizer(f"{root} has no tokenizer files ({' / '.join(TOKENIZER_FILES)})") from None
    if isinstance(tokenizer, HFTokenizer) and (root / CONVERTED_FILE).is_file():
        config = hf_config(root)
        for kind in ("bos", "eos"):
            token_id = config.get(f"{kind}_token_id")
            usable = isinstance(token_id, int) and not isinstance(token_id, bool)
            if getattr(tokenizer, f"{kind}_id") is None and usable:
                setattr(tokenizer, f"{kind}_id", token_id)
    return tokenizer


class NoTokenizer(ValueError):
    """A directory that holds none of the `TOKENIZER_FILES`."""


def add_tokenizer_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Register ``--tokenizer DIR``: the tokenizer of another directory than the model's."""
    parser.add_argument("--tokenizer", type=input_path, metavar="DIR",
                        help=f"read the tokenizer ({' or '.join(TOKENIZER_FILES)}) from DIR (default: the model "
                             "directory)")


def open_tokenizer(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                   option: str = "--tokenizer DIR", alternative: str | None = None):
    """The tokenizer of `tokenizer_dir`, else of `model_dir`. When the model directory holds none, the
    ValueError says so and what to do: give `option` (how the command takes a tokenizer directory), or
    the command's `alternative` (e.g. ``"score token ids with --tokens F.npy"``)."""
    try:
        return load_tokenizer_from(model_dir if tokenizer_dir is None else tokenizer_dir)
    except NoTokenizer as e:
        if tokenizer_dir is not None:
            raise NoTokenizer(f"tokenizer directory {e}") from None
        also = f", or {alternative}" if alternative else ""
        raise NoTokenizer(f"model directory {e}: give {option}, a directory with the model's tokenizer{also}") from None


# ----- the model's pretraining length -----------------------------------------------------------


def pretraining_length(config) -> int:
    """The family config's pretraining length (`models.declaration.ModelConfig`: each family says which
    config field holds it, e.g. BLOOM's ``seq_length`` or 2048)."""
    return config.pretraining_length
