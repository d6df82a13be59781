"""Converted checkpoints on disk: orbax params plus a JSON file (config, family, versions).

Layout of a converted directory::

    OUT_DIR/params/          orbax (StandardCheckpointHandler) tree of the params
    OUT_DIR/converted.json   format marker, library version, family, HF config, param manifest
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util

from converters.placement import check_shardings
from converters.reader import read_json_object

FORMAT = "lminf_jax-converted"
FORMAT_VERSION = 1
META_FILE = "converted.json"
PARAMS_DIR = "params"


def _library_version() -> str:
    try:
        return importlib.metadata.version("lminf_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _checkpointer(largest_bytes: int) -> ocp.Checkpointer:
    """A synchronous orbax checkpointer that moves about one parameter at a time, so saving or
    restoring needs little host memory beyond the params themselves."""
    gb = (largest_bytes + 2**20) / 1e9  # orbax rejects an array larger than the limit
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=gb, restore_concurrent_gb=gb))


def save_converted(out_dir: str | os.PathLike, params: dict, config: dict, family: str) -> Path:
    """Write `params` (nested dict of arrays), the HF `config` dict and `family` to `out_dir`.

    Refuses (FileExistsError) a directory that already holds a converted checkpoint.
    Returns the absolute output path.
    """
    out = Path(out_dir).absolute()
    if (out / META_FILE).exists() or (out / PARAMS_DIR).exists():
        raise FileExistsError(f"{out} already holds a converted checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        name: {"shape": list(array.shape), "dtype": jnp.dtype(array.dtype).name}
        for name, array in traverse_util.flatten_dict(params, sep=".").items()
    }
    largest = max((math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)), default=0)
    with _checkpointer(largest) as checkpointer:
        checkpointer.save(out / PARAMS_DIR, args=ocp.args.StandardSave(params))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "family": family,
        "config": config,
        "params": manifest,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


@contextlib.contextmanager
def staged_output(
    out_dir: str | os.PathLike, *, overwrite: bool = False, source: str | os.PathLike | None = None
) -> Iterator[Path]:
    """A new empty directory beside `out_dir` to write into, renamed to `out_dir` when the block
    completes and deleted if it raises: `out_dir` never holds a half-written mix, and a failed
    write leaves it as it was.

    Before the block runs, refuses an `out_dir` that is not a directory, that is `source` (the
    input), holds it or lies inside it, or that is not empty unless it is a converted checkpoint (its
    converted.json has this project's format) and `overwrite` is set (it is then replaced whole).
    """
    out = Path(out_dir).absolute()
    _check_output_dir(out, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out, "partial")
    staging.mkdir()  # not tempfile.mkdtemp, which would make it, and so OUT_DIR, private (0700)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the error that got here is the one to report
        raise
    _replace(out, staging)


def _check_output_dir(out: Path, overwrite: bool, source: str | os.PathLike | None) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if source is not None and out.resolve() in (Path(source).resolve(), *Path(source).resolve().parents):
        raise ValueError(f"{out} is the checkpoint directory or holds it: choose another output directory")
    if source is not None and Path(source).resolve() in out.resolve().parents:
        raise ValueError(f"{out} lies inside the checkpoint directory {source}: choose an output directory outside it")
    if not (out.is_dir() and any(out.iterdir())):
        return
    try:
        _read_meta(out)
    except ValueError as e:
        raise FileExistsError(f"{e}, and it is not empty: --overwrite replaces only a converted checkpoint; choose "
                              "another output directory") from None
    if not overwrite:
        raise FileExistsError(f"{out} is not empty: pass --overwrite to replace it")


def _replace(out: Path, staging: Path) -> None:
    """Rename `staging` to `out`; what `out` held is deleted only once the new one is in place."""
    if not out.exists():
        staging.rename(out)
        return
    aside = _sibling(out, "old")
    out.rename(aside)
    try:
        staging.rename(out)
    except OSError:
        aside.rename(out)
        raise
    shutil.rmtree(aside)


def _sibling(out: Path, role: str) -> Path:
    """A hidden, unused name beside `out`."""
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.{role}")


def _read_meta(out: Path) -> dict:
    """The converted.json of `out`; ValueError "OUT is not a converted checkpoint (what it lacks)"
    unless it is a JSON object with this project's format."""
    meta_path = out / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{out} is not a converted checkpoint ({META_FILE} is missing)")
    try:
        meta = read_json_object(meta_path)
    except ValueError as e:
        raise ValueError(f"{out} is not a converted checkpoint ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out} is not a converted checkpoint ({meta_path} has no format {FORMAT!r})")
    return meta


def load_converted(
    out_dir: str | os.PathLike, *, shardings: Mapping[str, jax.sharding.Sharding] | None = None
) -> tuple[dict, dict, str]:
    """(params, HF config dict, family name) from `save_converted`'s output.

    `shardings` (flat name of every parameter in the manifest -> sharding): orbax restores
    each parameter straight into its shards; without it, params go to the default device.
    """
    out = Path(out_dir).absolute()
    meta = _read_meta(out)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out}: unsupported converted format version {meta.get('format_version')!r}")
    if shardings is None:
        shardings = dict.fromkeys(meta["params"], jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
        check_shardings(meta["params"], shardings, str(out))
    target = {
        name: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=shardings[name])
        for name, spec in meta["params"].items()
    }
    largest = max((math.prod(t.shape) * t.dtype.itemsize for t in target.values()), default=0)
    with _checkpointer(largest) as checkpointer:
        params = checkpointer.restore(
            out / PARAMS_DIR, args=ocp.args.StandardRestore(traverse_util.unflatten_dict(target, sep="."))
        )
    return params, meta["config"], meta["family"]
