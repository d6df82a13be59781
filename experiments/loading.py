"""What the experiment CLIs share: loading a model and its tokenizer, and the attention options.

* `load_model(path, dtype)` -> ``(family, config, params)`` from a converted directory
  (``converted.json``, written by ``python -m converters``) or a Hugging Face directory
  (``config.json`` + weights, converted in memory on the fly).
* `load_tokenizer_from(path)`: the tokenizer stored in that directory.
* `add_mesh_args(parser, default)` / `sharding_plan(args, default)`: ``--mesh`` / ``--fsdp``, the
  `lminf_jax.sharding.ShardingPlan` a model and its params are spread over devices by.
* `add_attention_args(parser)` / `spec_from_args(args, config)`: one set of command-line
  options for the attention method, turned into an `AttentionSpec`::

      --method lm_infinite|vanilla|lambda_mask|distance_limit|sliding_window|streaming_llm
      -G/--global-branch  -L/--local-branch  -D/--limit-distance
      --top-k-middle K  --top-k-insert-at N  --top-k-from-layer H

  Defaults: ``lm_infinite``, G = 10 (4 for ``streaming_llm``, StreamingLLM's own default),
  L = the model's pretraining length (`pretraining_length`), D = L (``distance_limit``: the
  pretraining length), top-k middle tokens off; when on, inserted at distance L/2 (the paper's) from layer 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from converters.reader import read_json_object
from experiments.options import int_option
from lminf_jax import AttentionSpec, TopK
from lminf_jax.spec import KINDS

#: ``--dtype`` names, as in ``python -m converters``.
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}

CONVERTED_FILE = "converted.json"
HF_CONFIG_FILE = "config.json"

#: Config attributes holding the pretraining length, in the order they are looked up.
LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len")

#: Which ``--method`` uses which of -G, -L, -D.
_USES = {
    "vanilla": (),
    "lm_infinite": ("global_branch", "local_branch", "limit_distance"),
    "lambda_mask": ("global_branch", "local_branch"),
    "distance_limit": ("limit_distance",),
    "sliding_window": ("local_branch",),
    "streaming_llm": ("global_branch", "local_branch"),
}
_FLAGS = {"global_branch": "-G/--global-branch", "local_branch": "-L/--local-branch",
          "limit_distance": "-D/--limit-distance"}
_TOP_K_FLAGS = {"top_k_insert_at": "--top-k-insert-at", "top_k_from_layer": "--top-k-from-layer"}


# ----- models -----------------------------------------------------------------------------------


def resolve_dtype(dtype: Any) -> jnp.dtype | None:
    """None, a ``--dtype`` name (bf16 / fp16 / fp32) or anything `jnp.dtype` accepts."""
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
    """``(family, config)`` of a model directory without reading its weights (fast: use it to
    validate options before `load_model`)."""
    from models.registry import FAMILIES, family_for_config

    root = Path(path)
    config = hf_config(root)
    if model_kind(root) == "converted":
        name = read_json_object(root / CONVERTED_FILE).get("family")
        if name not in FAMILIES:
            raise ValueError(f"{root / CONVERTED_FILE}: unknown family {name!r}; known: {sorted(FAMILIES)}")
        family = FAMILIES[name]
    else:
        family = family_for_config(config)
    return family, family.config_from_hf(config)


def load_model(path: str | os.PathLike, dtype: Any = None, *, progress: bool = False, plan=None):
    """``(family, config, params)`` from a converted directory or a Hugging Face directory.

    ``dtype`` (None: keep the stored dtypes; a ``--dtype`` name or a dtype) casts every
    floating-point parameter. A Hugging Face checkpoint is converted in memory (nothing is
    written); ``progress`` shows that conversion's progress line. ``plan`` (a
    `lminf_jax.sharding.ShardingPlan`) places every parameter straight into its shards.
    """
    from converters.convert import load_params
    from converters.families import layout_for
    from converters.store import load_converted

    root = Path(path)
    target = resolve_dtype(dtype)
    family, config = load_config(root)
    shardings = None if plan is None else family.param_shardings(config, plan)
    if model_kind(root) == "converted":
        params = load_converted(root, shardings=shardings)[0]
        if target is not None:
            params = jax.tree.map(
                lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
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
    from lminf_jax.sharding import ShardingPlan, parse_mesh

    if args.mesh is None and not args.fsdp and jax.device_count() == 1:
        return None
    plan = ShardingPlan(parse_mesh(args.mesh or default), fsdp=args.fsdp)
    print(f"devices: {plan.describe()}", file=sys.stderr)
    return plan


def params_dtype(params) -> jnp.dtype:
    """The floating dtype holding most parameters (float32 when there are none)."""
    counts: dict[jnp.dtype, int] = {}
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
    from converters.tokenizer import HFTokenizer, load_tokenizer

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory not found: {root}")
    try:
        tokenizer = load_tokenizer(root)
    except FileNotFoundError:
        raise ValueError(
            f"no tokenizer in {root}: expected tokenizer.model or tokenizer.json (a directory converted by an "
            "older `python -m converters` lacks them: copy them from the Hugging Face directory)") from None
    if isinstance(tokenizer, HFTokenizer) and (root / CONVERTED_FILE).is_file():
        config = hf_config(root)
        for kind in ("bos", "eos"):
            token_id = config.get(f"{kind}_token_id")
            usable = isinstance(token_id, int) and not isinstance(token_id, bool)
            if getattr(tokenizer, f"{kind}_id") is None and usable:
                setattr(tokenizer, f"{kind}_id", token_id)
    return tokenizer


# ----- attention options ------------------------------------------------------------------------


def pretraining_length(config) -> int:
    """The family config's pretraining length (the first of `LENGTH_FIELDS` it has)."""
    for name in LENGTH_FIELDS:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    raise ValueError(f"the model config has none of {', '.join(LENGTH_FIELDS)}: pass -L/--local-branch")


