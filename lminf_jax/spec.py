"""Attention methods: which keys each query attends and at which positions each key is scored.

A method is one frozen, hashable dataclass (a valid `jax.jit` static argument), a subclass of
`AttentionSpec`, and the single source of its semantics: every implementation (dense reference,
blockwise, single-query decoding, the Pallas kernel, context parallelism, caches, probes) reads the
declarations below and never a method's name. Notation: query position ``i``, key position ``j``,
``delta = i - j``. A key slot with a negative position is empty (padding) and a query slot with a
negative position produces a zero output.

Each attended key falls in one of two classes:

* **local**: ``delta < window`` (every key when ``window`` is None), scored at its true positions
  (query rotated at ``i``, key at ``j``; ALiBi bias ``-slope * delta``);
* **global**: ``delta >= window`` and the key is one of the method's ``far`` keys (``"none"``, the
  ``"sinks"`` ``j < sinks`` or ``"all"``), scored with the query at ``global_query_position(i) /
  position_scale`` and the key at ``global_key_position(j) / position_scale``: RoPE rotates both
  integer numerators with the frequencies divided by ``position_scale`` (exact for any integer), ALiBi
  adds ``-slope * (query position - key position)``.

=================  =======================  ====================  ==========================================
method             local if                 global if             global positions (query, key)
=================  =======================  ====================  ==========================================
vanilla            always                   never                 -
lm_infinite        delta < L                j < G                 (D, 0)
lambda_mask        delta < L                j < G                 (i, j): its true distance
distance_limit     delta < D                always                (D, 0): ReRoPE with window w = D
sliding_window     delta < L                never                 -
streaming_llm      delta < L                j < G                 (min(i, G + L - 1), j)
self_extend        delta < W (= L)          always                (i // g + W - W / g, j // g)
leaky_rerope       delta < w (= D)          always                (w + (i - w) / k, j / k)
=================  =======================  ====================  ==========================================

A sink inside the window is local (counted once); both classes share one softmax. ``streaming_llm``
reproduces StreamingLLM's positions inside its cache (once the cache is full the query sits at
``G + L - 1`` and sink ``j`` at ``j``). ``self_extend`` follows the official code
(datamllab/LongLM, ``self_extend_patch/Llama.py``): its query offset ``W - W / g`` is a true division
(the paper's floor form when g divides W), and while every query position is below W every key is a
neighbour, as there. ``leaky_rerope``'s relative distance beyond w is ``w + (delta - w) / k``.

Legal ranges (checked on construction, ValueError naming the field): G >= 0, L, D, g, k >= 1, each
(and every top-k field) at most ``2**31 - 1``, as is every global position numerator a method can form
(`max_query_position` bounds the query positions that keep it so): positions and distances are int32,
and a wider integer would wrap silently. `lminf_jax.int32.int32_positions` checks position arrays.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import ClassVar, Literal

import numpy as np

from lminf_jax.int32 import INT32_MAX, require_int32
from lminf_jax.lazy import LazyModule
from lminf_jax.method_parameters import PARAMETERS, Option, PretrainingLength
from lminf_jax.selection import Selection

jax, jnp = LazyModule("jax"), LazyModule("jax.numpy")  # imported on first use: the declarations need neither

FarKeys = Literal["none", "sinks", "all"]


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top-k "middle" tokens for the last query (the paper's downstream setting).

    In layers ``from_layer <= layer < to_layer`` the last query slot of each row also
    attends to the ``k`` keys with the highest scores among the keys its mask hides,
    each scored with the query at distance ``insert_distance`` from an un-rotated key
    (ALiBi: bias ``-slope * insert_distance``). Needs the full key set.

    ``insert_distance`` None (the default) is half the method's window, the paper's L/2, set by the
    method that takes the TopK (`at_window`): ``LMInfinite(10, 4096, top_k=TopK())`` inserts at 2048.
    """

    k: int = 5
    insert_distance: int | None = None
    from_layer: int = 4
    to_layer: int | None = None

    def __post_init__(self) -> None:
        require_int32("top_k.k", self.k, 1)
        if self.insert_distance is not None:
            require_int32("top_k.insert_distance", self.insert_distance, 0)
        require_int32("top_k.from_layer", self.from_layer, 0)
        if self.to_layer is not None:
            require_int32("top_k.to_layer", self.to_layer, self.from_layer + 1)

    def at_window(self, window: int) -> TopK:
        """This TopK for a method whose window is ``window``: an unset ``insert_distance`` is ``window // 2``."""
        return self if self.insert_distance is not None else dataclasses.replace(self, insert_distance=window // 2)

    @property
    def selection(self) -> Selection:
        """This TopK as a `lminf_jax.selection.Selection` (its ``insert_distance`` set: `at_window`)."""
        if self.insert_distance is None:
            raise ValueError("top_k.insert_distance is unset: the method that takes this TopK sets it (at_window)")
        return Selection(unit=1, count=self.k, scope="head", every="last query", distance=self.insert_distance,
                         candidates="the keys the mask hides", score="the query at the distance . the raw key")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """An attention method (see the module docstring): the base class of `METHODS`, never built itself.

    A subclass declares ``kind`` (its name), its parameters (int fields, each one of
    `lminf_jax.method_parameters.PARAMETERS`, with what it means and its default in `OPTIONS`), `far`,
    `window`, the global positions and, where they apply, `sinks` and `position_scale`; every other
    property here derives from those.
    """

    kind: str = dataclasses.field(default="", init=False)
    top_k: TopK | None = dataclasses.field(default=None, kw_only=True)

    #: Which keys with ``delta >= window`` are attended (the global class).
    far: ClassVar[FarKeys] = "none"
    #: Global keys are scored exactly like local ones (no second query needed).
    global_scores_equal_local: ClassVar[bool] = False
    #: Global keys at their true position in the local frame (the local keys serve for both).
    keys_rotated_in_global: ClassVar[bool] = False
    #: Every parameter (an int field) of the method: what it means here and its default.
    OPTIONS: ClassVar[dict[str, Option]] = {}
    #: Keys chosen from scores when the method runs (`RetrievalSpec`, below): no static mask.
    retrieves: ClassVar[bool] = False
    #: The parameter (one of `OPTIONS`) that compresses the global positions, a larger value scoring far keys
    #: at shorter distances, or None: what `covering` chooses per length.
    STRETCH: ClassVar[str | None] = None
    #: Boolean fields that switch to an official implementation's behaviour where it departs from the method's
    #: canonical rule (for comparisons with that code); `describe` names those that are set.
    CODE_FLAGS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if type(self) is AttentionSpec:
            raise TypeError(f"AttentionSpec is the base of the methods; build one of {', '.join(METHODS)}")
        for name in self.CODE_FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, option in self.OPTIONS.items():
            if option.same_as is not None and getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self, option.same_as))
            require_int32(name, getattr(self, name), PARAMETERS[name].minimum)
        self._check()
        if self.top_k is not None:
            if not isinstance(self.top_k, TopK):
                raise ValueError(f"top_k must be a TopK or None, got {type(self.top_k).__name__}")
            if not self.hides_middle:
                raise ValueError(f"top_k needs a mask that hides middle tokens; kind={self.kind!r} hides none")
            object.__setattr__(self, "top_k", self.top_k.at_window(self.window))

    def _check(self) -> None:
        """Method-specific checks beyond each parameter's range (a ValueError naming the fields)."""

    @property
    def selection(self) -> Selection | None:
        """The keys this method chooses from scores when it runs (`lminf_jax.selection`), or None."""
        return None if self.top_k is None else self.top_k.selection

    @classmethod
    def from_options(cls, pretraining_length: PretrainingLength, **options: int | None) -> AttentionSpec:
        """The method with the given `OPTIONS` (None or left out: its declared default, see `Option`,
        taken from the model's ``pretraining_length(parameter)`` where it says so)."""
        for name, option in cls.OPTIONS.items():
            if options.get(name) is None:
                options.pop(name, None)  # the field's default
                if option.per_pretraining is not None:
                    options[name] = option.model_default(pretraining_length(name))
        return cls(**options)

    # ----- declarations (overridden by the methods) -------------------------------------------------
    @property
    def window(self) -> int | None:
        """Keys with ``delta < window`` are local; None: every key is."""
        return None

    @property
    def sinks(self) -> int:
        """How many leading positions ``0..sinks-1`` are the global keys when `far` is "sinks"."""
        return 0

    @property
    def position_scale(self) -> int:
        """The denominator of the global positions (their numerators are integers)."""
        return 1

    @property
    def max_query_position(self) -> int:
        """The largest query position whose global position numerator fits int32."""
        return INT32_MAX

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        """Numerator of the position at which the query is rotated (or ALiBi-placed) for global keys."""
        return q_positions

    def global_key_position(self, k_positions: jnp.ndarray) -> jnp.ndarray:
        """Numerator of the position at which a key is rotated (or ALiBi-placed) for global scores."""
        return k_positions

    def check_query_positions(self, name: str, positions: jax.Array | np.ndarray) -> None:
        """A ValueError naming ``name`` when a concrete position exceeds `max_query_position` (its global
        position would not fit int32); traced positions are not checked."""
        limit = self.max_query_position
        if limit < INT32_MAX and not isinstance(positions, jax.core.Tracer):
            top = np.max(np.asarray(positions), initial=-1)
            if top > limit:
                raise ValueError(f"{name}: {self.describe()} serves positions up to {limit} (its global positions "
                                 f"are int32), got {top}")

    # ----- derived -----------------------------------------------------------------------------------
    @property
    def has_global(self) -> bool:
        """Whether any key can be in the global class."""
        return self.far == "all" or (self.far == "sinks" and self.sinks > 0)

    @property
    def global_keys_bounded(self) -> bool:
        """True when only keys ``j < sinks`` can be global."""
        return self.far != "all"

    @property
    def hides_middle(self) -> bool:
        """Whether some earlier keys are attended by neither class (what top-k middle tokens pick from)."""
        return self.window is not None and self.far != "all"

    @property
    def bounded(self) -> bool:
        """Whether every query attends at most ``sinks + window`` keys, always the first ``sinks``
        positions and the last ``window``: what a Λ-cache holds, the Pallas kernel computes and
        context parallelism splits. Top-k middle tokens may pick any key, so they are unbounded."""
        return self.hides_middle and self.top_k is None

    def classify(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Boolean (local, global) masks for broadcastable query/key position arrays."""
        valid = (q_positions >= 0) & (k_positions >= 0) & (k_positions <= q_positions)
        delta = q_positions - k_positions
        window = self.window
        local = valid if window is None else valid & (delta < window)
        if not self.has_global:
            return local, jnp.zeros_like(local)
        far = valid & (delta >= window)
        if self.global_keys_bounded:
            far = far & (k_positions < self.sinks)
        return local, far

    def middle(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """Keys the mask hides from a query (the top-k candidates)."""
        valid = (q_positions >= 0) & (k_positions >= 0) & (k_positions <= q_positions)
        local, far = self.classify(q_positions, k_positions)
        return valid & ~local & ~far

    def attended_keys(self, positions: np.ndarray) -> np.ndarray:
        """How many keys ``0..i`` the mask lets a query at each position ``i >= 0`` of ``positions``
        attend, local and global together (top-k middle tokens, chosen per layer, are not counted)."""
        i = np.asarray(positions, np.int64)
        if np.any(i < 0):
            raise ValueError("attended_keys counts keys of queries at positions >= 0")
        if self.window is None:
            return i + 1
        local = np.minimum(i + 1, self.window)
        if not self.has_global:
            return local
        far = np.maximum(i - self.window + 1, 0)  # keys j <= i - window
        return local + (np.minimum(far, self.sinks) if self.global_keys_bounded else far)

    def farthest_distance(self, length: int) -> Fraction:
        """The largest distance (query position minus key position, after `position_scale`) at which a
        query of a ``length``-token sequence (positions ``0..length-1``) scores a key it attends: what
        must stay below the pretraining length for the model to see only distances it was trained on.
        Global positions never decrease with the position (true of every method), so the farthest
        global score is the last query's on key 0."""
        require_int32("length", length, 1)
        last = length - 1
        farthest = Fraction(last if self.window is None else min(last, self.window - 1))
        if self.has_global and last >= self.window:
            numerator = (int(self.global_query_position(np.asarray(last, np.int64)))
                         - int(self.global_key_position(np.asarray(0, np.int64))))
            farthest = max(farthest, Fraction(numerator, self.position_scale))
        return farthest

    def covering(self, length: int, pretraining_length: int) -> AttentionSpec:
        """The method with its `STRETCH` parameter at the smallest legal value for which no query of a
        ``length``-token sequence scores a key farther than ``pretraining_length - 1`` (its other
        parameters kept): Self-Extend's group size or Leaky ReRoPE's leak chosen for the target length,
        as their papers advise. A ValueError when the method has no such parameter or none covers."""
        require_int32("pretraining_length", pretraining_length, 1)
        name = self.STRETCH
        if name is None:
            raise ValueError(f"{self.kind} has no parameter that compresses its positions to cover a length")
        limit = pretraining_length - 1

        def covers(value: int) -> AttentionSpec | None:
            try:
                spec = dataclasses.replace(self, **{name: value})
            except ValueError:  # a value whose positions leave int32
                return None
            return spec if spec.farthest_distance(length) <= limit else None

        # at `length` a group (or leak) spans the whole sequence: the most compressed placement
        minimum = PARAMETERS[name].minimum
        if covers(max(length, minimum)) is None:
            raise ValueError(f"{self.describe()}: no {name} keeps every distance of {length:,} tokens below "
                             f"{pretraining_length:,} (its other parameters alone reach farther)")
        value = minimum
        while (spec := covers(value)) is None:
            value += 1
        return spec

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``lm_infinite(G=10, L=4096, D=4096)``."""
        parts = [f"{PARAMETERS[name].symbol}={getattr(self, name)}" for name in self.OPTIONS]
        if self.top_k is not None:
            t = self.top_k
            parts.append(f"top_k={t.k}@{t.insert_distance} layers[{t.from_layer},{t.to_layer})")
        parts += [name for name in self.CODE_FLAGS if getattr(self, name)]
        return f"{self.kind}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class Vanilla(AttentionSpec):
    """Ordinary causal attention over every earlier key."""

    kind: str = dataclasses.field(default="vanilla", init=False)


@dataclasses.dataclass(frozen=True)
class _SinksAndWindow(AttentionSpec):
    """The Λ-mask: the first G positions (sinks) and the last L keys; subclasses place the sinks."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "global_branch": Option("sink tokens at the start"),
        "local_branch": Option("window of the last L tokens", per_pretraining=1)}
    global_branch: int = 10
    local_branch: int = OPTIONS["local_branch"].model_default()

    far: ClassVar[FarKeys] = "sinks"

    @property
    def window(self) -> int:
        return self.local_branch

    @property
    def sinks(self) -> int:
        return self.global_branch


