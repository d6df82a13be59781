"""Gemma 1/2/3 (text) in Hugging Face's layout.

All three: RMSNorm scaled by ``1 + weight``, embeddings times ``sqrt(hidden_size)`` (in the compute
dtype), a gated MLP with tanh GELU, explicit ``head_dim``, a tied head. Gemma-2 adds norms after
attention and around the MLP, scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
(``attn_logit_softcapping``, `lminf_jax.Scaling`), soft-capped final logits and sliding-window layers
alternating with global ones (``layer_types``, default: even layers windowed). Gemma-3 adds RMSNorm of
each query and key head before RoPE, five windowed layers to one global one, and its own RoPE for the
windowed layers (``rope_local_base_freq``, no scaling) beside the global layers' scaled one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lminf_jax import RopeScaling, RopeScheme, Scaling
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Param, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder, NativeWindow

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
LAYER_PREFIX = "model.layers."
LAYERS_FIELD = "num_hidden_layers"
#: Hugging Face's defaults per generation for fields a config may leave out; ``pattern``: layer i is
#: windowed unless (i + 1) is a multiple of it.
_DEFAULTS = {2: dict(sliding_window=4096, pattern=2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
             3: dict(sliding_window=4096, pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None)}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture hyper-parameters (HF config.json names); ``generation`` 1, 2 or 3."""

    generation: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_local_base_freq: float | None = None  # Gemma-3's windowed layers
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    window_rule: common.WindowLayers = common.WindowLayers()

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        common.activation(self.hidden_activation, "hidden_activation")

    @classmethod
    def from_hf(cls, d: Mapping) -> GemmaConfig:
        """From a parsed HF config.json (``model_type`` gemma, gemma2 or gemma3_text)."""
        model_type = d.get("model_type")
        generation = MODEL_TYPES.index(model_type) + 1
        common.reject(d, "use_bidirectional_attention", lambda v: not v, "bidirectional (encoder) attention")
        if generation == 3:  # transformers' Gemma-3 never applies it: refuse rather than guess
            common.reject(d, "attn_logit_softcapping", lambda v: v is None, "Gemma-3 has no attention soft-capping")
        heads = common.require(d, "num_attention_heads")
        layers = common.require(d, "num_hidden_layers")
        global_rope, local_theta = _rope(d, generation)
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        defaults = _DEFAULTS.get(generation, {})
        pattern = defaults.get("pattern")
        if generation == 3 and d.get("sliding_window_pattern") is not None:  # transformers' Gemma-3 reads it
            pattern = common.require(d, "sliding_window_pattern")
            if pattern < 1:
                raise ValueError(f"config field 'sliding_window_pattern' must be >= 1, got {pattern}")
        window = d.get("sliding_window", defaults.get("sliding_window"))
        if window is not None:
            window = common.require(d, "sliding_window")
        capped = {f: None if d.get(f, defaults[f]) is None else common.positive_float(f, d.get(f, defaults[f]))
                  for f in ("attn_logit_softcapping", "final_logit_softcapping")} if defaults else {}
        return cls(
            generation=generation,
            vocab_size=common.require(d, "vocab_size"),
            hidden_size=common.require(d, "hidden_size"),
            intermediate_size=common.require(d, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=common.require(d, "head_dim"),
            rms_norm_eps=common.positive_float("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=common.positive_float("rope_theta", global_rope.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(global_rope),
            rope_local_base_freq=local_theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
            attention_bias=bool(d.get("attention_bias", False)),
            # Gemma-1 configs say "gelu" and mean the tanh approximation (as transformers reads them)
            hidden_activation="gelu_pytorch_tanh" if generation == 1 and act == "gelu" else act,
            query_pre_attn_scalar=(common.positive_float("query_pre_attn_scalar", d.get("query_pre_attn_scalar", 256))
                                   if defaults else None),
            sliding_window=window if defaults else None,
            window_rule=(common.window_layers(d, layers, period=pattern) if defaults and window
                         else common.WindowLayers()),
            **capped,
        )

    num_layers = property(lambda self: self.num_hidden_layers)
    num_heads = property(lambda self: self.num_attention_heads)
    num_kv_heads = property(lambda self: self.num_key_value_heads)
    pretraining_length = property(lambda self: self.max_position_embeddings)
    window_layers = property(common.window_flags)

    def rope(self) -> RopeScheme:
        """Half-layout RoPE on every head dim (the global layers' on Gemma-3)."""
        return RopeScheme(self.head_dim, self.max_position_embeddings, self.rope_theta, scaling=self.rope_scaling)

    def scale(self) -> Scaling:
        """Scores times ``query_pre_attn_scalar ** -0.5`` (default ``head_dim``), soft-capped on Gemma-2."""
        scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return Scaling(1.0 / math.sqrt(scalar), self.attn_logit_softcapping)


def _rope(d: Mapping, generation: int) -> tuple[dict, float | None]:
    """The global layers' RoPE parameters (``rope_theta`` and scaling, one dict) and, on Gemma-3, the
    windowed layers' base: from transformers 5's per-layer-type ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` fields."""
    _, rope = common.rope_settings(d)
    if generation < 3:
        return {"rope_theta": d.get("rope_theta", 10000.0), **rope}, None
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        full, local = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
        if RopeScaling.from_hf(local) is not None:
            raise ValueError("unsupported config field 'rope_parameters': Gemma-3's sliding_attention RoPE is scaled")
        return full, common.positive_float("rope_parameters.sliding_attention.rope_theta",
                                           local.get("rope_theta", 10000.0))
    full = {"rope_theta": d.get("rope_theta", 1_000_000.0), **(d.get("rope_scaling") or {})}
    return full, common.positive_float("rope_local_base_freq", d.get("rope_local_base_freq", 10000.0))


def parameters(c: GemmaConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`)."""
    n, h, i = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = LAYER_PREFIX
    norms = ("input_layernorm", "post_attention_layernorm")
    if c.generation > 1:
        norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    return table(
        Param("model.embed_tokens.weight", (c.vocab_size, h), ("vocab", "embed")),
        (p for name in norms for p in norm(layer + name, h, bias=False, layers=n)),
        linear(layer + "self_attn.q_proj", q, h, axes=("heads", "embed"), bias=c.attention_bias, layers=n),
        linear(layer + "self_attn.k_proj", kv, h, axes=("kv_heads", "embed"), bias=c.attention_bias, layers=n),
        linear(layer + "self_attn.v_proj", kv, h, axes=("kv_heads", "embed"), bias=c.attention_bias, layers=n),
        linear(layer + "self_attn.o_proj", h, q, axes=("embed", "heads"), bias=c.attention_bias, layers=n),
        (p for name in ("q_norm", "k_norm") if c.generation == 3
         for p in norm(layer + f"self_attn.{name}", c.head_dim, bias=False, layers=n)),
        linear(layer + "mlp.gate_proj", i, h, axes=("mlp", "embed"), bias=False, layers=n),
        linear(layer + "mlp.up_proj", i, h, axes=("mlp", "embed"), bias=False, layers=n),
        linear(layer + "mlp.down_proj", h, i, axes=("embed", "mlp"), bias=False, layers=n),
        norm("model.norm", h, bias=False),
    )


def ignored_hf_tensors(c: GemmaConfig) -> tuple[str, ...]:
    """Regexes of HF tensors that carry no parameters: the tied head's copy, RoPE buffers."""
    return (r"lm_head\.weight", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _norm(x: jax.Array, p: Params, c: GemmaConfig) -> jax.Array:
    return common.rms_norm(x, p, c.rms_norm_eps, unit_offset=True)


def _head_norm(x: jax.Array, p: Params, c: GemmaConfig) -> jax.Array:
    """Gemma-3's RMSNorm over each head's dims of a projected ``(B, T, heads * head_dim)`` tensor."""
    return _norm(x.reshape(*x.shape[:-1], -1, c.head_dim), p, c).reshape(x.shape)


def decoder(c: GemmaConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    act = common.activation(c.hidden_activation, "hidden_activation")

    def layer(p: Params, h: jax.Array, attend: Attend):
        a, m = p["self_attn"], p["mlp"]
        x = _norm(h, p["input_layernorm"], c)
        q, k = common.linear(x, a["q_proj"], dtype), common.linear(x, a["k_proj"], dtype)
        if c.generation == 3:
            q, k = _head_norm(q, a["q_norm"], c), _head_norm(k, a["k_norm"], c)
        attn, aux = attend(q, k, common.linear(x, a["v_proj"], dtype))
        attn = common.linear(attn, a["o_proj"], dtype)
        if c.generation > 1:
            attn = _norm(attn, p["post_attention_layernorm"], c)
            x = _norm(h + attn, p["pre_feedforward_layernorm"], c)
        else:
            x = _norm(h + attn, p["post_attention_layernorm"], c)
        gated = act(common.linear(x, m["gate_proj"], dtype)) * common.linear(x, m["up_proj"], dtype)
        mlp = common.linear(gated, m["down_proj"], dtype)
        if c.generation > 1:
            mlp = _norm(mlp, p["post_feedforward_layernorm"], c)
        return h + attn + mlp, aux

    def embed(params: Params, tokens: jax.Array) -> jax.Array:
        h = common.embed(params["model"]["embed_tokens"]["weight"], tokens, dtype)
        return h * jnp.asarray(math.sqrt(c.hidden_size), dtype)

    def head(params: Params, h: jax.Array) -> jax.Array:
        logits = common.unembed(_norm(h, params["model"]["norm"], c), params["model"]["embed_tokens"])
        cap = c.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    local_rope = None if c.rope_local_base_freq is None else RopeScheme(
        c.head_dim, c.max_position_embeddings, c.rope_local_base_freq)
    return Decoder(
        embed=embed, layer=layer, head=head, layer_params=lambda params: params["model"]["layers"],
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, positional=c.rope(), scale=c.scale(),
        native_window=NativeWindow.of(c.sliding_window, c.window_layers, local_rope),
    )
