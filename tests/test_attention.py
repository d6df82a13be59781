"""The entry point: input validation, dispatch, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_qkv, rel_err

from lminf_jax import Alibi, AttentionSpec, Rotary, TopK, attention

Q, K, V = random_qkv(0, 2, 8, 8, 4, 2, 16)
POS = np.arange(8, dtype=np.int32)


def _call(**overrides):
    kw = dict(q_positions=POS, k_positions=POS, spec=AttentionSpec.lm_infinite(2, 4))
    args = [overrides.pop(n, x) for n, x in (("q", Q), ("k", K), ("v", V))]
    kw.update(overrides)
    return attention(*args, **kw)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"q": Q[0]}, "q must have shape"),
        ({"k": K[:1]}, "batch sizes differ"),
        ({"v": V[:, :5]}, "v must match k"),
        ({"k": K[..., :8], "v": V[..., :8]}, "k head_dim"),
        ({"q": Q[:, :, :3]}, "multiple of k/v heads"),
        ({"q": Q.astype(np.int32)}, "q must be a floating-point"),
        ({"q_positions": POS.astype(np.float32)}, "q_positions must be an integer"),
        ({"k_positions": POS[:5]}, "k_positions must have shape"),
        ({"positional": Rotary.create(32)}, "rotary_dim"),
        ({"positional": Alibi.create(3)}, "slopes for 4 query heads"),
        ({"positional": "rope"}, "positional must be"),
        ({"scale": -1.0}, "scale must be"),
        ({"implementation": "flash"}, "implementation must be"),
        ({"block_q": 0, "implementation": "blockwise"}, "block_q"),
        ({"spec": "lm_infinite"}, "spec must be"),
        ({"spec": AttentionSpec.lm_infinite(2, 4, top_k=TopK(2, 2))}, "layer must be given"),
        ({"k_positions": POS[::-1].copy(), "implementation": "blockwise"}, "k_positions: the blockwise"),
        ({"q_positions": POS * 2, "k_positions": POS * 2, "implementation": "blockwise"}, "q_positions: the blockwise"),
    ],
)
def test_bad_input_raises_value_error_naming_it(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        _call(**overrides)


def test_auto_picks_a_path_that_agrees_and_runs_under_jit():
    t = 600  # 600 * 600 scores > DENSE_MAX_SCORES -> blockwise
    q, k, v = random_qkv(1, 1, t, t, 2, 2, 16)
    pos = jnp.arange(t, dtype=jnp.int32)
    spec = AttentionSpec.lm_infinite(4, 64)
    rope = Rotary.create(16)

    @jax.jit
    def run(q, k, v, pos):
        return attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope, block_q=128, block_k=64)

    ref = attention(q, k, v, q_positions=pos, k_positions=pos, spec=spec, positional=rope, implementation="reference")
    assert rel_err(run(q, k, v, pos), ref) <= 1e-5
    # a single query (decode) over keys in ring-buffer order goes to the dense path
    ring = np.roll(np.arange(t, dtype=np.int32), 17)
    one = attention(q[:, -1:], k, v, q_positions=np.array([t - 1], np.int32), k_positions=ring, spec=spec,
                    positional=rope)
    sorted_keys = np.argsort(ring)
    want = attention(q[:, -1:], k[:, sorted_keys], v[:, sorted_keys], q_positions=np.array([t - 1], np.int32),
                     k_positions=ring[sorted_keys], spec=spec, positional=rope, implementation="reference")
    assert rel_err(one, want) <= 1e-6
