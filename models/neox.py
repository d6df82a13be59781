"""GPT-NeoX / Pythia in Hugging Face's layout: per-head fused query_key_value, partial half-layout RoPE,
parallel (or sequential) residual, LayerNorm."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from lminf_jax import RopeScaling, RopeScheme
from lminf_jax.models import common
from lminf_jax.models.common import Params
from lminf_jax.models.declaration import Fused, Param, fused_linear, linear, norm, table
from lminf_jax.models.decoder import Attend, Decoder

MODEL_TYPES = ("gpt_neox",)
LAYER_PREFIX = "gpt_neox.layers."
LAYERS_FIELD = "num_hidden_layers"
_QKV = ("query", "key", "value")


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    """Architecture hyper-parameters (HF config.json names; transformers 5 stores ``rotary_pct`` and
    ``rotary_emb_base`` as ``rope_parameters.partial_rotary_factor`` / ``rope_theta``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = False
    attention_bias: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        common.activation(self.hidden_act)
        if not 2 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_pct / partial_rotary_factor {self.rotary_pct} gives rotary_dim {self.rotary_dim} "
                             f"of head_dim {self.head_dim}; it must be even and in [2, head_dim]")

    @classmethod
    def from_hf(cls, d: Mapping) -> NeoXConfig:
        """From a parsed HF config.json (``model_type`` gpt_neox), read as transformers 5 reads it:
        ``rope_scaling`` or else ``rope_parameters`` (both, differing: refused, `models.common.rope_settings`),
        falling back to ``rotary_pct`` / ``rotary_emb_base``."""
        field, rope = common.rope_settings(d)
        pct_field, pct = _rope_value(d, field, "partial_rotary_factor", "rotary_pct", 0.25)
        theta_field, theta = _rope_value(d, field, "rope_theta", "rotary_emb_base", 10000.0)
        for name, used, source in (("partial_rotary_factor", pct, pct_field), ("rope_theta", theta, theta_field)):
            common.reject(d, name, lambda v, used=used: v is None or v == used,  # transformers ignores it
                          f"GPT-NeoX reads it from {source!r}, which gives {used!r}")
        try:
            scaling = RopeScaling.from_hf(rope or None)
        except ValueError as e:
            raise ValueError(f"config field {field!r}: {e}") from None
        return cls(
            vocab_size=common.require(d, "vocab_size"),
            hidden_size=common.require(d, "hidden_size"),
            num_hidden_layers=common.require(d, "num_hidden_layers"),
            num_attention_heads=common.require(d, "num_attention_heads"),
            intermediate_size=common.require(d, "intermediate_size"),
            rotary_pct=common.positive_float(pct_field, pct),
            rotary_emb_base=common.positive_float(theta_field, theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            layer_norm_eps=common.positive_float("layer_norm_eps", d.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(d.get("use_parallel_residual", True)),
            hidden_act=d.get("hidden_act", "gelu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", True)),
        )

    num_layers = property(lambda self: self.num_hidden_layers)
    num_heads = num_kv_heads = property(lambda self: self.num_attention_heads)
    head_dim = property(lambda self: self.hidden_size // self.num_attention_heads)
    pretraining_length = property(lambda self: self.max_position_embeddings)

    @property
    def rotary_dim(self) -> int:
        """Rotated dims of each head: ``int(head_dim * rotary_pct)``, as transformers computes them."""
        return int(self.head_dim * self.rotary_pct)

    def rope(self) -> RopeScheme:
        """Half-layout (rotate_half) RoPE on the first rotary_dim dims of each head."""
        return RopeScheme(self.head_dim, self.max_position_embeddings, self.rotary_emb_base,
                          rotary_dim=self.rotary_dim, scaling=self.rope_scaling)


def _rope_value(d: Mapping, field: str, key: str, legacy: str, default: float) -> tuple[str, object]:
    """(name, value) of a RoPE setting: ``field.key`` when the rope dict ``d[field]`` has it, else the
    top-level ``legacy`` field (or ``default``)."""
    rope = d.get(field) or {}
    return (f"{field}.{key}", rope[key]) if key in rope else (legacy, d.get(legacy, default))


def parameters(c: NeoXConfig) -> tuple[Param, ...]:
    """Every parameter: HF name (layer index removed), shape, logical axes (`models.declaration`).
    Query, key and value are declared apart; the checkpoint fuses them (`fused`)."""
    n, h, i, bias = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.attention_bias
    layer = LAYER_PREFIX
    return table(
        Param("gpt_neox.embed_in.weight", (c.vocab_size, h), ("vocab", "embed")),
        norm(layer + "input_layernorm", h, bias=True, layers=n),
        norm(layer + "post_attention_layernorm", h, bias=True, layers=n),
        (p for name in _QKV for p in linear(layer + f"attention.{name}", h, h, axes=("heads", "embed"),
                                            bias=bias, layers=n)),
        linear(layer + "attention.dense", h, h, axes=("embed", "heads"), bias=bias, layers=n),
        linear(layer + "mlp.dense_h_to_4h", i, h, axes=("mlp", "embed"), bias=True, layers=n),
        linear(layer + "mlp.dense_4h_to_h", h, i, axes=("embed", "mlp"), bias=True, layers=n),
        norm("gpt_neox.final_layer_norm", h, bias=True),
        () if c.tie_word_embeddings else Param("embed_out.weight", (c.vocab_size, h), ("vocab", "embed")),
    )


def fused(c: NeoXConfig) -> tuple[Fused, ...]:
    """``query_key_value`` holds each head's query, key and value rows in turn: (heads, 3, head_dim)."""
    return fused_linear(LAYER_PREFIX + "attention.", "query_key_value", _QKV, bias=c.attention_bias,
                        groups=c.num_attention_heads)


def ignored_hf_tensors(c: NeoXConfig) -> tuple[str, ...]:
    """Causal-mask and rotary buffers that old checkpoints carry; a tied head's saved copy."""
    tied = (r"embed_out\.weight",) if c.tie_word_embeddings else ()
    return (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)", *tied)


def decoder(c: NeoXConfig, dtype) -> Decoder:
    """The forward pass in pieces (see `models.decoder`)."""
    act, eps = common.activation(c.hidden_act), c.layer_norm_eps

    def layer(p: Params, h: jax.Array, attend: Attend):
        a, m = p["attention"], p["mlp"]
        x = common.layer_norm(h, p["input_layernorm"], eps)
        attn, aux = attend(*(common.linear(x, a[name], dtype) for name in _QKV))
        attn = common.linear(attn, a["dense"], dtype)
        x = common.layer_norm(h if c.use_parallel_residual else h + attn, p["post_attention_layernorm"], eps)
        mlp = common.linear(act(common.linear(x, m["dense_h_to_4h"], dtype)), m["dense_4h_to_h"], dtype)
        return h + attn + mlp, aux

    def head(params: Params, h: jax.Array) -> jax.Array:
        model = params["gpt_neox"]
        h = common.layer_norm(h, model["final_layer_norm"], eps)
        return common.unembed(h, model["embed_in"] if c.tie_word_embeddings else params["embed_out"])

    return Decoder(
        embed=lambda params, tokens: common.embed(params["gpt_neox"]["embed_in"]["weight"], tokens, dtype),
        layer=layer, head=head, layer_params=lambda params: params["gpt_neox"]["layers"],
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
        head_dim=c.head_dim, positional=c.rope(),
    )
