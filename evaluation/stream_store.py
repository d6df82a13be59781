"""The checkpoint store of `lminf_jax.evaluation.streaming.streaming_nll`: its state every few chunks, orbax, the
two newest kept, resumed bit for bit by the same run and refused to any other.

Layout::

    checkpoint_dir/state-000000000120/    the state after 120 chunks (orbax composite):
        cache/     the cache leaves (StandardSave of {"leaf_00000": ..., ...}, in tree order)
        meta/      JSON, what the run is (`metadata`): format, version, chunk, streams, length, buckets, cache
                   signature (tree paths, dtypes, shapes), model: the params' `tree_fingerprint`
                   and the caller's ``identity`` (config, attention spec, compute dtype...)
        stats/     JSON: chunks and positions done, float64 sums (exact), counts, and stream: a
                   sha256 over the token windows read so far (all of the stream scored so far)
        checksum/  JSON: `json_digest` of meta + stats, `tree_fingerprint` of the cache leaves
    checkpoint_dir/tmp-000000000140-PID/  a save in progress (orbax writes it as
                                          tmp-000000000140-PID.orbax-checkpoint-tmp/ first)

A save writes ``tmp-*`` completely, renames it to ``state-*`` (atomic), then deletes all but the
two newest states and every ``tmp-*`` of the store (debris of saves killed half way). On start the
newest state that reads back intact (both checksums verified) is resumed; a damaged newer one is
removed with a warning on stderr (`lminf_jax.evaluation.resume.newest_intact`).

What the store deletes is only ever its own (`CHECKPOINTS`, a `lminf_jax.evaluation.resume.OwnFolder`): an
entry of ``checkpoint_dir`` is the store's when its name is ``state-<12 digits>`` or ``tmp-<12 digits>-<pid>``
(optionally followed by orbax's ``.orbax-checkpoint-tmp...``) and it is a directory (not a link) holding
nothing but what the store writes there (the items cache, meta, stats, checksum, orbax's _CHECKPOINT_METADATA
and commit_success.txt, and orbax's ``.orbax-checkpoint-tmp`` forms of the items). Every other name
(``tmp-mydata``, ``state-foo``...) is not the store's business and is never touched; an entry with one of the
store's names that is not its own (a file, a link, a folder holding anything else) is refused with an error
naming it, before any chunk runs (`check_checkpoint_dir`). A state of another run is refused with a `Mismatch`
naming each field that differs, including the stream: the prefix the state scored is re-read and re-hashed on
resume (the host hashes about 1 GB/s), so the state stays constant-size whatever the number of chunks
(per-chunk hashes would grow with it), and a change anywhere in that prefix is caught. One run per directory
at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lminf_jax.evaluation.buckets import PositionBuckets
from lminf_jax.evaluation.fingerprint import json_digest, tree_fingerprint
from lminf_jax.evaluation.resume import PARAMS, OwnFolder, check_identity, newest_intact

__all__ = ["CHECKPOINTS", "StreamStore", "check_checkpoint_dir", "metadata"]

STATE_FORMAT = "lminf_jax-streaming-nll"
STATE_VERSION = 2

_STATE = re.compile(r"state-(\d{12})")
_TMP = re.compile(r"tmp-\d{12}-\d+(\.orbax-checkpoint-tmp.*)?")
#: The store's entries of a checkpoint_dir: states and saves in progress, holding only what the store (through
#: orbax) writes in a state: its items (orbax's unfinished forms too) and orbax's files.
CHECKPOINTS = OwnFolder("checkpoint_dir", "checkpoint store", re.compile(f"{_STATE.pattern}|{_TMP.pattern}"),
                        re.compile(r"(cache|meta|stats|checksum)(\.orbax-checkpoint-tmp.*)?"
                                   r"|_CHECKPOINT_METADATA|commit_success\.txt"))


def check_checkpoint_dir(directory: str | os.PathLike) -> list[Path]:
    """The store's entries in `directory` (none if it does not exist): those named like a state
    or a save in progress, each checked to be the store's own (see the module docstring).

    Raises ValueError naming an entry that has one of the store's names but is not its own.
    """
    return CHECKPOINTS.entries(directory)


def metadata(shape: tuple[int, int], chunk: int, buckets: PositionBuckets, cache, params,
             identity: Mapping[str, Any]) -> dict:
    """What a run of `streaming_nll` over streams of ``shape (B, N)`` is, as a state records it (module
    docstring): its settings, the cache's signature and, under ``model``, the params' fingerprint and the
    caller's ``identity``."""
    signature = [f"{jax.tree_util.keystr(path)}: {jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
                 for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]]
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "chunk": chunk,
        "streams": int(shape[0]),
        "length": int(shape[1]),
        "buckets": buckets.to_json(),
        "cache": signature,
        "model": {PARAMS: tree_fingerprint(params), **identity},
    }
    try:
        return json.loads(json.dumps(meta))  # the form it takes after a JSON round trip
    except TypeError as e:
        raise ValueError(f"identity must hold JSON values: {e}") from None