def add_attention_args(parser: argparse.ArgumentParser) -> None:
    """Register the attention options (see the module docstring) on `parser`."""
    group = parser.add_argument_group("attention (LM-Infinite and ablations)")
    group.add_argument("--method", choices=KINDS, default="lm_infinite",
                       help="attention mask (default: lm_infinite)")
    group.add_argument("-G", "--global-branch", type=int_option(0), metavar="G",
                       help="sink tokens at the start (default: 10; 4 for streaming_llm)")
    group.add_argument("-L", "--local-branch", type=int_option(1), metavar="L",
                       help="window of the last L tokens (default: the model's pretraining length)")
    group.add_argument("-D", "--limit-distance", type=int_option(1), metavar="D",
                       help="distance the sinks are scored at (lm_infinite, default L) or the cap on "
                            "distances (distance_limit, default: the pretraining length)")
    group.add_argument("--top-k-middle", type=int_option(1), metavar="K",
                       help="also attend the K best hidden middle tokens from the last query (default: off)")
    group.add_argument("--top-k-insert-at", type=int_option(0), metavar="N",
                       help="distance the top-k middle tokens are scored at (default: L)")
    group.add_argument("--top-k-from-layer", type=int_option(0), metavar="H",
                       help="first layer using top-k middle tokens (default: 4)")


def spec_from_args(args: argparse.Namespace, config=None) -> AttentionSpec:
    """The `AttentionSpec` the attention options ask for; ``config`` (a family config or HF
    config dict) supplies the default L. A ValueError names an option that does not apply."""
    method = args.method
    uses = _USES[method]
    for name, flag in _FLAGS.items():
        if getattr(args, name) is not None and name not in uses:
            raise ValueError(f"{flag} is not used by --method {method}")
    if args.top_k_middle is None:
        for name, flag in _TOP_K_FLAGS.items():
            if getattr(args, name) is not None:
                raise ValueError(f"{flag} needs --top-k-middle")

    def default_length() -> int:
        if config is None:
            raise ValueError(f"--method {method} needs -L/--local-branch (no model config to take it from)")
        return pretraining_length(config)

    g = args.global_branch if args.global_branch is not None else (4 if method == "streaming_llm" else 10)
    length = args.local_branch
    if length is None and "local_branch" in uses:
        length = default_length()
    if method == "distance_limit":
        distance = args.limit_distance if args.limit_distance is not None else default_length()
    else:
        distance = args.limit_distance if args.limit_distance is not None else length
    top_k = None
    if args.top_k_middle is not None:
        if method in ("vanilla", "distance_limit"):
            raise ValueError(f"--top-k-middle needs a mask that hides middle tokens; --method {method} hides none")
        insert_at = args.top_k_insert_at if args.top_k_insert_at is not None else length // 2  # the paper's L/2
        top_k = TopK(k=args.top_k_middle, insert_distance=insert_at,
                     from_layer=4 if args.top_k_from_layer is None else args.top_k_from_layer)
    if method == "vanilla":
        spec = AttentionSpec.vanilla()
    elif method == "lm_infinite":
        spec = AttentionSpec.lm_infinite(g, length, distance)
    elif method == "lambda_mask":
        spec = AttentionSpec.lambda_mask(g, length)
    elif method == "distance_limit":
        spec = AttentionSpec.distance_limit(distance)
    elif method == "sliding_window":
        spec = AttentionSpec.sliding_window(length)
    else:
        spec = AttentionSpec.streaming_llm(g, length)
    if top_k is not None:
        spec = dataclasses.replace(spec, top_k=top_k)
    return spec


def method_spec(method: str, config=None, *, global_branch: int | None = None, local_branch: int | None = None,
                limit_distance: int | None = None) -> AttentionSpec:
    """`spec_from_args` for one method, taking only the options that method uses (an
    experiment comparing several methods applies -G/-L/-D wherever they apply)."""
    if method not in _USES:
        raise ValueError(f"unknown method {method!r}; choose from {list(KINDS)}")
    given = {"global_branch": global_branch, "local_branch": local_branch, "limit_distance": limit_distance}
    args = argparse.Namespace(method=method, top_k_middle=None, top_k_insert_at=None, top_k_from_layer=None,
                              **{k: (v if k in _USES[method] else None) for k, v in given.items()})
    return spec_from_args(args, config)


def spec_settings(spec: AttentionSpec) -> dict:
    """The spec as a JSON-serialisable dict (for result files)."""
    out = dataclasses.asdict(spec)
    out["describe"] = spec.describe()
    return out


# ----- command lines ----------------------------------------------------------------------------


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit code when argparse exits (it has printed the
    usage and ``error: ...`` on stderr, or the help), so that ``main(argv)`` returns a code."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def save_result(record: dict, out: str | os.PathLike, draw: Callable[[dict, Path], object] | None = None,
                plot_path: str | os.PathLike | None = None) -> None:
    """Write `record` as JSON at `out`, draw it with ``draw(record, plot_path)`` when both are given,
    and print where they went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    where = [str(out)]
    if draw is not None and plot_path is not None:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        draw(record, Path(plot_path))
        where.append(str(plot_path))
    print(f"wrote {' and '.join(where)}")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """A CLI's ``main``: parse, then ``run(args)``; bad input (OSError, ValueError, ImportError)
    prints ``error: ...`` on stderr and returns 1."""
    args = parse_cli(parser, argv)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except (OSError, ValueError, ImportError) as e:  # bad input: the message says what and where
        print(f"error: {e}", file=sys.stderr)
        return 1
