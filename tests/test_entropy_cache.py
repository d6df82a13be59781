"""SirLLM (lminf_jax.entropy_cache): the eviction rule against a naive transcription of the reference's
§3.3, its invariants (§3.5: vanilla within S, StreamingLLM at E = 0 and m = 1, rho = 0 ties, sorted kept
slots with the sinks), compaction of rotated keys, and the token scores (paper's and code's)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model, rel_err

from lminf_jax import AttentionCall, RopeScaling, Rotary, StreamingLLM, Vanilla, apply_rope
from lminf_jax.cache import KVCache
from lminf_jax.decoding import generate, left_pad
from lminf_jax.entropy_cache import EntropyCache, SirLLM, compact, keep_slots, sirllm_generate, turn_scores


@pytest.fixture(scope="module")
def llama():
    family, cfg, params = random_model("llama_gqa", seed=5)
    return family, cfg, params, family.model(cfg, AttentionCall(Vanilla()))


def _prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 97, n).tolist() for n in lengths]


def naive_keep(scores, n, m, policy) -> list[int]:
    """§3.3 as the code writes it, in Python and float64: the kept slots before a turn of m tokens."""
    g, e, s = policy.sinks, policy.entropy, policy.size
    if n + m <= s:
        return list(range(n))
    k = e - m
    order = sorted(range(n), key=lambda i: -float(scores[i]))  # Python's sort is stable: older first among ties
    keep = set(order[:k]) if k > 0 else set()
    keep |= set(range(g))
    for i in range(n - 1, 0, -1):
        if len(keep) < s - m:
            keep.add(i)
        else:
            break
    return sorted(keep)


def test_keep_slots_equals_the_naive_rule():
    rng = np.random.default_rng(7)
    s, b = 12, 6  # one shape: the eager ops compile once
    for case in range(12):
        sinks = int(rng.integers(0, 4))
        entropy = int(rng.integers(1, s - sinks + 1))
        policy = SirLLM(sinks=sinks, recent=s - sinks - entropy, entropy=entropy, turn=1)
        count = rng.integers(0, s + 1, b)
        count[0] = s
        m = rng.integers(0, s - sinks + 1, b)
        m[0] = s - sinks  # k = E - m < 0 when R > 0
        scores = rng.integers(0, 4, (b, s)) / 4.0  # few distinct values: many ties
        scores[np.arange(s)[None] >= count[:, None]] = 0.0
        for per_row in (True, False):
            mm = jnp.asarray(m) if per_row else int(m[1])
            got = np.asarray(keep_slots(jnp.asarray(scores, jnp.float32), jnp.asarray(count), mm, policy))
            for r in range(b):
                mr = int(m[r]) if per_row else int(m[1])
                kept = np.nonzero(got[r])[0].tolist()
                assert kept == naive_keep(scores[r], int(count[r]), mr, policy), (case, r, policy)
                # invariant 4: sorted, sinks kept; S - m kept after an eviction (at least the sinks)
                assert set(range(min(sinks, int(count[r])))) <= set(kept)
                if count[r] + mr > s:
                    assert len(kept) == max(s - mr, sinks)


def test_keep_slots_after_decay_zero_keeps_the_oldest_old_tokens():
    """Invariant 3: rho = 0 leaves every old score 0, so the top-k ties go to the oldest old tokens."""
    policy = SirLLM(sinks=1, recent=1, entropy=8, decay=0.0, turn=1)
    scores = np.array([[0, 0, 0, 0, 0, 0, 0, 2.5, 0.5, 1.5]], np.float32)  # 7 decayed, a new turn of 3
    keep = np.asarray(keep_slots(jnp.asarray(scores), jnp.asarray([10]), 1, policy))[0]
    # k = E - m = 7: the 3 new + the 4 oldest zeros; then the newest fill to S - m = 9, so only slot 4 goes
    assert np.nonzero(keep)[0].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert np.nonzero(keep)[0].tolist() == naive_keep(scores[0], 10, 1, policy)


def test_within_s_sirllm_equals_vanilla_generation(llama):
    """Invariant 1: prompts and generation of two rounds within S: no eviction, the vanilla tokens and
    logits (rows of different lengths; a decay that never matters)."""
    _, cfg, params, model = llama
    policy = SirLLM(sinks=2, recent=8, entropy=14, decay=0.5, turn=5)  # S = 24
    first, second = _prompts([9, 13], 1), _prompts([5, 2], 2)
    out1, state = sirllm_generate(model, params, first, policy, positional=model.decoder().positional,
                                  max_new_tokens=5, cache=model.init_cache(2, capacity=policy.size))
    plain = generate(model, params, first, model.init_cache(2, capacity=32), max_new_tokens=5)
    assert out1.tokens.tolist() == plain.tokens.tolist()
    out2, state = sirllm_generate(model, params, second, policy, positional=model.decoder().positional,
                                  max_new_tokens=4, cache=state)
    # the whole stream of each row in one vanilla forward (left-padded): every token its argmax
    streams = [first[b] + out1.row(b) + second[b] + out2.row(b) for b in range(2)]
    tokens, positions = left_pad(streams)
    logits = np.asarray(model.forward(params, jnp.asarray(tokens), jnp.asarray(positions)))
    for b, full in enumerate(streams):
        row = logits[b, tokens.shape[1] - len(full):]
        assert out2.row(b) == row[len(full) - 5:-1].argmax(-1).tolist(), b
        assert rel_err(state.logits[b], row[-1]) < 1e-5
        assert int(state.count[b]) == len(full)
        assert np.asarray(state.cache.positions[b]).tolist() == [*range(len(full)), *[-1] * (24 - len(full))]
        # the cached scores: e_i = -log softmax(z_{i-1})[x_i], the first token the maximum of its turn
        # (tokens 1..4), those of the first round decayed once (rho = 0.5) by the second
        row = row.astype(np.float64)
        lse = np.log(np.exp(row).sum(-1))
        want = lse[:-1] - row[np.arange(len(full) - 1), full[1:]]
        want = np.concatenate([[want[:4].max()], want])
        want[:len(first[b]) + 5] *= 0.5
        np.testing.assert_allclose(np.asarray(state.scores[b, :len(full)]), want, rtol=1e-5)
    _, again = sirllm_generate(model, params, [[], []], policy, positional=model.decoder().positional,
                               max_new_tokens=0, cache=state)  # a round with no call decays too
    np.testing.assert_allclose(np.asarray(again.scores), 0.5 * np.asarray(state.scores), rtol=1e-7)
    assert isinstance(again, EntropyCache) and again.logits is state.logits


def test_rows_evict_independently_and_the_cache_stays_bounded(llama):
    """Prompts longer than S (top-k selection, middle tokens evicted): each row of a batch as alone."""
    _, cfg, params, model = llama
    policy = SirLLM(sinks=2, recent=8, entropy=14, decay=0.5, turn=5)  # as above: its programs are compiled
    prompts = _prompts([31, 22], 6)
    out, state = sirllm_generate(model, params, prompts, policy, positional=model.decoder().positional,
                                 max_new_tokens=8)
    for b, prompt in enumerate(prompts):
        alone, own = sirllm_generate(model, params, [prompt], policy, positional=model.decoder().positional,
                                     max_new_tokens=8)
        assert alone.row(0) == out.row(b), b
        np.testing.assert_allclose(own.scores[0], state.scores[b], rtol=1e-5)
        np.testing.assert_allclose(own.logits[0], state.logits[b], rtol=1e-5, atol=1e-5)
        # S - 1 held before the last token, + that token; contiguous positions
        assert int(state.count[b]) == policy.size
        assert np.asarray(state.cache.positions[b]).tolist() == list(range(policy.size))


def test_entropy_zero_turn_one_equals_streaming_llm_at_every_step(llama):
    """Invariant 2: E = 0 and m = 1: StreamingLLM with G sinks and a window of S - G, its positions those of
    its cache, at every step (greedy tokens and logits), over prompts longer than S."""
    family, cfg, params, model = llama
    g, s = 2, 10  # (a Λ-cache of 8 slots for 2 rows hits an LLVM instruction-selection crash on some x86 CPUs)
    policy = SirLLM(sinks=g, recent=s - g, entropy=0, turn=1)
    stream = family.model(cfg, AttentionCall(StreamingLLM(global_branch=g, local_branch=s - g)))
    prompts, new = _prompts([24, 17], 3), 10
    out, _ = sirllm_generate(model, params, prompts, policy, positional=model.decoder().positional,
                             max_new_tokens=new)  # cache None: the step's init_cache
    # token by token, one round each (E = 0: the scores, and so the decay, never matter)
    state, logits, tokens = model.init_cache(2, capacity=s), [[], []], [[], []]
    for t in range(max(map(len, prompts)) + new):
        feed = [[p[t]] if t < len(p) else [] for p in prompts]
        gen, state = sirllm_generate(model, params, feed, policy, positional=model.decoder().positional,
                                     max_new_tokens=int(t >= max(map(len, prompts))), cache=state)
        for b, p in enumerate(prompts):
            if t < len(p) or gen.tokens.shape[1]:
                logits[b].append(np.asarray(state.logits[b]))
                tokens[b] += gen.row(b)
        assert np.all(np.asarray(state.count) <= s)
    streams = [p + tokens[b] for b, p in enumerate(prompts)]
    padded, positions = left_pad(streams)
    ref = np.asarray(stream.forward(params, jnp.asarray(padded), jnp.asarray(positions)))
    for b, seq in enumerate(streams):
        assert tokens[b] == out.row(b)
        assert len(logits[b]) == len(seq)  # greedy StreamingLLM: each token the argmax of its logits
        assert tokens[b] == ref[b, padded.shape[1] - new - 1:-1].argmax(-1).tolist(), b
        assert rel_err(np.stack(logits[b]), ref[b, padded.shape[1] - len(seq):]) < 1e-5, b
        # bounded at S, contiguous positions: S - 1 held after the eviction before the last token, + that token
        assert np.asarray(state.cache.positions[b]).tolist() == list(range(s))


def test_compaction_of_rotated_keys_equals_keys_rotated_at_the_new_positions():
    # partial, interleaved, and YaRN's attention scaling (a rotation by new - old must not apply it twice);
    # the models' half layout is exercised by the StreamingLLM test
    rotary = Rotary.create(16, rotary_dim=8, layout="interleaved",
                           scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=64))
    assert rotary.attention_scaling != 1.0
    rng = np.random.default_rng(11)
    layers, b, h, s, d = 2, 2, 2, 300, 16
    held = np.array([300, 211])
    raw = rng.standard_normal((layers, b, h, s, d)).astype(np.float32)
    values = rng.standard_normal((layers, b, h, s, d)).astype(np.float32)
    old = np.where(np.arange(s)[None] < held[:, None], np.arange(s)[None], -1).astype(np.int32)

    @jax.jit
    def rotated_at(x, positions):  # (layers, B, H, S, d) rotated at positions (B, S)
        return jnp.swapaxes(apply_rope(jnp.swapaxes(x, 2, 3), positions, rotary), 2, 3)

    cache = KVCache(keys=rotated_at(raw, np.maximum(old, 0)), values=jnp.asarray(values), positions=jnp.asarray(old),
                    rotated=True)
    keep = (rng.random((b, s)) < 0.4) & (old >= 0)
    keep[:, :3] = True
    run = jax.jit(compact, static_argnums=2)
    new_cache, source = run(cache, jnp.asarray(keep), rotary)
    # the cache built directly: each row's kept raw keys at positions 0..n-1
    direct, direct_values, counts = np.zeros_like(raw), np.zeros_like(values), keep.sum(1)
    for r in range(b):
        kept = np.nonzero(keep[r])[0]
        assert np.asarray(source[r, :counts[r]]).tolist() == kept.tolist()
        direct[:, r, :, :counts[r]] = raw[:, r][:, :, kept]
        direct_values[:, r, :, :counts[r]] = values[:, r][:, :, kept]
    filled = np.arange(s)[None] < counts[:, None]
    want = np.where(filled[None, :, None, :, None], rotated_at(direct, np.where(filled, np.arange(s)[None], 0)), 0)
    assert rel_err(new_cache.keys, want) < 1e-6
    np.testing.assert_array_equal(new_cache.values, direct_values)
    assert np.asarray(new_cache.positions).tolist() == np.where(filled, np.arange(s)[None], -1).tolist()
    # a key that does not move is not touched; an un-rotated cache only moves
    np.testing.assert_array_equal(new_cache.keys[:, :, :, :3], cache.keys[:, :, :, :3])
    plain, _ = run(KVCache(keys=jnp.asarray(raw), values=jnp.asarray(values), positions=jnp.asarray(old)),
                   jnp.asarray(keep), None)
    np.testing.assert_array_equal(plain.keys, direct)
    with pytest.raises(ValueError, match="positional"):
        compact(cache, jnp.asarray(keep), None)


def _surprisal(z, x) -> float:
    return math.log(sum(math.exp(v) for v in z)) - z[x]


def test_turn_scores_paper_and_code_on_known_logits():
    z = [[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.0, -1.0, 0.5, 2.0]]
    previous = [0.5, 0.0, -0.5, 1.0]
    x = [2, 0, 3]
    logits = jnp.asarray([z, z], jnp.float32)
    tokens = jnp.asarray([x, x], jnp.int32)
    m, started = jnp.asarray([3, 2]), jnp.asarray([False, True])
    prev = jnp.asarray([previous, previous], jnp.float32)
    raw = [_surprisal(z[i], x[i]) for i in range(3)]  # the code: the token's id at its own position
    scores_of = jax.jit(turn_scores, static_argnames="code_scores")
    code = np.asarray(scores_of(logits, tokens, m, prev, started, code_scores=True))
    np.testing.assert_allclose(code[0], [max(raw), raw[0], raw[1]], rtol=1e-6)
    np.testing.assert_allclose(code[1], [max(raw[:2]), raw[0], 0.0], rtol=1e-6)
    paper = [_surprisal(z[0], x[1]), _surprisal(z[1], x[2])]  # e_i from the logits at i - 1
    got = np.asarray(scores_of(logits, tokens, m, prev, started))
    np.testing.assert_allclose(got[0], [max(paper), *paper], rtol=1e-6)  # a first token: its turn's maximum
    np.testing.assert_allclose(got[1], [_surprisal(previous, x[0]), paper[0], 0.0], rtol=1e-6)
    one = np.asarray(scores_of(logits[:, :1], tokens[:, :1], jnp.asarray([1, 1]), prev, jnp.asarray([False, True])))
    np.testing.assert_allclose(one[:, 0], [raw[0], _surprisal(previous, x[0])], rtol=1e-6)


def test_policy_validation_and_defaults():
    assert SirLLM.for_model(512) == SirLLM(sinks=4, recent=128, entropy=256, turn=64)
    assert SirLLM.for_model(512).size == 388 < 512
    assert hash(SirLLM()) == hash(SirLLM()) and SirLLM().size == 2004
    for fields, name in [({"sinks": -1}, "sinks"), ({"recent": 1.5}, "recent"), ({"decay": 1.5}, "decay"),
                         ({"turn": 0}, "turn"), ({"recent": 2, "entropy": 2, "turn": 5}, "turn"),
                         ({"recent": 0, "entropy": 0}, "recent"), ({"code_scores": 1}, "code_scores")]:
        with pytest.raises(ValueError, match=name):
            SirLLM(**fields)


def test_generate_rejects_bad_caches(llama):
    _, cfg, params, model = llama
    policy = SirLLM(sinks=2, recent=4, entropy=4, turn=2)
    positional = model.decoder().positional
    with pytest.raises(ValueError, match="full cache of S"):
        sirllm_generate(model, params, [[1, 2]], policy, positional=positional, max_new_tokens=1,
                        cache=model.init_cache(1, capacity=16))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sirllm_generate(model, params, [[]], policy, positional=positional, max_new_tokens=1)
    with pytest.raises(ValueError, match="positional"):
        sirllm_generate(model, params, [[1]], policy, positional=None, max_new_tokens=1)
    empty = model.init_cache(1, capacity=policy.size)
    with pytest.raises(ValueError, match="must be empty"):
        sirllm_generate(model, params, [[1]], policy, positional=positional, max_new_tokens=1,
                        cache=dataclasses.replace(empty, positions=empty.positions.at[0, 0].set(0)))


def test_surprisal_is_vanilla_within_the_cache_and_bounded_beyond(llama):
    """`sirllm_surprisal`: every token's NLL as the policy streams the text; within S it is the vanilla
    model's NLL, beyond it the cache stays at S and the scores stay finite."""
    from lminf_jax.entropy_cache import sirllm_surprisal

    _, _, params, model = llama
    policy = SirLLM(sinks=2, recent=6, entropy=8, turn=5)
    tokens = np.asarray(_prompts([40, 40], seed=3))
    positional = model.decoder().positional
    short = sirllm_surprisal(model, params, tokens[:, :policy.size], policy, positional=positional,
                             cache=model.init_cache(2, capacity=policy.size))
    want = -np.asarray(model.score(params, jnp.asarray(tokens[:, :policy.size])).logprobs)
    assert short.shape == (2, policy.size - 1) and rel_err(short, want) < 1e-5
    long = sirllm_surprisal(model, params, tokens, policy, positional=positional,
                            cache=model.init_cache(2, capacity=policy.size))
    assert long.shape == (2, 39) and np.all(np.isfinite(long))
    assert rel_err(long[:, :policy.size - 1], short) < 1e-6
    with pytest.raises(ValueError, match="misaligned"):
        sirllm_surprisal(model, params, tokens, dataclasses.replace(policy, code_scores=True), positional=positional,
                         cache=model.init_cache(2, capacity=policy.size))