class StreamStore:
    """Save/restore the two newest states of a run in a directory (layout in the module docstring).

    ``meta``: the run's `metadata`; ``leaves``: its cache's leaves (shapes, dtypes, shardings to restore);
    ``prefix_hash(chunks)``: the sha256 (a hashlib object) of the stream's windows of chunks ``0..chunks-1``,
    read again, to check a state against the stream it scored. The statistics a state holds are the caller's
    JSON record (with ``chunks`` and ``positions``)."""

    def __init__(self, directory: Path, meta: dict, leaves: list, prefix_hash: Callable[[int], Any]):
        import orbax.checkpoint as ocp  # only checkpointing runs need orbax

        self.ocp, self.directory, self.meta, self.prefix_hash = ocp, directory.absolute(), meta, prefix_hash
        self.names = [f"leaf_{i:05d}" for i in range(len(leaves))]
        self.template = {
            name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
            for name, leaf in zip(self.names, leaves)
        }
        largest = max((leaf.size * leaf.dtype.itemsize for leaf in leaves), default=0)
        gb = max(96, math.ceil(largest / 1e9) + 1)  # orbax rejects an array larger than the limit
        self.checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            cache=ocp.StandardCheckpointHandler(save_concurrent_gb=gb, restore_concurrent_gb=gb),
            meta=ocp.JsonCheckpointHandler(), stats=ocp.JsonCheckpointHandler(),
            checksum=ocp.JsonCheckpointHandler(),
        ))
        self.directory.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.checkpointer.close()

    def states(self) -> list[Path]:
        """The ``state-*`` directories, newest first (each checked to be the store's own)."""
        states = [(int(m.group(1)), p) for p in check_checkpoint_dir(self.directory) if (m := _STATE.fullmatch(p.name))]
        return [p for _, p in sorted(states, reverse=True)]

    def restore(self, treedef) -> tuple[dict, Any, Any] | None:
        """``(stats, cache, prefix hash)`` of the newest intact state, or None when there is none."""
        found = newest_intact(self.states(), self._read, CHECKPOINTS.discard)
        if found is None:
            return None
        stats, leaves, prefix = found[1]
        return stats, jax.tree.unflatten(treedef, leaves), prefix

    def _read(self, path: Path) -> tuple[dict, list, Any]:
        """One state, verified: raises a `Mismatch` for another run's, anything else if damaged."""
        args = self.ocp.args
        where = f"checkpoint {path}"
        meta = self.checkpointer.restore(path, args=args.Composite(meta=args.JsonRestore()))["meta"]
        check_identity({k: meta.get(k) for k in ("format", "version")},  # other formats lack the items below
                       {k: self.meta[k] for k in ("format", "version")}, where)
        got = self.checkpointer.restore(path, args=args.Composite(stats=args.JsonRestore(),
                                                                  checksum=args.JsonRestore()))
        stats, checksum = got["stats"], got["checksum"]
        if json_digest({"meta": meta, "stats": stats}) != checksum["json"]:
            raise ValueError("meta/stats do not match their checksum")
        check_identity(meta, self.meta, where)
        prefix = self.prefix_hash(stats["chunks"])
        field = f"stream (its first {stats['positions'] + 1} tokens)"
        check_identity({field: stats["stream"]}, {field: "sha256:" + prefix.hexdigest()}, where)
        leaves = {}
        if self.names:
            restored = self.checkpointer.restore(path, args=args.Composite(cache=args.StandardRestore(self.template)))
            leaves = dict(restored["cache"])
        if tree_fingerprint(leaves) != checksum["arrays"]:
            raise ValueError("the cache does not match its checksum")
        return stats, [leaves[name] for name in self.names], prefix

    def save(self, stats: dict, prefix: Any, cache) -> None:
        """Save the state after ``stats["chunks"]`` chunks: the caller's `stats` record, the sha256 `prefix` of
        the windows read and the `cache`; then drop all but the two newest states and every save in progress."""
        final = self.directory / f"state-{stats['chunks']:012d}"
        if final.exists():  # resumed here and nothing new (a deterministic run rewrites the same)
            return
        tmp = self.directory / f"tmp-{stats['chunks']:012d}-{os.getpid()}"
        if tmp.exists():
            CHECKPOINTS.discard(tmp)
        stats_json = {**stats, "stream": "sha256:" + prefix.hexdigest()}
        leaves = dict(zip(self.names, jax.tree.leaves(cache)))
        checksum = {"json": json_digest({"meta": self.meta, "stats": stats_json}), "arrays": tree_fingerprint(leaves)}
        args = self.ocp.args
        items = {"meta": args.JsonSave(self.meta), "stats": args.JsonSave(stats_json),
                 "checksum": args.JsonSave(checksum)}
        if self.names:
            items["cache"] = args.StandardSave(leaves)
        self.checkpointer.save(tmp, args=args.Composite(**items))
        os.rename(tmp, final)  # atomic: `final` appears complete or not at all
        for p in self.states()[2:]:  # keep the two newest states
            CHECKPOINTS.discard(p)
        for p in check_checkpoint_dir(self.directory):
            if _TMP.fullmatch(p.name):
                CHECKPOINTS.discard(p)
