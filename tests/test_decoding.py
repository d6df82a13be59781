"""generate: left-padded batches, sampling, stop tokens, streaming, decoding in chunks (memory flat in N)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_model

from lminf_jax import AttentionCall, LMInfinite, Sampling, Vanilla
from lminf_jax import decoding
from lminf_jax.decoding import DECODE_STEPS, Generation, generate, left_pad
from lminf_jax.models import registry

G, L = 2, 8


@pytest.fixture(scope="module")
def llama():
    family, cfg, params = random_model("llama_gqa", seed=3)
    return family.model(cfg, AttentionCall(LMInfinite(G, L))), params


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 97, n).tolist() for n in lengths]


def test_greedy_generation_follows_the_full_forward_argmax(llama):
    model, params = llama
    prompt = _prompts([21])[0]
    out = generate(model, params, [prompt], model.init_cache(1), max_new_tokens=30, prefill_chunk=8)
    generated = out.row(0)
    assert len(generated) == 30 and not out.stopped[0]
    logits = np.asarray(model.forward(params, jnp.asarray([prompt + generated], jnp.int32)))[0]
    for i, token in enumerate(generated):  # every token is the argmax (up to float noise) of one forward
        row = logits[len(prompt) - 1 + i]
        assert row[token] >= row.max() - 1e-4, i


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.9, top_k=20, top_p=0.9)])
def test_left_padded_batch_rows_equal_each_row_alone(llama, sampling):
    model, params = llama
    prompts = _prompts([7, 30, 27, 1], seed=1)  # alone, 1 and 4 chunks of 8: two programs for four rows
    seeds = [11, 12, 13, 14]
    batch = generate(model, params, prompts, model.init_cache(4), max_new_tokens=12, sampling=sampling,
                     seed=seeds, prefill_chunk=8)
    for b, prompt in enumerate(prompts):
        alone = generate(model, params, [prompt], model.init_cache(1), max_new_tokens=12, sampling=sampling,
                         seed=[seeds[b]], prefill_chunk=8)
        assert alone.row(0) == batch.row(b), b


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama):
    model, params = llama
    prompts = _prompts([9, 14], seed=2)
    hot = Sampling(temperature=1.5)
    run = lambda sampling, seed: generate(model, params, prompts, model.init_cache(2),  # noqa: E731
                                          max_new_tokens=16, sampling=sampling, seed=seed).tokens
    np.testing.assert_array_equal(run(hot, 5), run(hot, 5))
    assert not np.array_equal(run(hot, 5), run(hot, 6))
    np.testing.assert_array_equal(run(Sampling(temperature=1.5, top_k=1), 5), run(Sampling(), 0))


def test_stop_tokens_end_a_row_and_pad_the_rest(llama):
    model, params = llama
    prompts = _prompts([10, 13], seed=4)
    free = generate(model, params, prompts, model.init_cache(2), max_new_tokens=10)
    j = next(j for j in range(2, 10) if free.tokens[0, j] not in free.tokens[0, :j])  # a first occurrence
    stop = int(free.tokens[0, j])
    out = generate(model, params, prompts, model.init_cache(2), max_new_tokens=10, stop_tokens=[stop], pad_id=0)
    assert out.row(0) == free.tokens[0, :j + 1].tolist() and out.stopped[0]
    assert np.all(out.tokens[0, j + 1:] == 0)
    first = [i for i, t in enumerate(free.tokens[1]) if t == stop]
    n = first[0] + 1 if first else 10
    assert out.row(1) == free.tokens[1, :n].tolist() and out.stopped[1] == bool(first)


def test_on_tokens_streams_every_step_in_order(llama):
    model, params = llama
    seen = []
    out = generate(model, params, _prompts([6, 3]), model.init_cache(2), max_new_tokens=7,
                   on_tokens=lambda i, tokens, done: seen.append((int(i), tokens.tolist())))
    assert [i for i, _ in seen] == list(range(7))
    np.testing.assert_array_equal(np.asarray([t for _, t in seen]).T, out.tokens)


def test_full_cache_generation_equals_lambda_cache_when_the_window_covers_everything():
    family, cfg, params = random_model("mpt_biases_qk_ln", seed=1)
    prompts = _prompts([5, 9], seed=6)
    wide = family.model(cfg, AttentionCall(LMInfinite(G, 64)))
    vanilla = family.model(cfg, AttentionCall(Vanilla()))
    a = generate(wide, params, prompts, wide.init_cache(2), max_new_tokens=20)
    b = generate(vanilla, params, prompts, vanilla.init_cache(2, capacity=29), max_new_tokens=20)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_generate_rejects_bad_arguments(llama):
    model, params = llama
    prompts = _prompts([4, 5])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, params, [[1, 2], []], model.init_cache(2), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, prompts, model.init_cache(2), max_new_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        generate(model, params, prompts, model.init_cache(2), max_new_tokens=2, seed=[1, 2, 3])
    for seed in (2**32 + 5, [1, 2**32], -1):  # jax would keep only the low 32 bits: 2**32 + 5 acts as 5
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\]"):
            generate(model, params, prompts, model.init_cache(2), max_new_tokens=2, seed=seed)
    with pytest.raises(ValueError, match="reaches position 2,147,483,650, past the int32 positions"):
        generate(model, params, prompts, model.init_cache(2), max_new_tokens=2**31 - 2)
    with pytest.raises(ValueError, match="1 rows for 2 prompts"):
        generate(model, params, prompts, model.init_cache(1), max_new_tokens=2)
    used = model(params, jnp.asarray([[1, 2]] * 2, jnp.int32), jnp.asarray([[0, 1]] * 2, jnp.int32),
                 model.init_cache(2))[1]
    with pytest.raises(ValueError, match="must be empty"):
        generate(model, params, prompts, used, max_new_tokens=2)
    vanilla = type(model)(model.build, model.config, AttentionCall(Vanilla()))
    with pytest.raises(ValueError, match="holds 8 positions"):
        generate(vanilla, params, prompts, vanilla.init_cache(2, capacity=8), max_new_tokens=4)


def test_left_pad_layout():
    tokens, positions = left_pad([[5, 6, 7], [8]], multiple=4, pad_id=9)
    assert tokens.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert positions.tolist() == [[-1, 0, 1, 2], [-1, -1, -1, 0]]


def _lowered(call: Callable[[], Generation]) -> tuple[Generation, dict[str, str]]:
    """``call()``'s result and the StableHLO text of every program it compiles, by file name."""
    with tempfile.TemporaryDirectory() as folder:
        jax.config.update("jax_dump_ir_to", folder)
        try:
            result = call()
        finally:
            jax.config.update("jax_dump_ir_to", "")
        return result, {p.name: p.read_text() for p in Path(folder).iterdir()}


