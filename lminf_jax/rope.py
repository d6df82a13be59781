"""Rotary position embeddings (RoPE) computed from integer positions, exact at any int32 position.

Angles are reduced in *turns* (angle / 2pi): each int32 position is split into two 16-bit halves and
each host constant into float32 pieces with few significant bits, so every product is exact in float32
and the reduction modulo one turn loses only a few float32 roundings. No float64 is needed on device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np

from lminf_jax.lazy import LazyModule

jax, jnp = LazyModule("jax"), LazyModule("jax.numpy")  # imported on first use: the declarations need neither

#: Hugging Face's `rope_type`s that a checkpoint may carry, plus "ntk" (static NTK-aware scaling, which
#: Hugging Face has no type for) for call-time use.
_HF_KINDS = ("linear", "dynamic", "yarn", "llama3")
_KINDS = (*_HF_KINDS, "ntk")
_NEEDS_ORIGINAL_MAX = ("yarn", "llama3")
_LAYOUTS = ("half", "interleaved")
# Keys of a HF rope dict that map onto RopeScaling fields, and keys that are handled elsewhere.
_HF_FIELDS = frozenset({
    "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
    "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate",
})
_HF_IGNORED = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE frequency-scaling scheme, named and parameterised as in Hugging Face's rope configs."""

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown RoPE scaling `kind` {self.kind!r}; legal values: {', '.join(_KINDS)}")
        if not self.factor >= 1:
            raise ValueError(f"RoPE scaling `factor` must be >= 1, got {self.factor}")
        omp = self.original_max_position_embeddings
        if self.kind in _NEEDS_ORIGINAL_MAX and omp is None:
            raise ValueError(f"RoPE scaling kind {self.kind!r} requires `original_max_position_embeddings`")
        if omp is not None and omp < 1:
            raise ValueError(f"`original_max_position_embeddings` must be >= 1, got {omp}")
        if self.kind == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"llama3 RoPE scaling needs `low_freq_factor` < `high_freq_factor`, "
                f"got {self.low_freq_factor} and {self.high_freq_factor}"
            )

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling | None:
        """From a HF config's `rope_scaling` / `rope_parameters` dict; None for rope_type 'default' or None."""
        if d is None:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type != "default" and rope_type not in _HF_KINDS:
            raise ValueError(f"unsupported `rope_type` {rope_type!r}; supported: default, {', '.join(_HF_KINDS)}")
        unknown = sorted(set(d) - _HF_FIELDS - _HF_IGNORED)
        if unknown:
            raise ValueError(f"unsupported RoPE parameter {unknown[0]!r} (rope_type {rope_type!r}) would change the math")
        if rope_type == "default":
            return None
        if d.get("factor") is None:
            raise ValueError(f"rope_type {rope_type!r} requires `factor`")
        return cls(kind=rope_type, **{k: v for k, v in d.items() if k in _HF_FIELDS and v is not None})


def _check_rotary_dim(rotary_dim: int) -> None:
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"`rotary_dim` must be even and >= 2, got {rotary_dim}")


def _base_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def _dynamic_theta(rotary_dim: int, theta: float, scaling: RopeScaling,
                   max_position_embeddings: int | None, seq_len: int | None) -> float:
    """NTK-aware base for the current sequence length (HF 'dynamic')."""
    max_pos = max_position_embeddings
    if max_pos is None:
        max_pos = scaling.original_max_position_embeddings
    if max_pos is None:
        raise ValueError("dynamic RoPE scaling requires `max_position_embeddings`")
    seq = max_pos if seq_len is None else max(seq_len, max_pos)
    return _ntk_theta(rotary_dim, theta, scaling.factor * seq / max_pos - (scaling.factor - 1))


def _ntk_theta(rotary_dim: int, theta: float, factor: float) -> float:
    """NTK-aware base (bloc97, 2023; `length-extension.md`): theta * s ** (d / (d - 2)), d the rotary dims."""
    if rotary_dim == 2:  # the single frequency theta**0 does not depend on the base
        return theta
    return theta * factor ** (rotary_dim / (rotary_dim - 2))


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between."""
    omp = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (omp / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    medium = np.where(wavelen < omp / s.high_freq_factor, inv_freq, smoothed)
    return np.where(wavelen > omp / s.low_freq_factor, inv_freq / s.factor, medium)


def _yarn_correction_range(rotary_dim: int, theta: float, s: RopeScaling) -> tuple[float, float]:
    def correction_dim(num_rotations: float) -> float:
        omp = s.original_max_position_embeddings
        return rotary_dim * math.log(omp / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def _yarn_inv_freq(rotary_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN: blend interpolated (divided by factor) and extrapolated frequencies with a linear ramp."""
    extrapolated = _base_inv_freq(rotary_dim, theta)
    low, high = _yarn_correction_range(rotary_dim, theta, s)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return extrapolated / s.factor * ramp + extrapolated * (1 - ramp)


