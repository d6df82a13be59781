"""LongHeads and InfLLM (`lminf_jax.retrieval`) against their float64 oracles (tests/retrieval_oracle.py), in one
pass over a sequence and token by token over buffers, and the reference's invariants on the library's own paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import grid, in_turn, product, rel_err
from retrieval_oracle import infllm_oracle, infllm_steps, longheads_oracle, longheads_selection
from test_retrieval_oracle import POSITIONALS, _positional

from lminf_jax import Alibi, AttentionCall, DistanceLimit, Vanilla, attention, frequency_method
from lminf_jax.attention import call_attention
from lminf_jax.retrieval import initial_state, retrieval_attention, sequence_retrieval_attention
from lminf_jax.rope import LengthRule, Rotary
from lminf_jax.scores import Scaling
from lminf_jax.spec import InfLLM, LongHeads

D = 8
N, HQ, HKV = 70, 4, 2
LONGHEADS = LongHeads(chunk_size=4, span=16)
INFLLM = InfLLM(global_branch=2, local_branch=8, block_size=4, blocks_retrieved=2, representatives=2, step_size=4)
ORACLE_INFLLM = dict(n_init=2, n_local=8, block=4, topk=2, repr_topk=2)


def _qkv(seed: int, n: int = N, hq: int = HQ, hkv: int = HKV):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, hq, D)), rng.standard_normal((n, hkv, D)), rng.standard_normal((n, hkv, D))


def _library(name: str) -> tuple[dict, Rotary | Alibi | None]:
    """The oracle's positional kwargs and the library's positional encoding for the same thing."""
    given = _positional(name, HQ)
    if "rope" in given:
        inv_freq, layout, scaling = given["rope"]
        return given, Rotary(tuple(inv_freq), layout, scaling)
    if "slopes" in given:
        return given, Alibi(tuple(given["slopes"]))
    return given, None


def _oracle(spec, q, k, v, given, n_prompt):
    if isinstance(spec, LongHeads):
        return longheads_oracle(q, k, v, chunk=spec.chunk_size, span=spec.span, scale=D**-0.5, **given)
    return infllm_oracle(q, k, v, infllm_steps(n_prompt, len(q), spec.step_size), **ORACLE_INFLLM, scale=D**-0.5,
                         **given)


def _batch(*arrays):
    return tuple(jnp.asarray(x[None], jnp.float32) for x in arrays)


_jitted = jax.jit(retrieval_attention, static_argnames=("spec", "positional", "scale"))


def _token_by_token(spec, q, k, v, positional, n_prompt: int, pad: int) -> np.ndarray:
    """The prompt (after ``pad`` padding slots) in one call, then one token per call, over buffers."""
    slots = len(q) + 3
    keys, values = jnp.zeros((1, HKV, slots, D)), jnp.zeros((1, HKV, slots, D))
    state = initial_state(spec, 1, HQ, slots, D, jnp.float32)
    queries = state.get("queries")
    put = jax.vmap(lambda buf, s, x: buf.at[:, s].set(jnp.swapaxes(x, 0, 1), mode="drop"))
    outs = []
    for a, b in [(0, n_prompt)] + [(i, i + 1) for i in range(n_prompt, len(q))]:
        lead = pad if a == 0 else 0
        chunk = [np.concatenate([np.ones((lead, *x.shape[1:])), x[a:b]]) for x in (q, k, v)]
        positions = jnp.asarray(np.concatenate([np.full(lead, -1), np.arange(a, b)])[None], jnp.int32)
        qb, kb, vb = _batch(*chunk)
        out, state = _jitted(qb, kb, vb, positions, keys, values, state, spec=spec, positional=positional,
                             scale=Scaling(D**-0.5))
        assert not np.any(np.asarray(out[0, :lead]))  # padding rows are zero
        slot = jnp.where(positions >= 0, positions, slots)
        keys, values = put(keys, slot, kb), put(values, slot, vb)
        if "queries" in state:  # a row per slot: written as keys are (lminf_jax.retrieval.SLOT_STATE)
            state = {**state, "queries": put(queries, slot, state["queries"])}
        queries = state.get("queries")
        outs.append(np.asarray(out[0, lead:]))
    return np.concatenate(outs)


# core: each method under two encodings, the encodings in turn
@pytest.mark.parametrize("spec,positional_name", grid(
    product([LONGHEADS, INFLLM], POSITIONALS),
    core=in_turn([LONGHEADS, INFLLM], POSITIONALS) + in_turn([LONGHEADS, INFLLM], POSITIONALS, shift=2)),
    ids=[f"{name}-{positional}" for name, positional in product(["longheads", "infllm"], POSITIONALS)])
def test_one_pass_matches_the_oracle(spec, positional_name):
    q, k, v = _qkv(0)
    given, positional = _library(positional_name)
    whole = sequence_retrieval_attention(*_batch(q, k, v), jnp.arange(N)[None], spec=spec, positional=positional,
                                         scale=Scaling(D**-0.5))[0]
    assert rel_err(np.asarray(whole), _oracle(spec, q, k, v, given, N)) < 1e-6


# core: each method under one encoding, the encodings in turn
@pytest.mark.parametrize("spec,positional_name", grid(
    product([LONGHEADS, INFLLM], ["rope_interleaved_partial", "alibi"]),
    core=in_turn([LONGHEADS, INFLLM], ["rope_interleaved_partial", "alibi"])),
    ids=[f"{name}-{positional}"
         for name, positional in product(["longheads", "infllm"], ["rope_interleaved_partial", "alibi"])])
def test_token_by_token_matches_the_oracle(spec, positional_name):
    q, k, v = _qkv(0)
    given, positional = _library(positional_name)
    n_prompt = 23  # a prompt ending inside a chunk, a block and a step; then decoding
    stepwise = _token_by_token(spec, q, k, v, positional, n_prompt, pad=3)
    assert rel_err(stepwise, _oracle(spec, q, k, v, given, n_prompt)) < 1e-6


@pytest.mark.parametrize("flagged", [dataclasses.replace(LONGHEADS, prefill_code_quirks=True),
                                     dataclasses.replace(INFLLM, main_double_count=True)],
                         ids=["longheads-prefill_code_quirks", "infllm-main_double_count"])
def test_code_flags_match_the_oracles_flags(flagged):
    """LongHeads' prefill_code_quirks (the PyTorch prefill path for a call of several tokens, reference §1.8) and
    InfLLM's main_double_count (the main branch's global keys, §2.8) against the oracles' flags: in one pass, and a
    prompt in one call then one token per call (decoding follows the canonical rule). The flag moves the prompt's
    outputs; LongHeads' decoding then equals the canonical method's (its chunk representations do not depend on
    the flag), InfLLM's need not (doubled keys change the local mass that picks representatives)."""
    q, k, v = _qkv(3)
    given, positional = _library("rope_half")
    n_prompt = 41  # past LongHeads' span and several InfLLM blocks; ends inside a chunk, a block and a step
    if isinstance(flagged, LongHeads):
        oracle = lambda n_prefill, quirks: longheads_oracle(  # noqa: E731
            q, k, v, chunk=flagged.chunk_size, span=flagged.span, n_prefill=n_prefill, prefill_code_quirks=quirks,
            scale=D**-0.5, **given)
    else:
        oracle = lambda n_prefill, quirks: infllm_oracle(  # noqa: E731
            q, k, v, infllm_steps(n_prefill, N, flagged.step_size), **ORACLE_INFLLM, main_code=quirks, scale=D**-0.5,
            **given)
    whole = sequence_retrieval_attention(*_batch(q, k, v), jnp.arange(N)[None], spec=flagged, positional=positional,
                                         scale=Scaling(D**-0.5))[0]
    assert rel_err(np.asarray(whole), oracle(N, True)) < 1e-6
    stepwise = _token_by_token(flagged, q, k, v, positional, n_prompt, pad=2)
    want, canonical = oracle(n_prompt, True), oracle(n_prompt, False)
    assert rel_err(stepwise, want) < 1e-6
    assert rel_err(want[:n_prompt], canonical[:n_prompt]) > 1e-3
    if isinstance(flagged, LongHeads):
        assert rel_err(stepwise[n_prompt:], canonical[n_prompt:]) < 1e-6


