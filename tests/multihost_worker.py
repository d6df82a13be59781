"""One of the processes of `tests/test_multihost.py`: ``python tests/multihost_worker.py PORT ID``
joins the two-process run (`jax.distributed.initialize` on localhost) and prints ``RESULT {json}``:
the logits of each sharded forward, gathered from every process, and whether the compiled
program moves halos (collective-permute). The settings below are shared with the test."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax import LMInfinite
from lminf_jax import AttentionCall

HF = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
      "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4}
CALL = AttentionCall(LMInfinite(3, 12), block_q=8, block_k=8)
MESHES = {"data2-model2": dict(data=2, model=2), "seq4": dict(seq=4)}


def inputs(family, config):
    """The parameters and tokens every process and the reference use (seeded)."""
    params = family.init_params(config, jax.random.key(1))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    return params, rng.integers(0, HF["vocab_size"], (2, 50)).astype(np.int32)  # 50: no multiple of 4



def main(port: str, process_id: int) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from flax import traverse_util
    from jax.experimental import multihost_utils

    from lminf_jax.sharding import ShardingPlan, make_mesh
    from lminf_jax.models import registry

    family = registry.family_for_config(HF)
    config = family.config_from_hf(HF)
    params, tokens = inputs(family, config)
    out = {"process": jax.process_index(), "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    for name, sizes in MESHES.items():
        plan = ShardingPlan(make_mesh(**sizes))
        shardings = traverse_util.unflatten_dict(family.param_shardings(config, plan), sep=".")
        placed = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
                              params, shardings)
        forward = jax.jit(family.model(config, CALL, jnp.float32, plan).forward)
        hlo = forward.lower(placed, jnp.asarray(tokens)).compile().as_text()
        logits = multihost_utils.process_allgather(forward(placed, jnp.asarray(tokens)), tiled=True)
        out[name] = {"logits": np.asarray(logits).tolist(), "collective_permute": "collective-permute" in hlo}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
