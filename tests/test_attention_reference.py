"""The dense reference against the naive float64 oracle, and the probe's outputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (SPEC_FACTORIES, case_seed, make_positional, naive_positional_kwargs, naive_spec_kwargs,
                      random_qkv, rel_err)
from naive_attention import naive_attention

from lminf_jax import LMInfinite, TopK, attention, attention_probe


def _positions(b: int, tq: int, tk: int, pad: list[int]):
    """Keys 0..tk-1 (minus left padding per row); queries are the last tq key slots."""
    k_pos = np.stack([np.arange(tk) - p for p in pad]).astype(np.int32)
    k_pos[k_pos < 0] = -1
    return k_pos[:, tk - tq :], k_pos


@pytest.mark.parametrize("positional_name", ["rope_half", "rope_interleaved_partial", "alibi", "none"])
@pytest.mark.parametrize("spec_name", sorted(SPEC_FACTORIES))
def test_reference_matches_naive_oracle(spec_name, positional_name):
    b, tq, tk, hq, hkv, d = 2, 14, 22, 4, 2, 8
    q, k, v = random_qkv(case_seed(spec_name, positional_name), b, tq, tk, hq, hkv, d)
    q_pos, k_pos = _positions(b, tq, tk, pad=[0, 3])
    spec = SPEC_FACTORIES[spec_name](3, 5)
    positional = make_positional(positional_name, d, hq)
    out = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, spec=spec, positional=positional,
                    implementation="reference")
    want = naive_attention(q, k, v, q_pos, k_pos, scale=d**-0.5, **naive_spec_kwargs(spec),
                           **naive_positional_kwargs(positional))
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("positional_name", ["rope_half", "alibi"])
@pytest.mark.parametrize("layer,active", [(5, True), (1, False)])
def test_reference_top_k_matches_naive_oracle(positional_name, layer, active):
    b, tq, tk, hq, hkv, d = 2, 6, 40, 4, 1, 8
    q, k, v = random_qkv(7, b, tq, tk, hq, hkv, d)
    q_pos, k_pos = _positions(b, tq, tk, pad=[0, 2])
    spec = LMInfinite(2, 8, top_k=TopK(k=3, insert_distance=4, from_layer=4))
    positional = make_positional(positional_name, d, hq)
    out = attention(q, k, v, q_positions=q_pos, k_positions=k_pos, spec=spec, positional=positional,
                    layer=layer, implementation="reference")
    want = naive_attention(q, k, v, q_pos, k_pos, scale=d**-0.5, top_k=(3, 4), top_k_active=active,
                           **naive_spec_kwargs(spec), **naive_positional_kwargs(positional))
    assert rel_err(out, want) < 1e-5
    plain = naive_attention(q, k, v, q_pos, k_pos, scale=d**-0.5, **naive_spec_kwargs(spec),
                            **naive_positional_kwargs(positional))
    changed = rel_err(np.asarray(out)[:, -1], plain[:, -1]) > 1e-3
    assert changed == active


def test_probe_probabilities_and_classes():
    b, t, hq, d = 1, 30, 2, 16
    q, k, v = random_qkv(3, b, t, t, hq, hq, d)
    pos = np.arange(t, dtype=np.int32)
    spec = LMInfinite(2, 6)
    out, probe = attention_probe(q, k, v, q_positions=pos, k_positions=pos, spec=spec,
                                 positional=make_positional("rope_half", d, hq))
    probs = np.asarray(probe.probs)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    attended = np.asarray(probe.local | probe.global_)
    assert np.all(probs[~attended] == 0) and np.all(np.isneginf(np.asarray(probe.logits)[~attended]))
    i = 20  # window is 15..20, sinks 0..1
    assert np.flatnonzero(np.asarray(probe.local)[0, 0, i]).tolist() == list(range(15, 21))
    assert np.flatnonzero(np.asarray(probe.global_)[0, 0, i]).tolist() == [0, 1]
    np.testing.assert_allclose(np.einsum("bhqk,bkhd->bqhd", probs, v), out, rtol=1e-5, atol=1e-6)


def test_empty_query_rows_give_zero_output():
    q, k, v = random_qkv(4, 1, 4, 4, 2, 2, 8)
    pos = np.array([-1, -1, 0, 1], np.int32)
    out = attention(q, k, v, q_positions=pos, k_positions=pos, implementation="reference")
    assert np.all(np.asarray(out)[:, :2] == 0) and np.all(np.abs(np.asarray(out)[:, 2:]) > 0)


def test_bf16_inputs_use_float32_softmax():
    q, k, v = random_qkv(5, 1, 64, 64, 4, 4, 32)
    pos = np.arange(64, dtype=np.int32)
    ref = attention(q, k, v, q_positions=pos, k_positions=pos, implementation="reference")
    low = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_positions=pos, k_positions=pos,
                    implementation="reference")
    assert low.dtype == jnp.bfloat16
    assert rel_err(low, ref) < 1e-2