@pytest.mark.parametrize("spec", [LONGHEADS, INFLLM], ids=["longheads", "infllm"])
def test_below_the_threshold_is_vanilla(spec):
    """LongHeads before its span and InfLLM within its window attend every key at its true position."""
    n = spec.span - 1 if isinstance(spec, LongHeads) else spec.local_branch
    q, k, v = _batch(*_qkv(1, n))
    rotary = Rotary(tuple(100.0 ** (-np.arange(0, D, 2) / D)))
    got = attention(q, k, v, spec=spec, positional=rotary)
    want = attention(q, k, v, spec=Vanilla(), positional=rotary, implementation="reference")
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("positional_name", ["rope_half", "alibi"])
def test_infllm_retrieving_every_block_is_the_distance_limit(positional_name):
    """With as many blocks retrieved as ever form, InfLLM is ReRoPE / LM-Infinite's distance limit at
    D = n_local - 1 (reference §2.11, invariant 2)."""
    spec = InfLLM(global_branch=2, local_branch=8, block_size=4, blocks_retrieved=32, representatives=2,
                  step_size=4)
    q, k, v = _batch(*_qkv(2))
    _, positional = _library(positional_name)
    got = attention(q, k, v, spec=spec, positional=positional)
    want = attention(q, k, v, spec=DistanceLimit(spec.local_branch - 1), positional=positional,
                     implementation="reference")
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, attention(q, k, v, spec=INFLLM, positional=positional)) > 1e-3  # two blocks: not the same


