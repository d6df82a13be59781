"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p), in Hugging Face order.

Logits are divided by the temperature, then only the ``top_k`` highest are kept, then
the nucleus: the smallest set of most likely tokens whose cumulative probability (under
the distribution renormalised over the tokens top-k kept) reaches ``top_p``; the most
likely token is always kept. A token is then drawn from the renormalised distribution.
Temperature 0 means greedy decoding (argmax, lowest index on ties) and ignores the keys,
``top_k`` and ``top_p``.

Both filters cut at a logit value, so tokens tied with the last kept one are kept too
(top-k may keep more than k tokens on ties). Logits of ``-inf`` (a masked vocabulary)
are never drawn. A row with no finite logit has no defined sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. Hashable (usable as a jit static argument).

    temperature: 0 for greedy, else a finite positive divisor of the logits.
    top_k: keep the k highest logits (None: no top-k filter).
    top_p: nucleus mass in (0, 1] (None or 1: no nucleus filter).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
            object.__setattr__(self, "top_k", int(k))
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
                raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")
            object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        """True for temperature 0 (argmax decoding)."""
        return self.temperature == 0.0

    def describe(self) -> str:
        """Short human-readable form, e.g. ``"greedy"`` or ``"temperature=0.8, top_k=40"``."""
        if self.greedy:
            return "greedy"
        parts = [f"temperature={self.temperature}"]
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k}")
        if self.top_p is not None:
            parts.append(f"top_p={self.top_p}")
        return ", ".join(parts)


def _check_sampling(sampling: object) -> None:
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")


def _check_logits(logits: jax.Array) -> None:
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a floating array, got dtype {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary axis, got shape {logits.shape}")


@functools.partial(jax.jit, static_argnames="sampling")
def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 logits ``(..., V)`` after temperature, top-k and top-p; removed tokens are -inf.

    Under greedy sampling only the argmax (lowest index on ties) is kept, unscaled.
    """
    _check_sampling(sampling)
    logits = jnp.asarray(logits)
    _check_logits(logits)
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    if sampling.greedy:
        best = jnp.argmax(x, axis=-1, keepdims=True)
        return jnp.where(jnp.arange(vocab) == best, x, -jnp.inf)
    x = x / sampling.temperature
    ranked = None  # highest logits, descending: the candidates for the nucleus
    if sampling.top_k is not None and sampling.top_k < vocab:
        ranked = jax.lax.top_k(x, sampling.top_k)[0]
        x = jnp.where(x >= ranked[..., -1:], x, -jnp.inf)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        if ranked is None:
            ranked = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
        # Probabilities over every token still kept (ties beyond the top-k values included).
        probs = jnp.exp(ranked - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        cumulative = jnp.cumsum(probs, axis=-1)
        mass_before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1)
        # A token is in the nucleus iff the more likely tokens hold less than top_p.
        threshold = jnp.min(jnp.where(mass_before < sampling.top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, -jnp.inf)
    return x


@functools.partial(jax.jit, static_argnames="sampling")
def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 token ids ``(B,)`` drawn from logits ``(B, V)``, row b with ``keys[b]`` only.

    ``keys``: one PRNG key per row, typed ``(B,)`` (``jax.random.key``) or raw ``(B, 2)``
    uint32 (``jax.random.PRNGKey``). Greedy sampling ignores the keys' values.
    """
    _check_sampling(sampling)
    logits, keys = jnp.asarray(logits), jnp.asarray(keys)
    _check_logits(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got shape {logits.shape}")
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.ndim != (1 if typed else 2) or keys.shape[0] != logits.shape[0]:
        raise ValueError(
            f"keys must hold one PRNG key per row of logits {logits.shape}: typed (B,) or raw (B, 2); "
            f"got shape {keys.shape}, dtype {keys.dtype}"
        )
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
