"""Next-token scores without the ``(T, vocab)`` logits.

Perplexity, streaming NLL and lm-eval's log-likelihoods need, per position, one number: the
log-probability of the token that follows (lm-eval also whether it is the argmax). A model's
logits at 128k tokens and a 32k vocabulary are 16.8 GB of float32; `head_scores` instead applies
the model's head (final norm, projection, any soft cap: a callable) to a chunk of positions at a
time in a `lax.map`, so that only about ``chunk x vocab`` logits exist at once (``chunk`` tokens,
rows x positions). `token_scores` is the arithmetic on one block of logits (float32 log-sum-exp),
shared by every path that scores tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lminf_jax.loop_slice import loop_slice

__all__ = ["HEAD_CHUNK", "Scores", "head_scores", "token_scores"]

#: Tokens (rows x positions) per head call in `head_scores`: logits of ``HEAD_CHUNK x vocab`` floats at
#: once (66 MB at a 32k vocabulary, 0.5 GB at Gemma's 256k; the matrix product stays large).
HEAD_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Scores:
    """Per position, of its target token: ``logprobs`` float32 (nats), ``entropy`` float32 of the whole
    next-token distribution (nats) and ``top1`` bool (the target is the argmax: greedy decoding's pick)."""

    logprobs: jax.Array
    entropy: jax.Array
    top1: jax.Array


jax.tree_util.register_dataclass(Scores, data_fields=["logprobs", "entropy", "top1"], meta_fields=[])


def token_scores(logits: jax.Array, targets: jax.Array) -> Scores:
    """`Scores` of ``targets (...)`` under ``logits (..., V)``, in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = logits - lse[..., None]
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    return Scores(picked - lse, entropy, jnp.argmax(logits, axis=-1) == targets)


def head_scores(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, *,
                chunk: int = HEAD_CHUNK) -> Scores:
    """`Scores` ``(B, T)`` of ``targets (B, T)`` under ``head(hidden[:, a:b]) -> logits (B, b - a, V)``, about
    ``chunk`` tokens per call of the head: ``max(1, chunk // B)`` positions (the last call ends at T,
    overlapping its predecessor). Unused fields (under jit) are not computed."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    b, t = targets.shape
    c = min(max(1, chunk // b), t)
    starts = jnp.minimum(jnp.arange(-(-t // c)) * c, t - c)

    def one(start: jax.Array) -> Scores:  # only the chunk of `hidden` is converted, in the loop (`loop_slice`)
        return token_scores(head(loop_slice(hidden, start, c, axis=1)),
                            lax.dynamic_slice_in_dim(targets, start, c, axis=1))

    return jax.tree.map(lambda x: _unchunk(x, t), lax.map(one, starts))


def _unchunk(x: jax.Array, t: int) -> jax.Array:
    """``(n, B, c)`` of chunks starting at ``min(i * c, t - c)`` as ``(B, t)``."""
    n, b, c = x.shape
    x = jnp.moveaxis(x, 0, 1)
    return jnp.concatenate([x[:, :-1].reshape(b, (n - 1) * c), x[:, -1, n * c - t:]], axis=1)
