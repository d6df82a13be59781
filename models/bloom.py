"""BLOOM in Hugging Face's layout: ALiBi, per-head fused query_key_value, LayerNorm after the embedding.

BLOOM biases each score by ``slope * key_position``; `lminf_jax.Alibi` adds ``-slope * (query_position -
key_position)``. The two differ by ``slope * query_position``, a constant over each query's row, which
softmax ignores: the attention weights are equal, and only the relative form lets LM-Infinite cap the
distance."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from lminf_jax import Alibi
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Fused, Param, fused_linear, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder

MODEL_TYPES = ("bloom",)
LAYER_PREFIX = "transformer.h."
LAYERS_FIELD = "n_layer"  # old configs name it num_hidden_layers
QKV = ("query", "key", "value")

@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Architecture hyper-parameters (HF config.json names). BLOOM has no ``max_position_embeddings``:
    ``seq_length`` (the pretraining length) is read when a config carries it, else 2048, the length
    every BLOOM model was trained at."""

    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    seq_length: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of n_head ({self.n_head})")

    @classmethod
    def from_hf(cls, d: Mapping) -> BloomConfig:
        """From a parsed HF config.json (``model_type`` bloom). Old configs name fields ``n_embed``,
        ``num_hidden_layers`` and ``num_attention_heads``. Any ``pretraining_tp`` and ``slow_but_exact`` are
        accepted: with both set, transformers sums ``dense`` and ``dense_4h_to_h`` over slices of their
        inputs, the same product rounded differently."""
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            hidden_size=_aliased(d, "hidden_size", "n_embed"),
            n_layer=_aliased(d, "n_layer", "num_hidden_layers"),
            n_head=_aliased(d, "n_head", "num_attention_heads"),
            layer_norm_epsilon=common.positive_float("layer_norm_epsilon", d.get("layer_norm_epsilon", 1e-5)),
            apply_residual_connection_post_layernorm=bool(d.get("apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            seq_length=common.require(d, "seq_length") if d.get("seq_length") is not None else 2048,
        )

    num_layers = property(lambda self: self.n_layer)
    num_heads = num_kv_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: self.hidden_size // self.n_head)
    pretraining_length = property(lambda self: self.seq_length)

    def alibi(self) -> Alibi:
        """BLOOM's slopes: MPT's rule with bias max 8 (checked against transformers in tests/test_alibi.py)."""
        return Alibi.create(self.n_head, 8.0)


def _aliased(d: Mapping, name: str, alias: str) -> int:
    """Required integer field ``name``, also accepted under its old name ``alias``; both given must agree."""
    values = {common.require(d, field) for field in (name, alias) if d.get(field) is not None}
    if len(values) > 1:
        raise ValueError(f"config fields {name!r} and {alias!r} disagree: {d[name]!r} and {d[alias]!r}")
    return values.pop() if values else common.require(d, name)


def parameters(c: BloomConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`).
    The checkpoint's fused ``query_key_value`` is declared as separate query, key and value (`fused`)."""
    n, h, v = c.n_layer, c.hidden_size, c.vocab_size
    layer = LAYER_PREFIX
    return table(
        Param("transformer.word_embeddings.weight", (v, h), ("vocab", "embed")),
        norm("transformer.word_embeddings_layernorm", h, bias=True),
        norm(layer + "input_layernorm", h, bias=True, layers=n),
        (p for name, axis in zip(QKV, ("heads", "kv_heads", "kv_heads"))
         for p in linear(layer + f"self_attention.{name}", h, h, axes=(axis, "embed"), bias=True, layers=n)),
        linear(layer + "self_attention.dense", h, h, axes=("embed", "heads"), bias=True, layers=n),
        norm(layer + "post_attention_layernorm", h, bias=True, layers=n),
        linear(layer + "mlp.dense_h_to_4h", 4 * h, h, axes=("mlp", "embed"), bias=True, layers=n),
        linear(layer + "mlp.dense_4h_to_h", h, 4 * h, axes=("embed", "mlp"), bias=True, layers=n),
        norm("transformer.ln_f", h, bias=True),
        () if c.tie_word_embeddings else Param("lm_head.weight", (v, h), ("vocab", "embed")),
    )


def fused(c: BloomConfig) -> tuple[Fused, ...]:
    """``query_key_value`` holds each head's query, key and value rows in turn: ``(heads, 3, head_dim)``."""
    return fused_linear(LAYER_PREFIX + "self_attention.", "query_key_value", QKV, bias=True, groups=c.n_head)


def ignored_hf_tensors(c: BloomConfig) -> tuple[str, ...]:
    """The saved copy of a tied output head."""
    return (r"lm_head\.weight",) if c.tie_word_embeddings else ()


def decoder(c: BloomConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`). With
    ``apply_residual_connection_post_layernorm`` each residual branch adds to its normed input."""
    eps, post_ln = c.layer_norm_epsilon, c.apply_residual_connection_post_layernorm

    def layer(p: Params, h: jax.Array, attend: Attend):
        a, m = p["self_attention"], p["mlp"]
        x = common.layer_norm(h, p["input_layernorm"], eps)
        attn, aux = attend(*(common.linear(x, a[name], dtype) for name in QKV))
        h = (x if post_ln else h) + common.linear(attn, a["dense"], dtype)
        x = common.layer_norm(h, p["post_attention_layernorm"], eps)
        # BLOOM's tanh GELU writes sqrt(2/pi) as 0.79788456 (8e-10 off): the same in float32
        up = jax.nn.gelu(common.linear(x, m["dense_h_to_4h"], dtype), approximate=True)
        return (x if post_ln else h) + common.linear(up, m["dense_4h_to_h"], dtype), aux

    def embed(params: Params, tokens: jax.Array) -> jax.Array:
        model = params["transformer"]
        return common.layer_norm(common.embed(model["word_embeddings"]["weight"], tokens, dtype),
                                 model["word_embeddings_layernorm"], eps)

    def head(params: Params, h: jax.Array) -> jax.Array:
        model = params["transformer"]
        return common.unembed(common.layer_norm(h, model["ln_f"], eps),
                              model["word_embeddings"] if c.tie_word_embeddings else params["lm_head"])

    return Decoder(
        embed=embed, layer=layer, head=head, layer_params=lambda params: params["transformer"]["h"],
        num_layers=c.n_layer, num_heads=c.n_head, num_kv_heads=c.n_head, head_dim=c.head_dim,
        positional=c.alibi(),
    )
