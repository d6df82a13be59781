"""Pieces every model family shares: parameter trees, norms, projections, positions and embeddings.

Parameters keep Hugging Face's tensor names and layouts (Linear weights are
``(out, in)``). Per-layer tensors are stacked on a leading layer axis and named without
the layer index: HF ``model.layers.7.mlp.up_proj.weight`` is row 7 of
``params["model"]["layers"]["mlp"]["up_proj"]["weight"]``. Flat names (joined by ".")
are what converters and shape templates use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from lminf_jax import AttentionSpec
from lminf_jax.int32 import int32_positions

Params = dict


def unflatten(flat: Mapping[str, jax.Array]) -> Params:
    """Flat ``"a.b.c" -> array`` mapping to the nested params tree."""
    return traverse_util.unflatten_dict(dict(flat), sep=".")


def flatten(params: Params) -> dict[str, jax.Array]:
    """Nested params tree to flat ``"a.b.c" -> array``."""
    return traverse_util.flatten_dict(params, sep=".")


def init_from_shapes(shapes: Mapping[str, tuple[int, ...]], key: jax.Array, dtype=jnp.float32,
                     shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> Params:
    """Random parameters for a shape template: N(0, 0.02) weights, unit norm scales, zero biases.

    Names ending in ``norm.weight``/``ln_*.weight`` (any norm scale) are ones, ``.bias`` zeros.
    ``shardings`` (flat name -> sharding, e.g. from `models.registry.Family.param_shardings`)
    creates each parameter directly in its shards: no device ever holds a whole split parameter.
    """
    if shardings is not None and set(shardings) != set(shapes):
        raise ValueError(f"shardings must name exactly the parameters; missing {sorted(set(shapes) - set(shardings))}, "
                         f"unknown {sorted(set(shardings) - set(shapes))}")
    template = tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))
    placement = None if shardings is None else tuple(shardings[name] for name, _ in template)
    # one compiled program either way, so sharded and unsharded creation give the same values
    values = _random_params_program(template, jnp.dtype(dtype), placement)(key)
    return unflatten({name: value for (name, _), value in zip(template, values, strict=True)})


@functools.lru_cache(maxsize=32)
def _random_params_program(template: tuple[tuple[str, tuple[int, ...]], ...], dtype: jnp.dtype,
                           placement: tuple[jax.sharding.Sharding, ...] | None) -> Callable:
    """The compiled initialiser of one shape template (made once, not on every call: a model
    built again, e.g. each test or experiment arm, reuses the program)."""
    def make(key: jax.Array) -> tuple[jax.Array, ...]:
        values = []
        for i, (name, shape) in enumerate(template):
            if name.endswith(".bias"):
                values.append(jnp.zeros(shape, dtype))
            elif _is_norm(name):
                values.append(jnp.ones(shape, dtype))
            else:
                noise = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
                values.append((0.02 * noise).astype(dtype))
        return tuple(values)

    return jax.jit(make, out_shardings=placement)


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and ("norm" in parts[-2] or parts[-2].startswith("ln") or parts[-2].endswith("_ln"))


def count_params(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Number of scalars in a shape template."""
    return sum(math.prod(s) for s in shapes.values())


# ----- layers -----------------------------------------------------------------------


def linear(x: jax.Array, p: Mapping[str, jax.Array], dtype) -> jax.Array:
    """HF ``nn.Linear``: ``x @ weight.T (+ bias)`` with weight ``(out, in)``: operands in dtype, the
    product accumulated (and the bias added) in float32 (`_product`), the result rounded to dtype once."""
    return _affine(x.astype(dtype), p).astype(dtype)


def _product(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``x (..., in) @ weight (out, in).T`` in float32, operands in x's dtype.

    Two things make XLA:CPU multiply bfloat16 natively (AMX / AVX512-BF16) instead of in float32:
    asking for the float32 product (a bfloat16-out dot runs 3.7x slower on a 4096 x 2048 x 5632
    product), and more than one row (a one-row bfloat16 product, a decoding step's, runs ~14x slower
    than a two-row one), so a single row is multiplied as two and the copy dropped. Other backends
    multiply the one extra row for free (a step is memory-bound)."""
    weight = weight.astype(x.dtype)
    lead = x.shape[:-1]
    single = math.prod(lead) == 1 and x.dtype != jnp.float32
    rows = jnp.broadcast_to(x.reshape(1, -1), (2, x.shape[-1])) if single else x
    y = jnp.einsum("...i,oi->...o", rows, weight, preferred_element_type=jnp.float32, precision=_precision(x.dtype))
    return y[:1].reshape(*lead, -1) if single else y


def _affine(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """``x @ weight.T + bias`` (bias optional) in float32 (`_product`)."""
    y = _product(x, p["weight"])
    return y + p["bias"].astype(jnp.float32) if "bias" in p else y


def rms_norm(x: jax.Array, p: Mapping[str, jax.Array], eps: float, *, unit_offset: bool = False) -> jax.Array:
    """LLaMA RMSNorm in float32, result in x's dtype; ``unit_offset``: scaled by ``1 + weight`` (Gemma)."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = p["weight"].astype(jnp.float32)
    return (y * (1.0 + weight if unit_offset else weight)).astype(x.dtype)


def layer_norm(x: jax.Array, p: Mapping[str, jax.Array], eps: float) -> jax.Array:
    """LayerNorm in float32 (bias optional), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + eps) * p["weight"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-NeoX-20B: the same tanh formula
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str, field: str = "hidden_act") -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its HF name; unknown names raise naming the config field."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field} {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _precision(dtype) -> lax.Precision:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


# ----- positions, tokens, embeddings ----------------------------------------------


def default_positions(tokens: jax.Array, positions: jax.Array | None, spec: AttentionSpec) -> jax.Array:
    """Positions ``(B, T)`` int32: given ones (validated: in int32's range and in ``spec``'s) or ``0..T-1``
    for every row."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
    positions = int32_positions("positions", positions)
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"positions must have shape ({t},) or ({b}, {t}), got {positions.shape}")
    spec.check_query_positions("positions", positions)
    return jnp.broadcast_to(positions, (b, t))


