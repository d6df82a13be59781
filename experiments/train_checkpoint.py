"""What lets ``python -m experiments.train`` stop anywhere and resume bit for bit: the run's identity
(`run_identity`), its checkpoints (`Checkpoints`) and its loss log cut back to the resumed step (`truncate_log`).

* Checkpoints: orbax, in ``OUT/checkpoints/STEP`` (the last two kept): ``state`` (params and optimiser
  state, their leaves in tree order), ``meta`` (step, seed, tokens seen, last loss and ``identity``) and
  ``checksum`` (a `lminf_jax.evaluation.fingerprint.json_digest` of meta, a ``tree_fingerprint`` of
  state). A resume takes the newest checkpoint that reads back intact, removing a damaged newer one
  with a warning (`lminf_jax.evaluation.resume.newest_intact`), and refuses one of another run, naming
  each field of the identity that differs (`lminf_jax.evaluation.resume.check_identity`).
* ``loss.jsonl`` is rewritten atomically (`lminf_jax.evaluation.resume.write_atomic`) with the lines
  logged up to the resumed step, so a resumed run logs every later step once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lminf_jax.evaluation.resume import check_identity, newest_intact, write_atomic


def run_identity(settings: dict, config: dict, streams: Sequence[np.ndarray], tokenizer: Path, params) -> dict:
    """Everything that determines the trained params: the `settings`, the model config, the token
    streams and the `tokenizer` file (sha256 of their contents) and the initial params' fingerprint."""
    from lminf_jax.evaluation.fingerprint import tree_fingerprint

    h = hashlib.sha256()
    for stream in streams:
        h.update(f"{stream.dtype.str}{list(stream.shape)}".encode())
        h.update(np.ascontiguousarray(stream))
    h.update(tokenizer.read_bytes() if tokenizer.is_file() else b"")
    identity = {**settings, "config": config, "data": "sha256:" + h.hexdigest(),
                "initial params": tree_fingerprint(params)}
    return json.loads(json.dumps(identity))  # the form it takes after a JSON round trip


def _state(params, opt_state) -> dict:
    import jax

    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves((params, opt_state)))}


class Checkpoints:
    """The checkpoints of a training run in `directory` (created when missing; the last two kept)."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        """Save the state after `step` with its `meta` and their checksums, and wait until it is written."""
        import orbax.checkpoint as ocp

        from lminf_jax.evaluation.fingerprint import json_digest, tree_fingerprint

        state = _state(params, opt_state)
        checksum = {"json": json_digest(meta), "arrays": tree_fingerprint(state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), checksum=ocp.args.JsonSave(checksum)),
            force=True)
        self.manager.wait_until_finished()

    def restore(self, identity: dict, params, opt_state) -> tuple[Any, Any, dict] | None:
        """``(params, opt_state, meta)`` of the newest intact checkpoint of the run `identity` names (`params`
        and `opt_state` give the structure), or None when there is none; a `Mismatch` when it is another run's."""
        found = newest_intact(sorted(self.manager.all_steps(), reverse=True),
                              lambda step: self._read(step, identity, params, opt_state), self.manager.delete,
                              name=lambda step: str(self.directory / str(step)))
        return None if found is None else found[1]

    def _read(self, step: int, identity: dict, params, opt_state) -> tuple[Any, Any, dict]:
        """The checkpoint of `step`, verified: its checksums, and its identity against `identity`."""
        import jax
        import jax.numpy as jnp
        import orbax.checkpoint as ocp

        from lminf_jax.evaluation.fingerprint import json_digest, tree_fingerprint

        got = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                                                                 checksum=ocp.args.JsonRestore()))
        meta, checksum = got["meta"], got["checksum"]
        if json_digest(meta) != checksum["json"]:
            raise ValueError("its meta does not match its checksum")
        check_identity(meta.get("identity"), identity, f"checkpoint {self.directory / str(step)}")
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _state(params, opt_state).items()}
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        if tree_fingerprint(dict(state)) != checksum["arrays"]:
            raise ValueError("its params / optimiser state do not match their checksum")
        treedef = jax.tree.structure((params, opt_state))
        return (*jax.tree.unflatten(treedef, [jnp.asarray(state[k]) for k in sorted(state)]), meta)

    def close(self) -> None:
        """Let orbax finish and release the manager."""
        self.manager.close()


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``path`` logged at or before ``step`` (a resumed run logs the later
    steps again), dropping a line cut short by a kill and a final evaluation."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= step and not row.get("final"):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))