@pytest.mark.parametrize("n", [2**24, 2**31 - 1])
def test_memory_does_not_grow_with_max_new_tokens(llama, n):
    model, params = llama
    first = generate(model, params, [[5]], model.init_cache(1), max_new_tokens=1).row(0)[0]
    # a fresh callback compiles every program anew; the row stops at its first token
    out, programs = _lowered(lambda: generate(model, params, [[5]], model.init_cache(1), max_new_tokens=n,
                                              stop_tokens=[first], on_tokens=lambda *_: None))
    dims = {int(d) for text in programs.values() for shape in re.findall(r"tensor<((?:\d+x)+)", text)
            for d in shape.split("x") if d}
    assert programs, "nothing was compiled"
    assert max(dims) < n, sorted(programs)  # no array is sized by n
    assert out.row(0) == [first] and out.stopped[0] and out.tokens.shape == (1, 1)


def test_one_program_decodes_every_chunk_for_any_max_new_tokens(llama):
    model, params = llama
    seen = []
    stream = lambda i, tokens, done: seen.append(int(i))  # noqa: E731
    prompts = _prompts([3])
    n = 2 * DECODE_STEPS + 3  # a last chunk of 3 steps
    out, programs = _lowered(lambda: generate(model, params, prompts, model.init_cache(1), max_new_tokens=n,
                                              on_tokens=stream))
    assert sum("decode" in name for name in programs) == 1, sorted(programs)
    assert seen == list(range(n)) and out.tokens.shape == (1, n) and out.lengths[0] == n
    short, again = _lowered(lambda: generate(model, params, prompts, model.init_cache(1), max_new_tokens=5,
                                             on_tokens=stream))
    assert again == {} and short.row(0) == out.row(0)[:5]  # another max_new_tokens compiles nothing


def test_the_prompt_end_runs_the_head_on_the_last_position_only():
    """The prefill plans one row of logits per prompt, not the last chunk's ``B x chunk x vocab`` floats."""
    family = registry.FAMILIES["llama"]
    cfg = family.config_from_hf({"model_type": "llama", "vocab_size": 32000, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})
    params = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0)))
    model = family.model(cfg, AttentionCall(LMInfinite(G, 64)))
    batch, chunk = 2, 256
    tokens = jax.ShapeDtypeStruct((batch, 2 * chunk), jnp.int32)
    prefill = decoding._prefill.lower(model, model, params, tokens, tokens, jax.eval_shape(lambda: model.init_cache(2)),
                                      chunk=chunk)
    assert prefill.compile().memory_analysis().temp_size_in_bytes < batch * chunk * cfg.vocab_size * 4 / 4