def check_tokens(tokens: jax.Array, vocab_size: int) -> None:
    """Tokens must be an integer (batch, time) array; in-range when concrete."""
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array of shape (batch, time), got {getattr(tokens, 'shape', None)}")
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={vocab_size}), got range [{arr.min()}, {arr.max()}]")


def embed(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Embedding lookup in the compute dtype."""
    return jnp.take(table, tokens, axis=0).astype(dtype)


def unembed(h: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """Logits in float32 from a ``(vocab, hidden)`` head (bias optional)."""
    return _affine(h, p)


LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class WindowLayers:
    """Which layers attend a model's native sliding window, kept as the config states it, so that reading
    a config builds nothing per layer: the listed ``layer_types`` (True: sliding) or, without them, every
    layer from ``first`` on except each ``period``-th (layer i with ``(i + 1) % period == 0``; None: none)."""

    listed: tuple[bool, ...] | None = None
    first: int = 0
    period: int | None = None

    def flags(self, num_layers: int) -> tuple[bool, ...]:
        """Per layer of ``num_layers``: whether it is windowed."""
        if self.listed is not None:
            return self.listed
        return tuple(i >= self.first and (self.period is None or (i + 1) % self.period != 0)
                     for i in range(num_layers))


def window_layers(config: Mapping, num_layers: int, *, first: int = 0, period: int | None = None) -> WindowLayers:
    """Which layers attend the model's native sliding window: Hugging Face's ``layer_types`` when the
    config lists them (each "full_attention" or "sliding_attention", one per layer), else the rule of
    ``first`` and ``period`` (`WindowLayers`)."""
    types = config.get("layer_types")
    if types is None:
        return WindowLayers(first=first, period=period)
    if not isinstance(types, (list, tuple)) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"config field 'layer_types' must list one of {LAYER_TYPES} per layer ({num_layers}), "
                         f"got {types!r}")
    return WindowLayers(tuple(t == "sliding_attention" for t in types))


def window_flags(config) -> tuple[bool, ...]:
    """Per layer of a config with a native window (``sliding_window``, ``window_rule``, ``num_layers``):
    whether it attends the window; none without one."""
    return () if config.sliding_window is None else config.window_rule.flags(config.num_layers)


def rope_settings(config: Mapping) -> tuple[str, Mapping]:
    """The config field holding its RoPE settings and their dict, as transformers reads them: ``rope_scaling``
    (older configs) when set, else ``rope_parameters`` (transformers 5; {} when neither is set).

    Both set and different is refused: transformers then reads ``rope_scaling`` alone (its ``rope_theta``
    from the top-level field or the default), dropping what ``rope_parameters`` say, such as their theta."""
    parameters, scaling = config.get("rope_parameters"), config.get("rope_scaling")
    if parameters and scaling and parameters != scaling:
        raise ValueError(f"config fields 'rope_parameters' and 'rope_scaling' differ ({parameters!r} and {scaling!r}): "
                         "transformers reads 'rope_scaling' alone, so the config has no single RoPE; keep one: put the "
                         "settings in 'rope_parameters' (transformers 5's field) and remove 'rope_scaling'")
    field = "rope_scaling" if scaling else "rope_parameters"
    settings = config.get(field) or {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"config field {field!r} must be a mapping, got {type(settings).__name__}")
    return field, settings


def require(config: Mapping, field: str, kind: type | tuple[type, ...] = int):
    """A required HF config field of the given type, or a ValueError naming it."""
    if field not in config or config[field] is None:
        raise ValueError(f"config.json is missing required field {field!r}")
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"config field {field!r} must be {kind}, got {value!r}")
    return value


def positive_float(field: str, value: object) -> float:
    """A config number that must be finite and > 0 (a norm epsilon, a RoPE base, ALiBi's bias max),
    or a ValueError naming the field: a NaN would convert and then never give a finite logit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config field {field!r} must be a finite number > 0, got {value!r}")
    return float(value)


def reject(config: Mapping, field: str, allowed: Callable[[object], bool], why: str) -> None:
    """Raise naming ``field`` when a config feature this project does not implement is set."""
    if field in config and not allowed(config[field]):
        raise ValueError(f"unsupported config field {field!r} = {config[field]!r}: {why}")