def _yarn_attention_factor(s: RopeScaling) -> float:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)


def rope_frequencies(rotary_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None,
                     *, max_position_embeddings: int | None = None,
                     seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies (rotary_dim // 2,) and the cos/sin scaling factor, following HF's rope utils.

    Computed in float64, then rounded to float32 values (returned as float64), as checkpoints were trained
    with float32 frequencies. For 'dynamic', `max_position_embeddings` (falling back to the scaling's
    `original_max_position_embeddings`) is the trained length and `seq_len` the current one.
    """
    _check_rotary_dim(rotary_dim)
    if not theta > 0:
        raise ValueError(f"`theta` must be > 0, got {theta}")
    kind = None if scaling is None else scaling.kind
    attention_scaling = 1.0
    if kind == "dynamic":
        theta = _dynamic_theta(rotary_dim, theta, scaling, max_position_embeddings, seq_len)
    elif kind == "ntk":
        theta = _ntk_theta(rotary_dim, theta, scaling.factor)
    inv_freq = _base_inv_freq(rotary_dim, theta)
    if kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(rotary_dim, theta, scaling)
        attention_scaling = _yarn_attention_factor(scaling)
    return inv_freq.astype(np.float32).astype(np.float64), attention_scaling


@dataclass(frozen=True)
class LengthRule:
    """Frequencies that follow the sequence length T (Hugging Face's dynamic NTK): those of
    `rope_frequencies` ``(rotary_dim, theta, scaling, max_position_embeddings, seq_len=T)``, divided by
    ``divisor`` (a spec's ``position_scale``). T is the largest key position of the attention call
    + 1 (traced), so a cached decoding step scores exactly as one forward over the tokens so far: the
    cache then holds keys as projected (`lminf_jax.attention_decode.rotates_keys` is False), and every
    step rotates them with the current frequencies."""

    rotary_dim: int
    theta: float
    scaling: RopeScaling
    max_position_embeddings: int
    divisor: int = 1

    def turn_constants(self, last_key_position: jax.Array) -> tuple[jax.Array, ...]:
        """`rope_angles`' six float32 constant arrays at T = ``last_key_position`` + 1, computed in
        float64 on the host (a `jax.pure_callback`) exactly as for a length known in advance."""
        n = self.rotary_dim // 2

        def host(last: np.ndarray) -> np.ndarray:
            inv_freq, _ = rope_frequencies(self.rotary_dim, self.theta, self.scaling,
                                           max_position_embeddings=self.max_position_embeddings,
                                           seq_len=int(last) + 1)
            return np.stack(_turn_constants(tuple((inv_freq / self.divisor).tolist())))

        table = jax.pure_callback(host, jax.ShapeDtypeStruct((6, n), jnp.float32),
                                  jnp.asarray(last_key_position, jnp.int32))
        return tuple(table[i] for i in range(6))


@dataclass(frozen=True)
class Rotary:
    """A resolved RoPE scheme: what the attention code needs. Hashable (usable as a jit static arg).

    With a ``length_rule`` the frequencies follow the sequence length (`LengthRule`); ``inv_freq``
    then holds those of sequences up to the pretraining length."""

    inv_freq: tuple[float, ...]
    layout: str = "half"
    attention_scaling: float = 1.0
    length_rule: LengthRule | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inv_freq", tuple(float(f) for f in self.inv_freq))
        object.__setattr__(self, "attention_scaling", float(self.attention_scaling))
        if self.layout not in _LAYOUTS:
            raise ValueError(f"unknown RoPE `layout` {self.layout!r}; legal values: {', '.join(_LAYOUTS)}")
        if not self.inv_freq:
            raise ValueError("`inv_freq` must be non-empty")
        if self.length_rule is not None and self.length_rule.rotary_dim != self.rotary_dim:
            raise ValueError(f"length_rule.rotary_dim ({self.length_rule.rotary_dim}) must equal the rotary dims "
                             f"of inv_freq ({self.rotary_dim})")

    def divided(self, divisor: int) -> Rotary:
        """The same rotation at positions divided by ``divisor`` (every frequency divided by it)."""
        rule = self.length_rule
        return dataclasses.replace(
            self, inv_freq=tuple(f / divisor for f in self.inv_freq),
            length_rule=None if rule is None else dataclasses.replace(rule, divisor=rule.divisor * divisor))

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that are rotated."""
        return 2 * len(self.inv_freq)

    @classmethod
    def create(cls, head_dim: int, *, theta: float = 10000.0, rotary_dim: int | None = None,
               layout: str = "half", scaling: RopeScaling | None = None,
               max_position_embeddings: int | None = None, seq_len: int | None = None) -> Rotary:
        """Resolve frequencies for a head; rotary_dim defaults to head_dim and must be even, 2..head_dim."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"`rotary_dim` must be even and in [2, head_dim={head_dim}], got {rotary_dim}")
        inv_freq, attention_scaling = rope_frequencies(
            rotary_dim, theta, scaling, max_position_embeddings=max_position_embeddings, seq_len=seq_len
        )
        return cls(tuple(inv_freq.tolist()), layout, attention_scaling)


#: Call-time frequency methods (`length-extension.md`): name -> `RopeScaling` kind. "pi" is position
#: interpolation (Chen et al. 2023), "ntk" static NTK-aware scaling, "dynamic_ntk" Hugging Face's
#: "dynamic" (the NTK factor follows the sequence length), "yarn" YaRN (Peng et al. 2023).
FREQUENCY_METHODS = {"pi": "linear", "ntk": "ntk", "dynamic_ntk": "dynamic", "yarn": "yarn"}


def frequency_method(name: str, factor: float, pretraining_length: int) -> RopeScaling:
    """The `RopeScaling` of frequency method ``name`` (a key of `FREQUENCY_METHODS`) at extension
    factor ``factor`` (target length / L_train) for a model pretrained on ``pretraining_length`` tokens."""
    if name not in FREQUENCY_METHODS:
        raise ValueError(f"unknown frequency method {name!r}; choose from {', '.join(FREQUENCY_METHODS)}")
    if isinstance(pretraining_length, bool) or not isinstance(pretraining_length, int) or pretraining_length < 1:
        raise ValueError(f"`pretraining_length` must be an int >= 1, got {pretraining_length!r}")
    return RopeScaling(FREQUENCY_METHODS[name], float(factor), original_max_position_embeddings=pretraining_length)


@dataclass(frozen=True)
class RopeScheme:
    """A model's RoPE as its family declares it, before a sequence or a frequency method is known.

    ``scaling`` is the checkpoint's own (its config's ``rope_scaling``); `rotary` resolves the scheme."""

    head_dim: int
    pretraining_length: int
    theta: float = 10000.0
    rotary_dim: int | None = None
    layout: str = "half"
    scaling: RopeScaling | None = None

    def rotary(self, frequencies: RopeScaling | None = None) -> Rotary:
        """The `Rotary` under the call-time frequency method ``frequencies`` (None: the checkpoint's
        own scaling); dynamic NTK gives one whose frequencies follow the sequence (`LengthRule`)."""
        if frequencies is not None and not isinstance(frequencies, RopeScaling):
            raise ValueError(f"frequencies must be a RopeScaling or None, got {type(frequencies).__name__}")
        if frequencies is not None and self.scaling is not None:
            raise ValueError(f"this checkpoint already scales RoPE (rope_scaling kind {self.scaling.kind!r}); a "
                             f"call-time frequency method ({frequencies.kind!r}) would silently replace it")
        scaling = self.scaling if frequencies is None else frequencies
        rotary = Rotary.create(self.head_dim, theta=self.theta, rotary_dim=self.rotary_dim, layout=self.layout,
                               scaling=scaling, max_position_embeddings=self.pretraining_length)
        if scaling is None or scaling.kind != "dynamic":
            return rotary
        rule = LengthRule(rotary.rotary_dim, float(self.theta), scaling, self.pretraining_length)
        return dataclasses.replace(rotary, length_rule=rule)


def _leading_bits(c: np.ndarray, bits: int) -> np.ndarray:
    """c truncated to its `bits` leading significant bits (float64)."""
    mantissa, exponent = np.frexp(c)
    return np.ldexp(np.trunc(np.ldexp(mantissa, bits)), exponent - bits)


def _split(c: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """c = hi + mid + lo with hi, mid of `bits` significant bits and lo the float32 remainder."""
    hi = _leading_bits(c, bits)
    mid = _leading_bits(c - hi, bits)
    return hi.astype(np.float32), mid.astype(np.float32), (c - hi - mid).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _turn_constants(inv_freq: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """float32 pieces (u1, u2, u3, t1, t2, t3) of u = frac(2**16 t) and t = frac(f / 2pi)."""
    t = np.asarray(inv_freq, np.float64) / (2 * np.pi)
    t = t - np.round(t)
    u = np.ldexp(t, 16)
    u = u - np.round(u)
    return (*_split(u, 9), *_split(t, 8))


def _wrap(x: jax.Array) -> jax.Array:
    """x - round(x): exact in float32, in [-0.5, 0.5]."""
    return x - jnp.round(x)


def _integer_positions(positions: jax.Array) -> jax.Array:
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"`positions` must be an integer array, got dtype {positions.dtype}")
    return positions.astype(jnp.int32)


def rope_angles(positions: jax.Array, inv_freq: Sequence[float] | np.ndarray,
                constants: Sequence[jax.Array] | None = None) -> jax.Array:
    """float32 angles (*positions.shape, len(inv_freq)) in [-pi, pi], accurate to ~3e-6 rad for any int32.

    ``constants``: the six turn constants of the frequencies when they are traced (`LengthRule`);
    by default they are computed from ``inv_freq``."""
    p = _integer_positions(positions)[..., None]
    freqs = np.asarray(inv_freq, np.float64)
    if freqs.ndim != 1 or freqs.size == 0:
        raise ValueError(f"`inv_freq` must be a non-empty 1-D sequence, got shape {freqs.shape}")
    u1, u2, u3, t1, t2, t3 = _turn_constants(tuple(freqs.tolist())) if constants is None else constants
    a = (p >> 16).astype(jnp.float32)  # |a| <= 2**15: exact, and a * (9-bit constant) is exact
    b = (p & 0xFFFF).astype(jnp.float32)  # 0 <= b < 2**16: exact, and b * (8-bit constant) is exact
    s = _wrap(a * u1)
    s = _wrap(s + _wrap(a * u2))
    s = _wrap(s + a * u3)
    s = _wrap(s + _wrap(b * t1))
    s = _wrap(s + _wrap(b * t2))
    s = _wrap(s + b * t3)
    return s * np.float32(2 * np.pi)


def _split_pairs(x: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
    if layout == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def _merge_pairs(x1: jax.Array, x2: jax.Array, layout: str) -> jax.Array:
    if layout == "half":
        return jnp.concatenate([x1, x2], axis=-1)
    return jnp.stack([x1, x2], axis=-1).reshape(*x1.shape[:-1], 2 * x1.shape[-1])


def rope_cos_sin(positions: jax.Array, rotary: Rotary, last_key_position: jax.Array | None = None,
                 extra: tuple[jax.Array, Rotary] | None = None) -> tuple[jax.Array, jax.Array]:
    """float32 ``(cos, sin)`` of shape ``(*positions.shape, rotary_dim // 2)``, each times the
    rotary's ``attention_scaling``: the rotation `rotate` applies at integer ``positions``.

    ``extra = (positions2, rotary2)`` adds the angles of a second rotation (same shape of positions,
    e.g. other frequencies): rotations of one pair commute, so this is both in one. A rotary with a
    `LengthRule` needs ``last_key_position`` (the largest key position of the attention call)."""
    angles = _angles(positions, rotary, last_key_position)
    if extra is not None:
        angles = angles + _angles(extra[0], extra[1], last_key_position)
    scaling = np.float32(rotary.attention_scaling)
    return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling


def _angles(positions: jax.Array, rotary: Rotary, last_key_position: jax.Array | None) -> jax.Array:
    constants = None
    if rotary.length_rule is not None:
        if last_key_position is None:
            raise ValueError("this RoPE follows the sequence length (dynamic NTK): pass last_key_position")
        constants = rotary.length_rule.turn_constants(last_key_position)
    return rope_angles(positions, rotary.inv_freq, constants)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """``x (..., head_dim)`` rotated by ``cos``/``sin`` (``(..., rotary_dim // 2)``, from `rope_cos_sin`,
    broadcast against x) in float32, returned in x's dtype; dims past rotary_dim pass through."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"`rotary_dim` ({rotary_dim}) must be <= head_dim ({x.shape[-1]})")
    x1, x2 = _split_pairs(x[..., :rotary_dim].astype(jnp.float32), layout)
    rotated = _merge_pairs(x1 * cos - x2 * sin, x2 * cos + x1 * sin, layout)
    if rotary_dim == x.shape[-1]:
        return rotated.astype(x.dtype)
    rest = jnp.broadcast_to(x[..., rotary_dim:], (*rotated.shape[:-1], x.shape[-1] - rotary_dim))
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, rotary: Rotary, last_key_position: jax.Array | None = None
               ) -> jax.Array:
    """Rotate x (..., T, H, head_dim) at integer positions (..., T); dims past rotary_dim pass through.

    A rotary with a `LengthRule` needs ``last_key_position``, the largest key position of the
    attention call (its frequencies are those of a sequence of that many tokens + 1)."""
    cos, sin = rope_cos_sin(positions, rotary, last_key_position)
    return rotate(x, cos[..., None, :], sin[..., None, :], rotary.layout)  # (..., T, 1, rotary_dim // 2)


def unrotate(x: jax.Array, positions: jax.Array, rotary: Rotary) -> jax.Array:
    """The inverse of `apply_rope` (fixed frequencies) on ``x (..., T, H, head_dim)`` rotated at
    ``positions (..., T)``, attention scaling included: x as it was, to float32 rounding."""
    cos, sin = rope_cos_sin(positions, rotary)
    norm = np.float32(rotary.attention_scaling) ** 2
    return rotate(x, (cos / norm)[..., None, :], (-sin / norm)[..., None, :], rotary.layout)
