"""A Hugging Face checkpoint -> a `models` params pytree of jax arrays (`load_params`), or
parameter files written one checkpoint tensor at a time (`write_params`, the converter's)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from lminf_jax.converters.dtypes import dtype_kind, numpy_dtype
from lminf_jax.converters.layout import CheckpointLayout, check_layer_count
from lminf_jax.converters.placement import aligned_empty, check_shardings, loaded_dtype, place
from lminf_jax.converters.reader import CheckpointReader
from lminf_jax.converters.safetensors_file import TensorWriter
from lminf_jax.progress import Progress

#: How many items of each kind of problem a checkpoint error lists before it counts the rest.
LISTED = 10


def plan_params(reader: CheckpointReader, layout: CheckpointLayout) -> dict[str, list[str]]:
    """Flat parameter name -> the checkpoint tensors that fill it (one per layer if stacked).

    Reads no tensor data. First refuses a layout of another number of layers than the checkpoint
    holds (`converters.layout.check_layer_count`), so that nothing is listed per layer of an absurd
    config; then raises one ValueError counting every missing, unexpected, duplicated,
    mis-shaped and unsupported-dtype tensor, and every tensor whose dtype is of the wrong kind
    for its parameter (float, integer or bool: e.g. a float weight relabelled I32, whose bits
    would otherwise be converted as integers), and listing the first `LISTED` of each kind.
    """
    check_layer_count(layout.layers_field, layout.num_layers, layout.layers_held(reader.names()),
                      f"checkpoint {reader.path}", f"tensors named '{layout.layer_prefix}<i>.*'")
    sources: dict[str, dict[int | None, str]] = {name: {} for name in layout.template}
    unexpected, duplicated, misshaped, bad_dtype, wrong_kind = [], [], [], [], []
    for name in reader.names():
        located = layout.locate(name)
        if located is None:
            continue
        flat, layer = located
        spec = layout.template.get(flat)
        if (
            spec is None
            or (layer is None and layout.is_stacked(flat))
            or (layer is not None and layer >= layout.num_layers)
        ):
            unexpected.append(name)
            continue
        expected = tuple(spec.shape[1:] if layer is not None else spec.shape)
        if layer in sources[flat]:
            row = "" if layer is None else f"[{layer}]"
            duplicated.append(f"{name} and {sources[flat][layer]} both fill {flat}{row}")
        sources[flat].setdefault(layer, name)
        if reader.shape(name) != expected:
            misshaped.append(f"{name}: expected {expected}, got {reader.shape(name)}")
        try:
            stored = dtype_kind(numpy_dtype(reader.dtype(name), name))
        except ValueError as e:
            bad_dtype.append(str(e))
            continue
        if stored != dtype_kind(spec.dtype):
            wrong_kind.append(f"{name}: {reader.dtype(name)} data for {dtype_kind(spec.dtype)} parameter {flat}")
    missing = []
    for flat, found in sources.items():
        wanted = range(layout.num_layers) if layout.is_stacked(flat) else [None]
        missing += [flat if i is None else layout.layer_name(flat, i) for i in wanted if i not in found]
    raise_problems(f"checkpoint {reader.path} does not match the layout:", {
        "missing": missing,
        "unexpected": unexpected,
        "duplicated": duplicated,
        "mis-shaped": misshaped,
        "unsupported dtype": bad_dtype,
        "wrong kind of dtype": wrong_kind,
    })
    return {flat: [found[i] for i in sorted(found)] for flat, found in sources.items()}


def raise_problems(header: str, problems: Mapping[str, Sequence[str]]) -> None:
    """One ValueError of ``header`` and each kind of problem found, with its count and first `LISTED`
    items; nothing when there are none."""
    if not any(problems.values()):
        return
    lines = [header]
    for kind, items in problems.items():
        if items:
            lines.append(f"  {kind} ({len(items):,}):")
            lines += [f"    {item}" for item in items[:LISTED]]
            lines += [f"    ... and {len(items) - LISTED:,} more"] if len(items) > LISTED else []
    raise ValueError("\n".join(lines))


def load_params(
    source: CheckpointReader | str | os.PathLike,
    layout: CheckpointLayout,
    *,
    dtype: jax.typing.DTypeLike | None = None,
    progress: bool = True,
    shardings: Mapping[str, jax.sharding.Sharding] | None = None,
) -> dict:
    """Nested params of jax arrays from a checkpoint directory or reader.

    Validates the whole checkpoint against `layout` (see `plan_params`), and `shardings`
    when given, before reading. Each parameter is assembled, one checkpoint tensor at a
    time, in one host buffer of its final dtype (`dtype` for floating-point parameters when
    given, else the stored one), placed and its buffer dropped before the next, so the host
    never holds two copies of the model (on CPU, jax adopts the buffer without copying it).
    A fused checkpoint tensor (`CheckpointLayout.splits`) is split into its parameters on the host.
    `shardings` (flat name of every parameter, `CheckpointLayout.param_names`, -> sharding) places each device's
    shard straight from the buffer, so no device holds a whole sharded parameter (each
    process fills its addressable shards); without it, params go to the default device.
    `progress` reports tensors, MB read and MB/s on stderr.
    """
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    if shardings is not None:
        check_shardings(layout.param_names, shardings, f"the layout of {reader.path}")
    plan = plan_params(reader, layout)
    flat = {}
    with Progress(sum(map(len, plan.values())), "tensors", "converting", enabled=progress) as bar:
        for name, sources in plan.items():
            stacked = layout.is_stacked(name)
            host = _assemble(reader, sources, stacked, dtype, bar)
            parts = layout.splits[name](host, stacked) if name in layout.splits else {name: host}
            del host
            for part, array in parts.items():
                flat[part] = place(array, None if shardings is None else shardings[part])
            del parts
            # Where jax copies from the host buffer (accelerators), it lets go of the buffer in
            # a gc callback: run it now, or several parameters' buffers can pile up.
            gc.collect(0)
    return traverse_util.unflatten_dict(flat, sep=".")


def _assemble(reader: CheckpointReader, sources: list[str], stacked: bool, dtype: jax.typing.DTypeLike | None,
              bar: Progress) -> np.ndarray:
    """One template entry in a host buffer of its final dtype, read one checkpoint tensor at a time."""
    first = sources[0]
    shape = (len(sources), *reader.shape(first)) if stacked else reader.shape(first)
    host = aligned_empty(shape, loaded_dtype(numpy_dtype(reader.dtype(first), first), dtype))
    for row, name in zip(host if stacked else [host], sources, strict=True):
        source = reader.read(name)
        row[...] = source  # casts when `dtype` applies, rounding to nearest even as XLA does
        bar.update(1, nbytes=source.nbytes)
    return host


#: Opens the file of one parameter: (flat name, shape, dtype) -> its writer.
OpenParam = Callable[[str, tuple[int, ...], np.dtype], TensorWriter]


def write_params(
    source: CheckpointReader | str | os.PathLike,
    layout: CheckpointLayout,
    open_param: OpenParam,
    *,
    dtype: jax.typing.DTypeLike | None = None,
    progress: bool = True,
) -> None:
    """Write the parameters of a checkpoint through `open_param`, as `load_params` would load them.

    Validates the whole checkpoint first (`plan_params`). Then each checkpoint tensor in turn is read
    (memory-mapped), cast (`dtype` for floating-point parameters when given), split if fused
    (`CheckpointLayout.splits`) and appended to its parameters' files, a stacked parameter's row by
    row, before the next is read: the host holds one checkpoint tensor (and its cast) at a time,
    never a whole parameter. `progress` reports tensors, MB read and MB/s on stderr.
    """
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    plan = plan_params(reader, layout)
    with Progress(sum(map(len, plan.values())), "tensors", "converting", enabled=progress) as bar:
        for name, sources in plan.items():
            stacked = layout.is_stacked(name)
            with contextlib.ExitStack() as files:
                writers: dict[str, TensorWriter] = {}
                for tensor in sources:
                    stored = reader.read(tensor)
                    row = stored.astype(loaded_dtype(stored.dtype, dtype), copy=False)
                    parts = layout.splits[name](row, False) if name in layout.splits else {name: row}
                    for part, piece in parts.items():
                        if part not in writers:
                            shape = (len(sources), *piece.shape) if stacked else piece.shape
                            writers[part] = files.enter_context(open_param(part, shape, piece.dtype))
                        writers[part].write(piece)
                    bar.update(1, nbytes=stored.nbytes)