def test_attended_keys_count_what_the_oracles_select():
    q, k, v = _qkv(3, 64, 2, 1)
    rope = _positional("rope_half", 2)["rope"]
    counted = LONGHEADS.attended_keys(np.arange(64))
    for p in range(64):
        selection = longheads_selection(q, k, v, p, 1, chunk=4, span=16, rope=rope)
        assert len(selection.keys) == counted[p]
    _, info = infllm_oracle(q, k, v, infllm_steps(0, 64, 4), **ORACLE_INFLLM, scale=D**-0.5, rope=rope,
                            return_mass=True)
    counted = INFLLM.attended_keys(np.arange(64))
    for u in range(64):
        local = min(u + 1, INFLLM.local_branch)
        assert local + len(info["global_keys"][(u, 0)]) == counted[u]


def test_farthest_distance_stays_inside_the_span():
    assert LONGHEADS.farthest_distance(10) == 9
    assert LONGHEADS.farthest_distance(1000) == LONGHEADS.span - 2
    quirky = dataclasses.replace(LONGHEADS, prefill_code_quirks=True)  # the PyTorch prefill path: no own key
    q, k, v = _qkv(4)
    scored = max(sel.q_pos - min(sel.key_pos) for p in range(N) for sel in [longheads_selection(
        q, k, v, p, 0, chunk=quirky.chunk_size, span=quirky.span, quirky=True)])
    assert quirky.farthest_distance(N) == scored == quirky.span - 1
    assert INFLLM.farthest_distance(1000) == INFLLM.local_branch - 1


def test_bfloat16_inputs_keep_float32_softmax():
    q, k, v = _qkv(4)
    rotary = Rotary(tuple(100.0 ** (-np.arange(0, D, 2) / D)))
    for spec in (LONGHEADS, INFLLM):
        exact = attention(*_batch(q, k, v), spec=spec, positional=rotary)
        half = attention(*(x.astype(jnp.bfloat16) for x in _batch(q, k, v)), spec=spec, positional=rotary)
        assert half.dtype == jnp.bfloat16
        assert rel_err(half.astype(jnp.float32), exact) < 3e-2


def test_refusals_name_what_is_wrong():
    q, k, v = _batch(*_qkv(5, 20))
    dynamic = Rotary((1.0, 0.1, 0.01, 0.001), length_rule=LengthRule(D, 100.0, frequency_method("dynamic_ntk", 1.0, 16),
                                                                     16))
    with pytest.raises(ValueError, match="fixed frequencies"):
        attention(q, k, v, spec=LONGHEADS, positional=dynamic)
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention(q, k, v, spec=INFLLM, implementation="pallas")
    positions = np.arange(20, dtype=np.int32)
    with pytest.raises(ValueError, match="same positions"):
        attention(q, k[:, :10], v[:, :10], q_positions=positions, k_positions=positions[:10], spec=LONGHEADS)
    with pytest.raises(ValueError, match=r"0, 1, \.\.\., n-1"):
        attention(q, k, v, q_positions=positions + 5, k_positions=positions + 5, spec=LONGHEADS)
    with pytest.raises(ValueError, match="no static mask"):
        LONGHEADS.classify(np.arange(3), np.arange(3))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        LongHeads(chunk_size=5, span=16)
    with pytest.raises(ValueError, match="representatives"):
        InfLLM(block_size=2, representatives=3)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators(platform):
    q, k, v = _batch(*_qkv(6, 40))
    rotary = Rotary(tuple(100.0 ** (-np.arange(0, D, 2) / D)))
    for spec in (LONGHEADS, INFLLM):
        run = jax.jit(lambda q, k, v, spec=spec: call_attention(q, k, v, call=AttentionCall(spec), positional=rotary))
        assert run.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
