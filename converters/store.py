"""Converted checkpoints on disk: one safetensors file per parameter plus a JSON file (config,
family, versions).

Layout of a converted directory (format version 2)::

    OUT_DIR/params/NAME.safetensors   parameter NAME (its flat name, e.g. model.layers.mlp.up_proj.weight)
                                      as the file's one tensor, its data 64-byte aligned
    OUT_DIR/converted.json            format marker, version, library version, family, HF config, param manifest

`load_converted` maps each file and places it, one parameter at a time: on CPU the parameter is the
mapping itself (jax adopts it without a copy; its pages are read when first used, and shared by every
process that loads the directory); elsewhere each device's shard is copied from it. So a converted
directory is never changed in place while something may have it loaded: `staged_output` writes a new
one beside it and renames it.

Format version 1 (earlier converters, `experiments/shipped/`) held the params as an orbax tree in
OUT_DIR/params/. `load_converted` still reads it, restored by orbax at about 1.5 times the params'
bytes of host memory; to rewrite one as version 2 (then copy its other files, e.g. the tokenizer)::

    python -c "import sys, converters.store as s; s.save_converted(sys.argv[2], *s.load_converted(sys.argv[1]))" OLD NEW
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lminf_jax.converters.dtypes import NUMPY_DTYPES
from lminf_jax.converters.placement import ALIGNMENT, aligned_empty, check_shardings, loaded_dtype, place
from lminf_jax.converters.reader import read_json_object
from lminf_jax.converters.safetensors_file import SafetensorsFile, TensorWriter

FORMAT = "lminf_jax-converted"
FORMAT_VERSION = 2
META_FILE = "converted.json"
PARAMS_DIR = "params"
#: What a parameter's name may be, as it names its file.
_NAME = re.compile(r"\w[\w.-]*")


def _library_version() -> str:
    try:
        return importlib.metadata.version("lminf_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


class ConvertedWriter:
    """Writes the converted directory `out` (which must exist), one parameter at a time: `param` opens
    the file of one, `finish` writes converted.json with the manifest of those written."""

    def __init__(self, out: Path):
        self.out = out
        self.manifest: dict[str, dict] = {}
        (out / PARAMS_DIR).mkdir()

    def param(self, name: str, shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> TensorWriter:
        """The writer of parameter `name` (flat name), a context manager."""
        self.manifest[name] = {"shape": list(shape), "dtype": np.dtype(dtype).name}
        return TensorWriter(_param_path(self.out, name), name, shape, dtype, ALIGNMENT)

    def finish(self, config: dict, family: str) -> None:
        """Write converted.json: the HF `config` dict, `family` and the manifest."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": _library_version(),
            "family": family,
            "config": config,
            "params": self.manifest,
        }
        (self.out / META_FILE).write_text(json.dumps(meta, indent=1))