@dataclasses.dataclass(frozen=True)
class LMInfinite(_SinksAndWindow):
    """LM-Infinite: the Λ-mask (G sinks + L window) with sinks scored at distance D (None: L)."""

    kind: str = dataclasses.field(default="lm_infinite", init=False)
    limit_distance: int | None = None

    OPTIONS: ClassVar[dict[str, Option]] = {
        **_SinksAndWindow.OPTIONS,
        "limit_distance": Option("distance the sinks are scored at", same_as="local_branch")}

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        return jnp.full_like(q_positions, self.limit_distance)

    def global_key_position(self, k_positions: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(k_positions)


@dataclasses.dataclass(frozen=True)
class LambdaMask(_SinksAndWindow):
    """Ablation: the Λ-mask alone; sinks scored at their true distance."""

    kind: str = dataclasses.field(default="lambda_mask", init=False)

    global_scores_equal_local: ClassVar[bool] = True
    keys_rotated_in_global: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class StreamingLLM(_SinksAndWindow):
    """StreamingLLM: G sinks + L window, every key scored at its position inside the cache."""

    kind: str = dataclasses.field(default="streaming_llm", init=False)
    global_branch: int = 4

    keys_rotated_in_global: ClassVar[bool] = True

    def _check(self) -> None:
        if self.global_branch + self.local_branch - 1 > INT32_MAX:
            raise ValueError(f"global_branch + local_branch - 1 (the cache position of a streaming_llm query) must "
                             f"be <= {INT32_MAX}, got {self.global_branch} + {self.local_branch} - 1")

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        return jnp.minimum(q_positions, self.global_branch + self.local_branch - 1)


@dataclasses.dataclass(frozen=True)
class SlidingWindow(AttentionSpec):
    """Ablation: the window of the last L keys, no sinks."""

    OPTIONS: ClassVar[dict[str, Option]] = {"local_branch": _SinksAndWindow.OPTIONS["local_branch"]}
    kind: str = dataclasses.field(default="sliding_window", init=False)
    local_branch: int = OPTIONS["local_branch"].model_default()

    @property
    def window(self) -> int:
        return self.local_branch


@dataclasses.dataclass(frozen=True)
class DistanceLimit(AttentionSpec):
    """Every earlier key, distances beyond D scored as D: LM-Infinite's distance limit alone, which is
    ReRoPE (Su 2023) with window w = D."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "limit_distance": Option("cap on distances, ReRoPE's window w", per_pretraining=1)}
    kind: str = dataclasses.field(default="distance_limit", init=False)
    limit_distance: int = OPTIONS["limit_distance"].model_default()

    far: ClassVar[FarKeys] = "all"

    @property
    def window(self) -> int:
        return self.limit_distance

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        return jnp.full_like(q_positions, self.limit_distance)

    def global_key_position(self, k_positions: jnp.ndarray) -> jnp.ndarray:
        return jnp.zeros_like(k_positions)


@dataclasses.dataclass(frozen=True)
class SelfExtend(AttentionSpec):
    """Self-Extend (Jin et al. 2024): neighbours (delta < W) at their true distance; every farther key
    at grouped positions, the query at ``i // g + W - W / g`` and the key at ``j // g``."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "group_size": Option("Self-Extend's group size g"),
        "local_branch": Option("Self-Extend's neighbour window W", per_pretraining=4)}
    kind: str = dataclasses.field(default="self_extend", init=False)
    group_size: int = 8
    local_branch: int = OPTIONS["local_branch"].model_default()

    far: ClassVar[FarKeys] = "all"
    STRETCH: ClassVar[str] = "group_size"

    def _check(self) -> None:
        if self._offset > INT32_MAX:
            raise ValueError(f"group_size and local_branch: the grouped query offset (g W - W) / gcd(g, W) must be "
                             f"<= {INT32_MAX}, got g={self.group_size}, W={self.local_branch}")

    @property
    def _common(self) -> int:
        return math.gcd(self.group_size, self.local_branch)

    @property
    def _offset(self) -> int:
        """``(W - W / g) * position_scale``: the query's grouped shift, an integer numerator."""
        return (self.group_size * self.local_branch - self.local_branch) // self._common

    @property
    def window(self) -> int:
        return self.local_branch

    @property
    def position_scale(self) -> int:
        return self.group_size // self._common

    @property
    def max_query_position(self) -> int:
        groups = (INT32_MAX - self._offset) // self.position_scale
        return min(INT32_MAX, groups * self.group_size + self.group_size - 1)

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        return self.position_scale * (q_positions // self.group_size) + self._offset

    def global_key_position(self, k_positions: jnp.ndarray) -> jnp.ndarray:
        return self.position_scale * (k_positions // self.group_size)


@dataclasses.dataclass(frozen=True)
class LeakyReRoPE(AttentionSpec):
    """Leaky ReRoPE (Su 2023): true distances below w; beyond, the distance grows k times slower,
    ``w + (delta - w) / k`` (the query at ``w + (i - w) / k``, the key at ``j / k``)."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "limit_distance": Option("Leaky ReRoPE's window w", per_pretraining=2),
        "leak": Option("Leaky ReRoPE's slope 1/k beyond the window")}
    kind: str = dataclasses.field(default="leaky_rerope", init=False)
    limit_distance: int = OPTIONS["limit_distance"].model_default()
    leak: int = 16

    far: ClassVar[FarKeys] = "all"
    STRETCH: ClassVar[str] = "leak"

    def _check(self) -> None:
        if self.limit_distance * (self.leak - 1) > INT32_MAX:
            raise ValueError(f"limit_distance * (leak - 1), the query's position offset, must be <= {INT32_MAX}, "
                             f"got {self.limit_distance} * ({self.leak} - 1)")

    @property
    def window(self) -> int:
        return self.limit_distance

    @property
    def position_scale(self) -> int:
        return self.leak

    @property
    def max_query_position(self) -> int:
        return INT32_MAX - self.limit_distance * (self.leak - 1)

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        return q_positions + self.limit_distance * (self.leak - 1)


# ----- retrieval methods ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetrievalSpec(AttentionSpec):
    """The base of the retrieval methods: which keys a query attends is chosen from scores when it
    runs, so there is no static mask (`classify` and `middle` refuse) and every key stays a candidate
    (not `bounded`).

    Attention that chooses, per query or per step, which far keys to attend from
    scores computed at run time, and scores them at positions the model was trained on.

    Their semantics come from the official code, as `../shared/reference/retrieval-methods.md` reads it
    (repositories, commits and lines there); the library follows the canonical rule that reference
    recommends where the code and the paper disagree. The declarations live here; what they compute
    is `lminf_jax.retrieval`, judged by the float64 oracles of ``tests/retrieval_oracle.py``.

    * **LongHeads** (Lu et al. 2024; ``LuLuLuyi/LongHeads`` @ 1c9f72e). The positions are cut into
      chunks of ``w`` tokens (chunk ``c`` = ``[c w, (c + 1) w)``). Each complete chunk gets, per query
      head, a representation: its keys rotated at chunk-local positions ``t mod w``, pooled by the
      attention of the chunk's mean (bidirectional, chunk-local) attention output. A query at position
      ``p`` with ``p + 1 >= span`` attends, per head, chunk 0, the ``span / w - 3`` chunks whose
      representation has the largest raw dot product with its raw query, the chunk before its own
      (unless its own chunk is complete) and its own chunk up to itself, all re-numbered contiguously
      ``0, 1, ...`` in chronological order with the query on the last position (the reference's decode
      rule, canonical for prefill too: the code's prefill quirks are not reproduced). Earlier queries
      attend every key at its true position. Every distance stays below ``span``. The threshold equals
      the span, as the code assumes (the reference's B = L).
    * **InfLLM** (Xiao et al. 2024; ``thunlp/InfLLM`` @ 12b7079, with the first release's rule for the
      tail). Queries run in steps: positions cut at multiples of ``step_size`` and at the ends of each
      model call (one token per step when decoding; a prompt in one call gets the code's execution
      blocks). A query attends its last ``local_branch`` (n_local) tokens at their true distances and,
      at the single distance ``D = n_local - 1`` (query rotated at D, keys un-rotated), every earlier
      key of the global set: the first ``global_branch`` (n_init) tokens, the blocks retrieved for the
      step and the tail. Blocks of ``block_size`` tokens form from position n_init once the local window
      has passed them; a block is represented, per query head, by the mean raw key of its
      ``representatives`` tokens that received the most local attention mass; a step retrieves, for all
      heads of a layer, the ``blocks_retrieved`` blocks whose representations best match the step's
      mean query rotated at D, summed over heads (all of them while there are no more). Each key is
      attended once (the first release's rule; the main branch counts some tail keys twice).

    Both attend an unbounded set (every key stays a candidate), so they decode from a full cache, with
    per-layer state beside it (`lminf_jax.retrieval.initial_state`). What each chooses (chunks, blocks)
    is its `selection`, the declaration top-k middle tokens share (`lminf_jax.selection`).
    """

    retrieves: ClassVar[bool] = True

    def classify(self, q_positions, k_positions):
        raise ValueError(f"{self.describe()} chooses its keys from scores when it runs: it has no static mask "
                         "(lminf_jax.retrieval computes it)")

    def attended_keys(self, positions: np.ndarray) -> np.ndarray:
        """How many keys a query at each position attends when decoding one token at a time."""
        i = np.asarray(positions, np.int64)
        if np.any(i < 0):
            raise ValueError("attended_keys counts keys of queries at positions >= 0")
        return self._attended(i)

    def _attended(self, i: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LongHeads(RetrievalSpec):
    """LongHeads: per head and query, chunk 0, the best-matching chunks, the previous and the own
    chunk, re-positioned contiguously inside ``span`` (see the module docstring)."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "chunk_size": Option("LongHeads' chunk w", per_pretraining=16),
        "span": Option("LongHeads' attention span L (a multiple of w, at least 4 chunks)", per_pretraining=1)}
    CODE_FLAGS: ClassVar[tuple[str, ...]] = ("prefill_code_quirks",)
    kind: str = dataclasses.field(default="longheads", init=False)
    chunk_size: int = OPTIONS["chunk_size"].model_default()
    span: int = OPTIONS["span"].model_default()
    #: Queries of a call of several tokens (a prefill) follow the official PyTorch prefill path instead of the
    #: canonical (decoding) rule: selective only from position ``span`` on, the own key left out, the previous
    #: chunk always forced (reference §1.8, items 1-3). One-token calls follow the rule either way.
    prefill_code_quirks: bool = False

    def _check(self) -> None:
        if self.span % self.chunk_size or self.span // self.chunk_size < 4:
            raise ValueError(f"span must be a multiple of chunk_size and at least 4 chunks (chunk 0, one chosen, "
                             f"the previous and the own), got span={self.span}, chunk_size={self.chunk_size}")

    @property
    def chunks(self) -> int:
        """C = span / w: chunks a selective query attends (its own, partial one included)."""
        return self.span // self.chunk_size

    @property
    def selection(self) -> Selection:
        """The ``C - 3`` chunks a selective query chooses, per head, besides chunk 0, the previous and its own."""
        return Selection(unit=self.chunk_size, count=self.chunks - 3, scope="head", every="query", distance=None,
                         candidates="complete chunks 1 .. before the previous",
                         score="the raw query . the chunk's representation")

    def _attended(self, i: np.ndarray) -> np.ndarray:
        w = self.chunk_size
        return np.where(i + 1 < self.span, i + 1, (self.chunks - 1) * w + (i + 1) % w)

    def farthest_distance(self, length: int) -> Fraction:
        require_int32("length", length, 1)
        # selective queries sit at most at span - 2 (at span - 1 on the PyTorch prefill path: no own key)
        return Fraction(min(length - 1, self.span - 1 - (not self.prefill_code_quirks)))


@dataclasses.dataclass(frozen=True)
class InfLLM(RetrievalSpec):
    """InfLLM: initial tokens, a local window and retrieved memory blocks, everything outside the
    window at distance ``local_branch - 1`` (see the module docstring)."""

    OPTIONS: ClassVar[dict[str, Option]] = {
        "global_branch": Option("InfLLM's initial tokens n_init", per_pretraining=32),
        "local_branch": Option("InfLLM's local window n_local", per_pretraining=2),
        "block_size": Option("InfLLM's memory block size", per_pretraining=32),
        "blocks_retrieved": Option("InfLLM's blocks retrieved per step (topk)"),
        "representatives": Option("InfLLM's representative keys per block (repr_topk)", default_text="min(4, bs)"),
        "step_size": Option("InfLLM's query step (exc_block_size)", per_pretraining=8)}
    CODE_FLAGS: ClassVar[tuple[str, ...]] = ("main_double_count",)
    kind: str = dataclasses.field(default="infllm", init=False)
    global_branch: int = OPTIONS["global_branch"].model_default()
    local_branch: int = OPTIONS["local_branch"].model_default()
    block_size: int = OPTIONS["block_size"].model_default()
    blocks_retrieved: int = 16
    representatives: int | None = None
    step_size: int = OPTIONS["step_size"].model_default()
    #: Every query of a step attends all the step's global keys, as the official code's main branch does, so a
    #: tail key still inside a query's window is attended twice, locally and at ``D`` (reference §2.8); the
    #: canonical rule attends each key once. Only steps of several queries differ.
    main_double_count: bool = False

    def __post_init__(self) -> None:
        if self.representatives is None and isinstance(self.block_size, int):  # the code's 4, or the whole block
            object.__setattr__(self, "representatives", min(4, self.block_size))
        super().__post_init__()

    def _check(self) -> None:
        if self.representatives > self.block_size:
            raise ValueError(f"representatives ({self.representatives}) must be <= block_size ({self.block_size})")

    @property
    def limit_distance(self) -> int:
        """D = n_local - 1: the distance of every global key."""
        return self.local_branch - 1

    @property
    def selection(self) -> Selection:
        """The memory blocks a step retrieves for all heads of a layer, scored at D."""
        return Selection(unit=self.block_size, count=self.blocks_retrieved, scope="layer", every="step",
                         distance=self.limit_distance, candidates="formed memory blocks",
                         score="the step's mean query at D . the block's representation")

    def memory(self, processed, xp=np):
        """``(initial, blocks)``: how many initial tokens and memory blocks the tokens before position
        ``processed`` (an int array, numpy or ``xp=jax.numpy``) have left in the memory: a token leaves the
        local window ``n_local`` positions later; blocks form from ``n_init`` on, once the initial tokens
        are complete."""
        n_local, n_init = self.local_branch, self.global_branch
        initial = xp.clip(processed - n_local, 0, n_init)
        blocks = xp.where(initial == n_init, xp.maximum(processed - n_local - n_init, 0) // self.block_size, 0)
        return initial, blocks

    def _attended(self, i: np.ndarray) -> np.ndarray:
        n_local, bs = self.local_branch, self.block_size
        initial, blocks = self.memory(i)  # processed tokens before the step: i
        tail = np.maximum(i + 1 - n_local - (initial + blocks * bs), 0)
        return np.minimum(i + 1, n_local) + initial + np.minimum(blocks, self.blocks_retrieved) * bs + tail

    def farthest_distance(self, length: int) -> Fraction:
        require_int32("length", length, 1)
        return Fraction(min(length - 1, self.local_branch - 1))


#: Every method by its ``kind``.
METHODS: dict[str, type[AttentionSpec]] = {
    cls.__dataclass_fields__["kind"].default: cls
    for cls in (Vanilla, LMInfinite, LambdaMask, DistanceLimit, SlidingWindow, StreamingLLM, SelfExtend, LeakyReRoPE,
                LongHeads, InfLLM)
}
KINDS: tuple[str, ...] = tuple(METHODS)
