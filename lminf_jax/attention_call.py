"""`AttentionCall`: one call's attention settings, carried unchanged from a model down to the dispatch of
`lminf_jax.attention` (imports no jax: a command builds one while parsing its options)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from lminf_jax.rope import RopeScaling
from lminf_jax.spec import AttentionSpec, Vanilla

Implementation = Literal["auto", "reference", "blockwise", "single_query", "pallas", "cudnn", "splash", "window_xla"]
IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Implementation)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """How attention runs: the spec (which keys, at which positions), the implementation (see
    `lminf_jax.attention`) with the blockwise path's query block and key chunk sizes, and the frequency
    method (``frequencies``: RoPE rescaled at call time, e.g. `lminf_jax.frequency_method`; any spec
    composes with it; None keeps the checkpoint's RoPE). The frequency method is read where positions are
    resolved (a model's decoder); the attention functions take the resolved positional encoding.

    The positional encoding, the score scale and the layer index are facts of each layer, not settings of
    the call: they travel beside it."""

    spec: AttentionSpec = Vanilla()
    implementation: Implementation = "auto"
    block_q: int = 512
    block_k: int = 512
    frequencies: RopeScaling | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, AttentionSpec):
            raise ValueError(f"spec must be an AttentionSpec, got {type(self.spec).__name__}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        for name, n in (("block_q", self.block_q), ("block_k", self.block_k)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
        if self.frequencies is not None and not isinstance(self.frequencies, RopeScaling):
            raise ValueError(f"frequencies must be a RopeScaling or None, got {type(self.frequencies).__name__}")