def save_converted(out_dir: str | os.PathLike, params: dict, config: dict, family: str) -> Path:
    """Write `params` (nested dict of arrays), the HF `config` dict and `family` to `out_dir`, one
    parameter at a time (each reaches the host whole, in turn).

    Refuses (FileExistsError) a directory that already holds a converted checkpoint.
    Returns the absolute output path.
    """
    out = Path(out_dir).absolute()
    if (out / META_FILE).exists() or (out / PARAMS_DIR).exists():
        raise FileExistsError(f"{out} already holds a converted checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    writer = ConvertedWriter(out)
    for name, array in traverse_util.flatten_dict(params, sep=".").items():
        host = np.asarray(array)
        with writer.param(name, host.shape, host.dtype) as file:
            file.write(host)
    writer.finish(config, family)
    return out


def _param_path(out: Path, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{out}: parameter name {name!r} cannot name a file (letters, digits, _ . - only)")
    return out / PARAMS_DIR / f"{name}.safetensors"


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
    out_dir: str | os.PathLike,
    *,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    dtype: jax.typing.DTypeLike | None = None,
) -> tuple[dict, dict, str]:
    """(params, HF config dict, family name) from `save_converted`'s or the converter's output.

    Every parameter file is checked (present, a valid safetensors file holding the manifest's tensor)
    before any is loaded. `dtype` casts the floating-point parameters (each in turn, on the host).
    `shardings` (flat name of every parameter in the manifest -> sharding) places each device's
    shard straight from the file; without it, params go to the default device.
    """
    out = Path(out_dir).absolute()
    meta = _read_meta(out)
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{out}: unsupported converted format version {version!r}")
    manifest = _manifest(meta, out / META_FILE)
    if shardings is not None:
        check_shardings(manifest, shardings, str(out))
    load = _load_orbax if version == 1 else _load_files
    return traverse_util.unflatten_dict(load(out, manifest, shardings, dtype), sep="."), meta["config"], meta["family"]


def read_manifest(out_dir: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """The params manifest of a converted directory (flat name -> shape and dtype), read without any
    parameter: what `converters.families.check_manifest` compares with the config."""
    out = Path(out_dir).absolute()
    return _manifest(_read_meta(out), out / META_FILE)


def _manifest(meta: dict, where: Path) -> dict[str, jax.ShapeDtypeStruct]:
    """The params manifest of converted.json (`where`): flat name -> shape and dtype."""
    manifest = meta.get("params")
    try:
        specs = {name: (spec["shape"], jnp.dtype(spec["dtype"])) for name, spec in manifest.items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{where} holds no valid params manifest (name -> shape and dtype): {e!r}") from None
    for name, (shape, _) in specs.items():
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in shape)):
            raise ValueError(f"{where}: the params manifest's shape of {name} must be a list of sizes, got {shape!r}")
    return {name: jax.ShapeDtypeStruct(tuple(shape), dtype) for name, (shape, dtype) in specs.items()}


def _load_files(out: Path, manifest: Mapping[str, jax.ShapeDtypeStruct],
                shardings: Mapping[str, jax.sharding.Sharding] | None,
                dtype: jax.typing.DTypeLike | None) -> dict[str, jax.Array]:
    """Format version 2: each parameter mapped from its file and placed before the next (cast into a host
    buffer first when `dtype` applies), so at most one parameter is on the host twice."""
    files = {name: _param_file(out, name, spec) for name, spec in manifest.items()}
    flat = {}
    for name, file in files.items():
        host = source = file.read(name)
        if loaded_dtype(source.dtype, dtype) != source.dtype:
            host = aligned_empty(source.shape, loaded_dtype(source.dtype, dtype))
            host[...] = source
        flat[name] = place(host, None if shardings is None else shardings[name])
        del source, host
        gc.collect(0)  # as in `load_params`: let jax drop a copied host buffer now
    return flat


def _param_file(out: Path, name: str, spec: jax.ShapeDtypeStruct) -> SafetensorsFile:
    """The validated file of parameter `name`: a ValueError naming it unless it holds just that tensor,
    of the manifest's shape and dtype."""
    path = _param_path(out, name)
    if not path.is_file():
        raise ValueError(f"{path} is missing: {out / META_FILE} lists parameter {name}")
    file = SafetensorsFile(path)
    if {n: (NUMPY_DTYPES.get(i.dtype), i.shape) for n, i in file.tensors.items()} != {name: (spec.dtype, spec.shape)}:
        held = "; ".join(f"{n!r} {i.dtype} {list(i.shape)}" for n, i in file.tensors.items()) or "nothing"
        raise ValueError(f"{path} should hold just tensor {name!r}, {spec.dtype.name} {list(spec.shape)} as "
                         f"{META_FILE} lists, but holds {held}")
    return file


def _load_orbax(out: Path, manifest: Mapping[str, jax.ShapeDtypeStruct],
                shardings: Mapping[str, jax.sharding.Sharding] | None,
                dtype: jax.typing.DTypeLike | None) -> dict[str, jax.Array]:
    """Format version 1: orbax restores each parameter (cast to `dtype` where it applies) into its sharding."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {name: jax.ShapeDtypeStruct(spec.shape, loaded_dtype(spec.dtype, dtype),
                                         sharding=device if shardings is None else shardings[name])
              for name, spec in manifest.items()}
    largest = max((math.prod(t.shape) * t.dtype.itemsize for t in target.values()), default=0)
    gb = (largest + 2**20) / 1e9  # orbax moves about one parameter at a time; it rejects an array beyond the limit
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(restore_concurrent_gb=gb)) as checkpointer:
        params = checkpointer.restore(
            out / PARAMS_DIR, args=ocp.args.StandardRestore(traverse_util.unflatten_dict(target, sep="."))
        )
    return traverse_util.flatten_dict(params, sep=".")
