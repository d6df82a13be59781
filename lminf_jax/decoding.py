"""Generation: chunked prefill in one jitted call, then jitted calls of `DECODE_STEPS` tokens each.

Model-agnostic: it drives a *step* with the contract

    step(params, tokens (B, T) int32, positions (B, T) int32, cache) -> (logits (B, T, V) float32, cache)

(`models.decoder.LanguageModel` is one), which must be hashable (a jit static argument). A step
may also offer ``step.last_logits(params, tokens, positions, cache) -> (logits (B, V), cache)``, the
logits of each row's last token only: the prompt's last chunk then runs the head on one position per
row instead of ``(B, T, V)`` (the other chunks' logits are unused, and XLA drops their head).
Prompts of different lengths are left-padded (padding has negative positions, so it is
never attended and never written to the cache); every row then continues at its own
position. Each row samples with its own PRNG key, so a row's output does not depend on
the other rows of the batch. Decoding stops once every row has stopped: nothing is sized by
``max_new_tokens``, so with a Λ-cache memory stays flat however many tokens are asked for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from lminf_jax.cache import KVCache
from lminf_jax.sampling import Sampling, sample
from lminf_jax.int32 import INT32_MAX

UINT32_MAX = 2**32 - 1
#: Decoding steps per jitted call (one compiled program serves every call, the last one included).
DECODE_STEPS = 128


class Step(Protocol):
    def __call__(self, params: Any, tokens: jax.Array, positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]: ...


#: ``on_tokens(index, tokens (B,), done (B,))`` receives each generated step as it happens.
TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated ``tokens (B, steps)`` (``steps`` = the longest row, at most ``max_new_tokens``;
    ``pad_id`` after a row stopped), per-row ``lengths`` (stop token included) and whether each
    row ended on a stop token."""

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
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    The prompts run in one jitted call, then the decoding in calls of `DECODE_STEPS` steps until
    every row stopped or ``max_new_tokens`` is reached: no buffer is sized by ``max_new_tokens``
    (with a Λ-cache, memory does not grow with it) and one program serves every chunk.

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
    check_positions(longest, max_new_tokens)
    chunk = min(prefill_chunk, max(longest, 1))
    tokens, positions = left_pad(prompts, chunk, pad_id)
    batch = tokens.shape[0]
    _check_cache(cache, batch, longest + max_new_tokens)
    keys = _row_keys(seed, batch)
    stops = tuple(int(t) for t in stop_tokens)
    state = _prefill(step, prefill_step or step, params, jnp.asarray(tokens), jnp.asarray(positions), cache,
                     chunk=chunk)
    pieces = []
    for start in range(0, max_new_tokens, DECODE_STEPS):
        out, state = _decode(step, params, keys, state, jnp.int32(start), jnp.int32(max_new_tokens),
                             sampling=sampling, stop_tokens=stops, pad_id=pad_id, on_tokens=on_tokens)
        pieces.append(out)
        if bool(state.done.all()):
            break
    lengths, stopped = np.asarray(state.lengths), np.asarray(state.done)
    return Generation(np.concatenate(pieces, axis=1)[:, :lengths.max()], lengths, stopped)


def check_positions(longest: int, max_new_tokens: int) -> None:
    """Raise a ValueError when the last generated token's position would pass int32."""
    if longest + max_new_tokens - 1 > INT32_MAX:
        raise ValueError(f"the longest prompt ({longest:,} tokens) plus max_new_tokens ({max_new_tokens:,}) reaches "
                         f"position {longest + max_new_tokens - 1:,}, past the int32 positions' 2**31 - 1")


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


class _Decoding(NamedTuple):
    """What one decoding call hands the next: the cache, each row's last logits ``(B, V)``, next
    position, length so far and whether it stopped."""

    cache: KVCache
    logits: jax.Array
    next_pos: jax.Array
    lengths: jax.Array
    done: jax.Array


@functools.partial(jax.jit, static_argnames=("step", "prefill_step", "chunk"))
def _prefill(step, prefill_step, params, tokens, positions, cache, *, chunk) -> _Decoding:
    """The left-padded prompts through the model, ``chunk`` tokens per call (a `lax.scan`)."""
    batch, width = tokens.shape
    split = lambda x: x.reshape(batch, width // chunk, chunk).swapaxes(0, 1)  # noqa: E731
    chunks, chunk_positions = split(tokens), split(positions)

    def prefill(cache, xs):
        return prefill_step(params, xs[0], xs[1], cache)[1], None

    cache, _ = lax.scan(prefill, cache, (chunks[:-1], chunk_positions[:-1]))
    logits, cache = _last_logits(step, params, chunks[-1], chunk_positions[-1], cache)
    return _Decoding(cache, logits, jnp.max(positions, axis=1) + 1, jnp.zeros((batch,), jnp.int32),
                     jnp.zeros((batch,), bool))


def _last_logits(step, params, tokens, positions, cache) -> tuple[jax.Array, Any]:
    """The logits ``(B, V)`` of each row's last token and the cache: by ``step.last_logits`` when the step
    offers it, else the last column of the step's logits."""
    last = getattr(step, "last_logits", None)
    if last is not None:
        return last(params, tokens, positions, cache)
    logits, cache = step(params, tokens, positions, cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("step", "sampling", "stop_tokens", "pad_id", "on_tokens"),
                   donate_argnames="state")
def _decode(step, params, keys, state, start, limit, *, sampling, stop_tokens, pad_id, on_tokens):
    """Steps ``start .. start + DECODE_STEPS - 1`` (a `lax.while_loop`): ``(tokens (B, DECODE_STEPS), state)``.
    Steps from ``limit`` (max_new_tokens) on, or after every row stopped, are not run (``pad_id``)."""
    batch = keys.shape[0]
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def body(carry):
        i, out, (cache, logits, next_pos, lengths, done) = carry
        token = sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full((batch,), i)), sampling)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, i - start].set(token)
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(token, stops)
        if on_tokens is not None:
            io_callback(on_tokens, None, i, token, done, ordered=True)

        def advance(cache):
            logits, cache = step(params, token[:, None], next_pos[:, None], cache)
            return logits[:, 0], cache

        more = (i + 1 < limit) & ~jnp.all(done)
        logits, cache = lax.cond(more, advance, lambda c: (logits, c), cache)
        return i + 1, out, _Decoding(cache, logits, next_pos + 1, lengths, done)

    def cond(carry):
        i, _, state = carry
        return (i - start < DECODE_STEPS) & (i < limit) & ~jnp.all(state.done)

    out = jnp.full((batch, DECODE_STEPS), pad_id, jnp.int32)
    _, out, state = lax.while_loop(cond, body, (start, out, state))
    return out, state
