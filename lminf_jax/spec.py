"""Attention specifications: which keys each query sees and at what distance.

Every spec is a frozen, hashable dataclass (a valid `jax.jit` static argument) and
the single source of the masking semantics used by the dense reference and the
blockwise implementation alike. Notation: query position ``i``, key position ``j``,
``delta = i - j``. A key slot with a negative position is empty (padding) and a
query slot with a negative position produces a zero output.

Each attended key falls in one of two classes:

* **local**: scored at its true distance (query rotated at ``i``, key at ``j``;
  ALiBi bias ``-slope * delta``);
* **global**: scored with the query at position ``global_query_position(i)`` and
  the key at ``j`` (``keys_rotated_in_global``) or at 0 (un-rotated); ALiBi bias
  ``-slope * (global_query_position(i) - key_position)``.

The modes (``kind``):

=================  ===============================  ==================================  ====================
kind               local if                         global if                           global distance
=================  ===============================  ==================================  ====================
vanilla            0 <= delta                       never                               -
lm_infinite        0 <= delta < L                   j < G and delta >= L                D
lambda_mask        0 <= delta < L                   j < G and delta >= L                delta (true)
distance_limit     0 <= delta < D                   delta >= D                          D
sliding_window     0 <= delta < L                   never                               -
streaming_llm      0 <= delta < L                   j < G and delta >= L                min(i, G+L-1) - j
=================  ===============================  ==================================  ====================

A sink key inside the window is local (counted once). All classes share one softmax.
``streaming_llm`` reproduces StreamingLLM's positions inside its cache: once the
cache is full the query sits at cache position ``G + L - 1`` and sink ``j`` at ``j``.

Legal ranges (checked on construction, ValueError naming the field):
``global_branch`` G >= 0, ``local_branch`` L >= 1, ``limit_distance`` D >= 1, each (and every
top-k field) at most ``2**31 - 1``, as is ``G + L - 1`` for streaming_llm: positions and distances
are int32, and a wider integer would wrap silently. `int32_positions` checks position arrays.
D is free relative to L: D < L places the sinks nearer than the oldest window keys,
D > L beyond the window; both are in-distribution as long as D does not exceed the
pretraining length, which the spec cannot know. The paper (and the default) is D = L.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Kind = Literal["vanilla", "lm_infinite", "lambda_mask", "distance_limit", "sliding_window", "streaming_llm"]
KINDS: tuple[str, ...] = ("vanilla", "lm_infinite", "lambda_mask", "distance_limit", "sliding_window", "streaming_llm")


#: Positions, distances and every integer that reaches them are int32.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def require_int32(name: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int in ``[minimum, INT32_MAX]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer >= {minimum} and <= {INT32_MAX} (int32), got {value!r}")


def int32_positions(name: str, positions: jax.Array | np.ndarray) -> jax.Array:
    """Integer ``positions`` as an int32 array; concrete values of a wider type are first checked
    to lie in int32's range (a ValueError naming ``name``) instead of wrapping silently. Traced
    values are cast as they are (under jit, positions are int32 already)."""
    dtype = getattr(positions, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = dtype if dtype is not None else type(positions).__name__
        raise ValueError(f"{name} must be an integer array, got {got}")
    info = jnp.iinfo(dtype)
    if (info.min < INT32_MIN or info.max > INT32_MAX) and not isinstance(positions, jax.core.Tracer):
        values = np.asarray(positions)
        if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
            raise ValueError(f"{name} must lie in int32's range [{INT32_MIN}, {INT32_MAX}], got values in "
                             f"[{values.min()}, {values.max()}]")
    return jnp.asarray(positions, jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Top-k "middle" tokens for the last query (the paper's downstream setting).

    In layers ``from_layer <= layer < to_layer`` the last query slot of each row also
    attends to the ``k`` keys with the highest scores among the keys its Λ-mask hides,
    each scored with the query at distance ``insert_distance`` from an un-rotated key
    (ALiBi: bias ``-slope * insert_distance``). Needs the full key set.
    """

    k: int = 5
    insert_distance: int = 2048
    from_layer: int = 4
    to_layer: int | None = None

    def __post_init__(self) -> None:
        require_int32("top_k.k", self.k, 1)
        require_int32("top_k.insert_distance", self.insert_distance, 0)
        require_int32("top_k.from_layer", self.from_layer, 0)
        if self.to_layer is not None:
            require_int32("top_k.to_layer", self.to_layer, self.from_layer + 1)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which keys a query attends and how they are scored; see the module docstring.

    Build one with the named constructors (``AttentionSpec.lm_infinite(...)`` etc.).
    """

    kind: Kind = "vanilla"
    global_branch: int = 0
    local_branch: int | None = None
    limit_distance: int | None = None
    top_k: TopK | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        require_int32("global_branch", self.global_branch, 0)
        needs_l = self.kind in ("lm_infinite", "lambda_mask", "sliding_window", "streaming_llm")
        needs_d = self.kind in ("lm_infinite", "distance_limit")
        if needs_l:
            require_int32("local_branch", self.local_branch, 1)
        elif self.local_branch is not None:
            raise ValueError(f"local_branch is not used by kind={self.kind!r}; leave it None")
        if needs_d:
            require_int32("limit_distance", self.limit_distance, 1)
        elif self.limit_distance is not None:
            raise ValueError(f"limit_distance is not used by kind={self.kind!r}; leave it None")
        if self.kind in ("vanilla", "distance_limit", "sliding_window") and self.global_branch != 0:
            raise ValueError(f"global_branch must be 0 for kind={self.kind!r}, got {self.global_branch}")
        if self.kind == "streaming_llm" and self.global_branch + self.local_branch - 1 > INT32_MAX:
            raise ValueError(f"global_branch + local_branch - 1 (the cache position of a streaming_llm query) must "
                             f"be <= {INT32_MAX}, got {self.global_branch} + {self.local_branch} - 1")
        if self.top_k is not None:
            if not isinstance(self.top_k, TopK):
                raise ValueError(f"top_k must be a TopK or None, got {type(self.top_k).__name__}")
            if self.kind in ("vanilla", "distance_limit"):
                raise ValueError(f"top_k needs a mask that hides middle tokens; kind={self.kind!r} hides none")

    # ----- named constructors -------------------------------------------------
    @classmethod
    def vanilla(cls) -> AttentionSpec:
        """Ordinary causal attention over every earlier key."""
        return cls("vanilla")

    @classmethod
    def lm_infinite(
        cls, global_branch: int = 10, local_branch: int = 4096, limit_distance: int | None = None, top_k: TopK | None = None
    ) -> AttentionSpec:
        """LM-Infinite: Λ-mask (G sinks + L window) and distance limit D (default D = L)."""
        d = local_branch if limit_distance is None else limit_distance
        return cls("lm_infinite", global_branch, local_branch, d, top_k)

    @classmethod
    def lambda_mask(cls, global_branch: int = 10, local_branch: int = 4096, top_k: TopK | None = None) -> AttentionSpec:
        """Ablation: the Λ-mask alone; sinks scored at their true distance."""
        return cls("lambda_mask", global_branch, local_branch, None, top_k)

    @classmethod
    def distance_limit(cls, limit_distance: int = 4096) -> AttentionSpec:
        """Ablation: every earlier key, distances capped at D (no mask)."""
        return cls("distance_limit", 0, None, limit_distance)

    @classmethod
    def sliding_window(cls, local_branch: int = 4096, top_k: TopK | None = None) -> AttentionSpec:
        """Ablation: the window of the last L keys, no sinks."""
        return cls("sliding_window", 0, local_branch, None, top_k)

    @classmethod
    def streaming_llm(cls, global_branch: int = 4, local_branch: int = 4096, top_k: TopK | None = None) -> AttentionSpec:
        """StreamingLLM: G sinks + L window, sinks scored at their position inside the cache."""
        return cls("streaming_llm", global_branch, local_branch, None, top_k)

    # ----- derived properties -------------------------------------------------
    @property
    def window(self) -> int | None:
        """Keys with ``delta < window`` are local; None means unbounded."""
        if self.kind == "distance_limit":
            return self.limit_distance
        return self.local_branch

    @property
    def global_keys_bounded(self) -> bool:
        """True when only keys ``j < G`` can be global (all kinds but distance_limit)."""
        return self.kind != "distance_limit"

    @property
    def has_global(self) -> bool:
        """Whether any key can be in the global class."""
        if self.kind == "distance_limit":
            return True
        return self.kind in ("lm_infinite", "lambda_mask", "streaming_llm") and self.global_branch > 0

    @property
    def sinks(self) -> int:
        """How many leading positions ``0..sinks-1`` can be global keys when that set is bounded
        (0 when no key is global, or when any far key is: distance_limit)."""
        return self.global_branch if self.has_global and self.global_keys_bounded else 0

    @property
    def bounded(self) -> bool:
        """Whether every query attends at most ``sinks + window`` keys, always the first ``sinks``
        positions and the last ``window``: what a Λ-cache holds, the Pallas kernel computes and
        context parallelism splits. Top-k middle tokens may pick any key, so they are unbounded."""
        return self.window is not None and self.global_keys_bounded and self.top_k is None

    @property
    def keys_rotated_in_global(self) -> bool:
        """Global keys at their true position (True) or un-rotated at 0 (False)."""
        return self.kind in ("lambda_mask", "streaming_llm")

    @property
    def global_scores_equal_local(self) -> bool:
        """Global keys scored exactly like local ones (no second query needed)."""
        return self.kind == "lambda_mask"

    def global_query_position(self, q_positions: jnp.ndarray) -> jnp.ndarray:
        """Position at which the query is rotated (or ALiBi-placed) for global keys."""
        if self.kind in ("lm_infinite", "distance_limit"):
            return jnp.full_like(q_positions, self.limit_distance)
        if self.kind == "streaming_llm":
            return jnp.minimum(q_positions, self.global_branch + self.local_branch - 1)
        return q_positions

    def global_key_position(self, k_positions: jnp.ndarray) -> jnp.ndarray:
        """Position at which a key is rotated (or ALiBi-placed) for global scores."""
        return k_positions if self.keys_rotated_in_global else jnp.zeros_like(k_positions)

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
            far = far & (k_positions < self.global_branch)
        return local, far

    def middle(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """Keys the mask hides from a query (the top-k candidates)."""
        valid = (q_positions >= 0) & (k_positions >= 0) & (k_positions <= q_positions)
        local, far = self.classify(q_positions, k_positions)
        return valid & ~local & ~far

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``lm_infinite(G=10, L=4096, D=4096)``."""
        parts = []
        if self.kind in ("lm_infinite", "lambda_mask", "streaming_llm"):
            parts.append(f"G={self.global_branch}")
        if self.local_branch is not None:
            parts.append(f"L={self.local_branch}")
        if self.limit_distance is not None:
            parts.append(f"D={self.limit_distance}")
        if self.top_k is not None:
            t = self.top_k
            parts.append(f"top_k={t.k}@{t.insert_distance} layers[{t.from_layer},{t.to_layer})")
        return f"{self.kind}({', '.join(parts)})"
