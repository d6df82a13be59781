"""Generation inside one jitted call: chunked prefill, then a `lax.while_loop` over tokens.

Model-agnostic: it drives a *step* with the contract

    step(params, tokens (B, T) int32, positions (B, T) int32, cache) -> (logits (B, T, V) float32, cache)

(`models.decoder.LanguageModel` is one), which must be hashable (a jit static argument).
Prompts of different lengths are left-padded (padding has negative positions, so it is
never attended and never written to the cache); every row then continues at its own
position. Each row samples with its own PRNG key, so a row's output does not depend on
the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from lminf_jax.cache import KVCache
from lminf_jax.sampling import Sampling, sample
from lminf_jax.spec import INT32_MAX

UINT32_MAX = 2**32 - 1


class Step(Protocol):
    def __call__(self, params: Any, tokens: jax.Array, positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]: ...


#: ``on_tokens(index, tokens (B,), done (B,))`` receives each generated step as it happens.
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated ``tokens (B, max_new_tokens)`` (``pad_id`` after a row stopped), per-row
    ``lengths`` (stop token included) and whether each row ended on a stop token."""

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def row(self, b: int) -> list[int]:
        """Row ``b``'s generated tokens, without the padding after it stopped."""
        return self.tokens[b, : self.lengths[b]].tolist()


def left_pad(prompts: Sequence[Sequence[int]], multiple: int = 1, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length (a multiple of ``multiple``); return tokens and
    positions ``(B, T)`` int32 with ``-1`` on the padding."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    lengths = [len(p) for p in prompts]
    for b, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {b} is empty: every prompt needs at least one token (e.g. BOS)")
    width = -(-max(lengths) // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = np.asarray(p, np.int32)
        positions[b, width - len(p):] = np.arange(len(p), dtype=np.int32)
    return tokens, positions


def generate(
    step: Step,
    params: Any,
    prompts: Sequence[Sequence[int]],
    cache: KVCache,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int = 512,
    prefill_step: Step | None = None,
    pad_id: int = 0,
    on_tokens: TokenCallback | None = None,
) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens in one jitted call.

    Args:
      step: the model step (see the module docstring); ``params`` its parameters.
      prompts: token id lists, any lengths >= 1 (left-padded here).
      cache: an empty cache for ``len(prompts)`` rows (a Λ-cache or a full cache with room
        for the longest prompt plus ``max_new_tokens``).
      sampling: greedy (default), temperature, top-k, top-p.
      seed: one int (row ``b`` uses ``fold_in(key(seed), b)``) or one int per row (a row
        then samples the same tokens whatever batch it is in).
      stop_tokens: a row stops after emitting any of these (it is included in its output).
      prefill_chunk: prompt tokens per prefill call (the prompt is processed in a
        `lax.scan` over chunks; the last chunk holds the prompt's end).
      prefill_step: the step for all chunks but the last (default ``step``). Pass the model
        without top-k middle tokens so that they apply only at the prompt's end, as in one
        forward pass over the prompt.
      on_tokens: called from inside the loop (``io_callback``) with each step's tokens,
        e.g. to stream text. A new function object means a new compilation.
    """
    for name, n in (("max_new_tokens", max_new_tokens), ("prefill_chunk", prefill_chunk)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens - 1 > INT32_MAX:
        raise ValueError(f"the longest prompt ({longest:,} tokens) plus max_new_tokens ({max_new_tokens:,}) reaches "
                         f"position {longest + max_new_tokens - 1:,}, past the int32 positions' 2**31 - 1")
    chunk = min(prefill_chunk, max(longest, 1))
    tokens, positions = left_pad(prompts, chunk, pad_id)
    batch = tokens.shape[0]
    _check_cache(cache, batch, longest + max_new_tokens)
    keys = _row_keys(seed, batch)
    stops = tuple(int(t) for t in stop_tokens)
    out, lengths, stopped = _generate(
        step, prefill_step or step, params, jnp.asarray(tokens), jnp.asarray(positions), cache, keys,
        max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stops, chunk=chunk, pad_id=pad_id,
        on_tokens=on_tokens,
    )
    return Generation(np.asarray(out), np.asarray(lengths), np.asarray(stopped))


def _check_cache(cache: KVCache, batch: int, needed: int) -> None:
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.positions.shape[0] != batch:
        raise ValueError(f"cache holds {cache.positions.shape[0]} rows for {batch} prompts")
    if not isinstance(cache.positions, jax.core.Tracer) and bool(jnp.any(cache.positions >= 0)):
        raise ValueError("cache must be empty: generate starts every row at position 0")
    if not cache.bounded and cache.slots < needed:
        raise ValueError(f"the full cache holds {cache.slots} positions but the longest prompt plus "
                         f"max_new_tokens needs {needed}")


def _row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
    """One key per row; seeds are 32-bit (a larger one would silently lose its high bits)."""
    def is_seed(s) -> bool:
        return isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s <= UINT32_MAX

    if is_seed(seed):
        return jax.vmap(lambda b: jax.random.fold_in(jax.random.key(int(seed)), b))(jnp.arange(batch))
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    if len(seeds) != batch or not all(map(is_seed, seeds)):
        raise ValueError(f"seed must be an integer in [0, 2**32 - 1] or one per prompt ({batch}), got {seed!r}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


@functools.partial(jax.jit, static_argnames=(
    "step", "prefill_step", "max_new_tokens", "sampling", "stop_tokens", "chunk", "pad_id", "on_tokens"))
def _generate(step, prefill_step, params, tokens, positions, cache, keys, *, max_new_tokens, sampling,
              stop_tokens, chunk, pad_id, on_tokens):
    batch, width = tokens.shape
    split = lambda x: x.reshape(batch, width // chunk, chunk).swapaxes(0, 1)  # noqa: E731
    chunks, chunk_positions = split(tokens), split(positions)

    def prefill(cache, xs):
        return prefill_step(params, xs[0], xs[1], cache)[1], None

    cache, _ = lax.scan(prefill, cache, (chunks[:-1], chunk_positions[:-1]))
    logits, cache = step(params, chunks[-1], chunk_positions[-1], cache)
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def body(state):
        i, cache, logits, next_pos, out, lengths, done = state
        token = sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full((batch,), i)), sampling)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, i].set(token)
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(token, stops)
        if on_tokens is not None:
            io_callback(on_tokens, None, i, token, done, ordered=True)

        def advance(cache):
            logits, cache = step(params, token[:, None], next_pos[:, None], cache)
            return logits[:, 0], cache

        more = (i + 1 < max_new_tokens) & ~jnp.all(done)
        logits, cache = lax.cond(more, advance, lambda c: (logits, c), cache)
        return i + 1, cache, logits, next_pos + 1, out, lengths, done

    def cond(state):
        i, *_, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    state = (
        jnp.int32(0), cache, logits[:, -1], jnp.max(positions, axis=1) + 1,
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    _, _, _, _, out, lengths, done = lax.while_loop(cond, body, state)
    return out, lengths, done
