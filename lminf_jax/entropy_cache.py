"""SirLLM: a bounded KV cache that keeps the most surprising tokens, decoding token by token.

SirLLM (Yao, Li, Zhao, "SirLLM: Streaming Infinite Retentive LLM", ACL 2024; official code
`Zoeyyao27/SirLLM <https://github.com/Zoeyyao27/SirLLM>`_ @ 4c95578, ``sir_llm/kv_cache.py`` and
``sir_llm/eval_utils.py``) keeps StreamingLLM's attention sinks and recent tokens, plus the tokens of
highest *token entropy* (surprisal), in a cache of ``S = G + R + E`` slots whose positions are the
slot indices (pos-shift). The algorithm transcribed here is the one of the project's reference,
``retrieval-methods.md`` §3 (§3.3 the code's exact rule, §3.4 the decode-time choices, §3.5 the
invariants the tests check).

The eviction rule, before every model call of ``m`` tokens (the code's
``evict_for_space_token_entropy``): when ``len(cache) + m > S``, keep the ``k = E - m`` slots of highest
score (a stable sort: among equal scores the older slot wins; ``k < 0`` keeps none), the sinks
``0..G-1``, and then the most recent slots (newest first, down to slot 1) until ``S - m`` are kept;
the kept slots stay in chronological order (`keep_slots`).

The library's choices:

* **Token score.** The paper's surprisal ``e_i = -log softmax(z_{i-1})[x_i]``: the logits of the
  previous position, the one that predicted the token (for the first token of a call, the last logits
  of the call before). The first token of a prompt, which nothing predicts, gets the maximum score of
  its turn, as the code's first token does (a one-token first turn has nothing else: it takes its own
  ``-log softmax(z_0)[x_0]``, what the code gives it). ``SirLLM(code_scores=True)`` reproduces the
  code's ``_cal_selfinfo`` for comparisons: ``raw_i = -log softmax(z_i)[x_i]`` (the logits at the
  token's *own* position), ``e_0 = max_i raw_i`` and ``e_i = raw_{i-1}``, an off-by-one of the code
  (§3.3). Scores are float32, per token, shared by all layers and heads (`turn_scores`).
* **Eviction unit.** The rule runs before every model call: each prompt turn of ``turn`` tokens
  (``m`` = its tokens) and each generated token (``m = 1``). Evicting before every token keeps the cache
  bounded at ``S`` slots during generation (the code scores whole turns in one pass and has no
  generation loop). The scores decay by ``rho`` (``decay``) once per **round**, a call of
  `sirllm_generate` continuing a previous state (the first round does not decay), after that round's
  first eviction as in the code's order (evict, then decay, then append the new scores): decaying per
  generated token would change what ``rho`` means (the paper decays once per dialogue round).
* **Positions.** pos-shift, as the code: a cached token sits at its slot index (contiguous,
  chronological), a call's token ``i`` at ``len(cache) + i``; a negative position is padding, never
  attended nor written. lminf_jax caches store keys *rotated* at their position under RoPE with fixed
  frequencies (``KVCache.rotated``), so compaction rotates each kept key by ``new - old`` positions (one
  float32 rotation, without RoPE's attention scaling; a key that does not move is left bit-identical).
  The code instead keeps keys un-rotated and rotates them by cache index at every call; here each move
  rounds once to the cache's dtype: negligible in float32 (the tests match StreamingLLM to 1e-5), but a
  bfloat16 cache gathers about one bfloat16 rounding per move of a key, so prefer a float32 cache for
  long streams. An un-rotated cache (ALiBi, dynamic NTK) only changes positions.
* **Batches.** Eviction decisions are per batch row (rows are different prompts: each has its own
  count, positions and scores) and shared by all layers and heads (one token-level decision per model,
  as the code). A row's prompt is cut into turns from its start, so a row's output does not depend
  on the other rows; a row whose prompt has ended idles (``m = 0``: no eviction) until the longest
  prompt has run.
* **Sizes.** ``turn <= R + E``, so that after an eviction (which keeps at least the sinks) a turn
  always fits ``S`` slots. `SirLLM.for_model` takes ``R = L_train // 4``, ``E = L_train // 2``,
  ``turn = R // 2`` (the library's choice: ``S = 4 + 3 L_train / 4``, so every position stays below
  ``L_train`` from ``L_train = 16`` on); the dataclass defaults are the code's argparse defaults
  (``G = 4``, ``R = E = 1000``, ``rho = 1``) with ``turn = R // 2 = 500``.

Decoding is greedy (argmax) with a Python loop over turns and generated tokens; each call (eviction,
compaction, decay, the model step, scoring) is one jitted program. The first token of a round is chosen
from the last logits of its prompt (or, with an empty prompt, of the previous round), and every generated
token is fed back, so the returned `EntropyCache` holds the whole round and continues it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention_decode import rotates_keys
from lminf_jax.cache import KVCache
from lminf_jax.decoding import Generation, Step
from lminf_jax.int32 import INT32_MAX, require_int32
from lminf_jax.rope import rope_angles, rotate
from lminf_jax.scores import Positional

__all__ = ["EntropyCache", "SirLLM", "compact", "keep_slots", "sirllm_generate", "sirllm_surprisal", "turn_scores"]


@dataclasses.dataclass(frozen=True)
class SirLLM:
    """SirLLM's policy: ``sinks`` G, ``recent`` R, ``entropy`` E (the cache has ``S = G + R + E`` slots),
    the per-round score ``decay`` rho in [0, 1], prompt ``turn`` length (``1 <= turn <= R + E``) and
    ``code_scores`` (the official code's misaligned scores instead of the paper's). Frozen and hashable
    (a jit static argument); a bad field is a ValueError naming it."""

    sinks: int = 4
    recent: int = 1000
    entropy: int = 1000
    decay: float = 1.0
    turn: int = 500
    code_scores: bool = False

    def __post_init__(self) -> None:
        require_int32("sinks", self.sinks, 0)
        require_int32("recent", self.recent, 0)
        require_int32("entropy", self.entropy, 0)
        if self.recent + self.entropy < 1:
            raise ValueError(f"recent + entropy must be >= 1 (room beyond the sinks), got {self.recent} + "
                             f"{self.entropy}")
        if self.size > INT32_MAX:
            raise ValueError(f"sinks + recent + entropy (the cache's slots, int32) must be <= {INT32_MAX}, got "
                             f"{self.size}")
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        object.__setattr__(self, "decay", float(decay))
        require_int32("turn", self.turn, 1)
        if self.turn > self.recent + self.entropy:
            raise ValueError(f"turn must be <= recent + entropy = {self.recent + self.entropy} (a turn must fit "
                             f"the cache beside the sinks), got {self.turn}")
        if not isinstance(self.code_scores, bool):
            raise ValueError(f"code_scores must be a bool, got {self.code_scores!r}")

    @property
    def size(self) -> int:
        """``S = G + R + E``: the cache's slots."""
        return self.sinks + self.recent + self.entropy

    @property
    def score_bytes(self) -> int:
        """Bytes of the surprisal kept beside the cache (float32 per slot, batch 1)."""
        return 4 * self.size

    @classmethod
    def for_model(cls, pretraining_length: int, **fields: Any) -> SirLLM:
        """The library's defaults for a model pretrained at ``pretraining_length`` (L_train >= 8):
        ``recent = L_train // 4``, ``entropy = L_train // 2``, ``turn = max(recent // 2, 1)`` (positions stay
        below ``S = sinks + 3 L_train / 4 <= L_train``); ``fields`` override any field."""
        require_int32("pretraining_length", pretraining_length, 8)
        recent = fields.get("recent", pretraining_length // 4)
        turn = max(recent // 2, 1) if isinstance(recent, int) and not isinstance(recent, bool) else 1
        return cls(**{"recent": recent, "entropy": pretraining_length // 2, "turn": turn, **fields})


@dataclasses.dataclass(frozen=True)
class EntropyCache:
    """SirLLM's state: ``cache`` a full `KVCache` of ``S`` slots (slot = position, the held tokens in
    slots ``0..count-1``), ``scores (B, S)`` float32 per slot (0 where empty), ``count (B,)`` int32
    tokens held per row, and ``logits (B, V)`` float32, each row's logits after its last token (what
    the next token is chosen from and scored by)."""

    cache: KVCache
    scores: jax.Array
    count: jax.Array
    logits: jax.Array

    @property
    def slots(self) -> int:
        """``S``, the slots per row."""
        return self.cache.slots


jax.tree_util.register_dataclass(EntropyCache, data_fields=["cache", "scores", "count", "logits"], meta_fields=[])


def keep_slots(scores: jax.Array, count: jax.Array, m: int | jax.Array, policy: SirLLM) -> jax.Array:
    """The slots ``(B, S)`` bool kept before a call of ``m`` tokens (an int or one per row): SirLLM's
    rule (module docstring) where ``count + m > S``, else every held slot. ``scores (B, S)``,
    ``count (B,)`` held slots per row (slots ``0..count-1``). Jittable."""
    scores = jnp.asarray(scores, jnp.float32)
    b, s = scores.shape
    if s != policy.size:
        raise ValueError(f"scores have {s} slots but the policy's cache has S = {policy.size}")
    count = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (b,))[:, None]
    m = jnp.broadcast_to(jnp.asarray(m, jnp.int32), (b,))[:, None]
    slot = jnp.arange(s, dtype=jnp.int32)[None]
    held = slot < count
    # top k = E - m by score, descending and stable (the older of equal scores first); empty slots last
    key = jnp.where(held, -scores, jnp.inf)
    key = jnp.where(key == 0, 0.0, key)  # -0.0 and 0.0 are equal scores
    order = jnp.argsort(key, axis=1, stable=True)
    rank = jnp.zeros((b, s), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.broadcast_to(slot, (b, s)))
    keep = held & ((rank < policy.entropy - m) | (slot < policy.sinks))
    # then the newest slots down to slot 1 that are not kept yet, while fewer than S - m are kept
    candidate = held & ~keep & (slot >= 1)
    from_newest = jnp.cumsum(candidate[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
    room = s - m - jnp.sum(keep, axis=1, keepdims=True)
    keep = keep | (candidate & (from_newest <= room))
    return jnp.where(count + m > s, keep, held)


def compact(cache: KVCache, keep: jax.Array, positional: Positional = None) -> tuple[KVCache, jax.Array]:
    """``cache`` (slot = position) with only the slots ``keep (B, S)`` held, moved in order to slots
    (and positions) ``0..kept-1``; empty slots zeroed at position -1. Keys stored rotated
    (``cache.rotated``) are rotated by ``new - old`` position (``positional`` must then be RoPE with
    fixed frequencies). Also returns ``source (B, S)``, the old slot of each new slot."""
    if cache.rotated and not rotates_keys(positional):
        raise ValueError("cache.rotated: compaction re-rotates the keys and needs positional, the model's RoPE "
                         "with fixed frequencies (model.decoder().positional)")
    b, s = keep.shape
    slot = jnp.arange(s, dtype=jnp.int32)[None]
    # the kept slots first, in order
    source = jnp.argsort((~keep).astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
    filled = slot < jnp.sum(keep, axis=1, keepdims=True)
    old = jnp.take_along_axis(cache.positions, source, axis=1)
    index = source[None, :, None, :, None]  # over (layers, B, Hkv, S, d)
    keys = jnp.take_along_axis(cache.keys, index, axis=3)
    if cache.rotated:
        # rotate back by old - new >= 0: cos exactly 1 and sin 0 for a key that does not move
        angles = rope_angles(jnp.where(filled, old - slot, 0), positional.inv_freq)[None, :, None]
        keys = rotate(keys, jnp.cos(angles), -jnp.sin(angles), positional.layout)
    blank = ~filled[None, :, None, :, None]
    keys = jnp.where(blank, jnp.zeros((), keys.dtype), keys)
    values = jnp.where(blank, jnp.zeros((), cache.values.dtype), jnp.take_along_axis(cache.values, index, axis=3))
    positions = jnp.where(filled, slot, -1)
    return dataclasses.replace(cache, keys=keys, values=values, positions=positions), source


def turn_scores(logits: jax.Array, tokens: jax.Array, m: jax.Array, previous: jax.Array, started: jax.Array, *,
                code_scores: bool = False) -> jax.Array:
    """The scores ``(B, T)`` float32 of one call's tokens (0 past each row's ``m``) from its ``logits
    (B, T, V)``: the paper's ``-log softmax(z_{i-1})[x_i]``, with ``previous (B, V)`` the logits before
    the call for rows that ``started (B,)`` and the turn's maximum for a row's first token; or, with
    ``code_scores``, the official code's misaligned scores (module docstring)."""
    logits = logits.astype(jnp.float32)
    t = tokens.shape[1]
    in_turn = jnp.arange(t)[None] < jnp.asarray(m)[:, None]
    lse = jax.nn.logsumexp(logits, axis=-1)
    own = lse - jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]  # -log softmax(z_i)[x_i]
    if code_scores:
        first = jnp.max(jnp.where(in_turn, own, -jnp.inf), axis=1)
        later = own[:, :-1]
    else:
        later = lse[:, :-1] - jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        previous = previous.astype(jnp.float32)
        predicted = jax.nn.logsumexp(previous, axis=-1) - jnp.take_along_axis(previous, tokens[:, :1], axis=-1)[:, 0]
        top = jnp.max(jnp.where(in_turn[:, 1:], later, -jnp.inf), axis=1, initial=-jnp.inf)
        first = jnp.where(started, predicted, jnp.where(jnp.asarray(m) >= 2, top, own[:, 0]))
    return jnp.where(in_turn, jnp.concatenate([first[:, None], later], axis=1), 0.0)


def _advance(step: Step, policy: SirLLM, positional: Positional, params: Any, cache: KVCache, scores: jax.Array,
             count: jax.Array, previous: jax.Array | None, tokens: jax.Array, m: jax.Array, rho: jax.Array
             ) -> tuple[EntropyCache, jax.Array]:
    """One model call of ``tokens (B, T)``, the first ``m (B,)`` of each row real: evict, compact,
    decay by ``rho``, run the step at pos-shift positions, append the new tokens' scores; returns the state
    and those scores ``(B, T)`` (0 past ``m``)."""
    b, t = tokens.shape
    s = policy.size
    keep = keep_slots(scores, count, m, policy)
    cache, source = compact(cache, keep, positional)
    count = jnp.sum(keep, axis=1, dtype=jnp.int32)
    slot = jnp.arange(s, dtype=jnp.int32)[None]
    scores = jnp.where(slot < count[:, None], jnp.take_along_axis(scores, source, axis=1), 0.0) * rho
    offsets = jnp.arange(t, dtype=jnp.int32)[None]
    real = offsets < m[:, None]
    positions = jnp.where(real, count[:, None] + offsets, -1)
    logits, cache = step(params, tokens, positions, cache)
    logits = logits.astype(jnp.float32)
    started = jnp.full((b,), previous is not None)
    previous = jnp.zeros_like(logits[:, 0]) if previous is None else previous
    new = turn_scores(logits, tokens, m, previous, started, code_scores=policy.code_scores)
    scores = scores.at[jnp.arange(b)[:, None], jnp.where(real, positions, s)].set(new, mode="drop")
    last = jnp.take_along_axis(logits, jnp.maximum(m - 1, 0)[:, None, None], axis=1)[:, 0]
    last = jnp.where((m > 0)[:, None], last, previous)
    return EntropyCache(cache, scores, count + m, last), new


_advance_jit = jax.jit(_advance, static_argnames=("step", "policy", "positional"))


@functools.partial(jax.jit, static_argnames=("step", "policy", "positional", "stop_tokens", "pad_id"))
def _decode(step, policy, positional, params, state: EntropyCache, done, lengths, index, rho, *, stop_tokens,
            pad_id):
    """One greedy token per row from ``state.logits`` (``pad_id`` for rows already ``done``), then that
    token through `_advance` (``m = 0`` for done rows)."""
    token = jnp.where(done, pad_id, jnp.argmax(state.logits, axis=-1).astype(jnp.int32))
    lengths = jnp.where(done, lengths, index + 1)
    m = jnp.where(done, 0, 1).astype(jnp.int32)
    done = done | jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32))
    state, _ = _advance(step, policy, positional, params, state.cache, state.scores, state.count, state.logits,
                        token[:, None], m, rho)
    return token, done, lengths, state


def _feed(step: Step, policy: SirLLM, positional: Positional, params: Any, prompts: list[list[int]], kv: KVCache,
          state: EntropyCache | None, rho: float, pad_id: int) -> tuple[EntropyCache | None, np.ndarray]:
    """Each row's tokens in turns of ``policy.turn`` (one call per turn, all rows together; the first call
    decays by ``rho``): the state after them and every fed token's score ``(B, longest)`` (0 past a row's end)."""
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    width = min(policy.turn, longest)
    fed = []
    for start in range(0, longest, policy.turn):
        tokens = np.full((batch, width), pad_id, np.int32)
        m = np.zeros(batch, np.int32)
        for b, p in enumerate(prompts):
            piece = p[start:start + policy.turn]
            tokens[b, :len(piece)], m[b] = piece, len(piece)
        parts = (kv, jnp.zeros((batch, policy.size), jnp.float32), jnp.zeros((batch,), jnp.int32), None) \
            if state is None else (state.cache, state.scores, state.count, state.logits)
        state, new = _advance_jit(step, policy, positional, params, *parts, jnp.asarray(tokens), jnp.asarray(m),
                                  jnp.float32(rho))
        fed.append(np.asarray(new)[:, :min(policy.turn, longest - start)])
        rho = 1.0
    return state, np.concatenate(fed, axis=1) if fed else np.zeros((batch, 0), np.float32)


def sirllm_surprisal(step: Step, params: Any, tokens: np.ndarray, policy: SirLLM, *, positional: Positional,
                     cache: KVCache) -> np.ndarray:
    """Every token's surprisal ``-log p(x_i | what the cache holds)`` (nats, float32, ``(B, N - 1)`` of
    ``tokens (B, N)``'s tokens 1..N-1), the rows streamed through SirLLM's policy in its turns from the empty
    full ``cache`` of ``policy.size`` slots: its perplexity, as `sirllm_generate` would read the same text
    (the paper's scores are exactly these; with ``code_scores`` they are not surprisals, a ValueError)."""
    if policy.code_scores:
        raise ValueError("code_scores are the official code's misaligned scores, not surprisals")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (rows, N >= 2), got shape {tokens.shape}")
    if cache.bounded or cache.slots != policy.size or bool(jnp.any(cache.positions >= 0)):
        raise ValueError(f"cache must be an empty full cache of S = {policy.size} slots, got {cache.describe()}")
    _, scores = _feed(step, policy, positional, params, tokens.tolist(), cache, None, 1.0, 0)
    return scores[:, 1:]


def sirllm_generate(
    step: Step,
    params: Any,
    prompts: Sequence[Sequence[int]],
    policy: SirLLM,
    *,
    positional: Positional,
    max_new_tokens: int,
    cache: KVCache | EntropyCache | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
) -> tuple[Generation, EntropyCache]:
    """One round of SirLLM: each row's prompt in turns of ``policy.turn`` tokens, then up to
    ``max_new_tokens`` greedy tokens, evicting before every call (module docstring).

    Args:
      step: the model step of `lminf_jax.decoding` (hashable), e.g. a ``models.decoder.LanguageModel``
        with ``AttentionCall(Vanilla())``; ``params`` its parameters.
      prompts: one token list per row; in a first round each needs a token, in a continuing round a
        row may have none (it continues from its last logits).
      positional: the model's resolved positional encoding (``model.decoder().positional``), used to
        re-rotate the keys of a rotated cache.
      max_new_tokens: tokens to generate (>= 0; 0 only feeds the prompts). Every generated token is
        fed, so the returned state holds the whole round.
      cache: an empty full `KVCache` of ``policy.size`` slots (``model.init_cache(batch,
        capacity=policy.size)``; None: ``step.init_cache`` builds it) starts a stream; the
        `EntropyCache` of a previous round continues it (its scores decay by ``policy.decay`` once).
      stop_tokens: a row stops after emitting one of these (included in its output).
      pad_id: the token after a row stopped, and of the padding fed to the step.

    Returns the generated tokens (`lminf_jax.decoding.Generation`) and the state to continue from.
    """
    if not isinstance(policy, SirLLM):
        raise ValueError(f"policy must be a SirLLM, got {type(policy).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    prompts = [[int(x) for x in p] for p in prompts]
    batch = len(prompts)
    if batch == 0:
        raise ValueError("prompts is empty: give one prompt per row")
    stops = tuple(int(x) for x in stop_tokens)
    s = policy.size
    if cache is None:
        init = getattr(step, "init_cache", None)
        if init is None:
            raise ValueError("cache is required: this step has no init_cache to build a full cache of S slots")
        cache = init(batch, capacity=s)
    if isinstance(cache, EntropyCache):
        state, kv = cache, cache.cache
    elif isinstance(cache, KVCache):
        state, kv = None, cache
        if bool(jnp.any(kv.positions >= 0)):
            raise ValueError("cache must be empty (a KVCache starts a stream; pass the EntropyCache to continue)")
        for b, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {b} is empty: a stream's first round needs a token per row (e.g. BOS)")
    else:
        raise ValueError(f"cache must be a KVCache or an EntropyCache, got {type(cache).__name__}")
    if kv.bounded or kv.slots != s:
        raise ValueError(f"cache must be a full cache of S = sinks + recent + entropy = {s} slots, got "
                         f"{kv.describe()}")
    if kv.positions.shape[0] != batch:
        raise ValueError(f"cache holds {kv.positions.shape[0]} rows for {batch} prompts")
    if kv.rotated and not rotates_keys(positional):
        raise ValueError("the cache's keys are rotated: positional must be the model's RoPE with fixed frequencies "
                         "(model.decoder().positional)")
    rho = policy.decay if state is not None else 1.0  # consumed by the round's first call

    state, _ = _feed(step, policy, positional, params, prompts, kv, state, rho, pad_id)
    rho = 1.0 if any(prompts) else rho

    done, lengths = jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32)
    out = []
    for i in range(max_new_tokens):
        token, done, lengths, state = _decode(step, policy, positional, params, state, done, lengths, jnp.int32(i),
                                              jnp.float32(rho), stop_tokens=stops, pad_id=int(pad_id))
        rho = 1.0
        out.append(token)
        if bool(done.all()):
            break
    if rho != 1.0:  # a round with no call still decays once
        state = dataclasses.replace(state, scores=state.scores * jnp.float32(rho))
    lengths = np.asarray(lengths)
    tokens = np.stack([np.asarray(t) for t in out], axis=1) if out else np.zeros((batch, 0), np.int32)
    return Generation(tokens[:, :lengths.max(initial=0)], lengths, np.asarray(done)), state
